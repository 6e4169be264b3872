// The typed client path a frontend takes, run live against a server: requests with openapi-fetch
// typed by openapi-typescript, every answer checked by the zod schema @hey-api/openapi-ts generates
// from the same openapi.json, and the SSE routes read with eventsource-parser into the event unions.
//   node tests/clients/build/live.js http://127.0.0.1:PORT  (tests/typed_client.rs runs it)
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import createClient from "openapi-fetch";
import { EventSourceParserStream } from "eventsource-parser/stream";
import type { z } from "zod";
import type { paths } from "../../target/clients/api";
import * as s from "./gen/zod.gen.ts";

const base = process.argv[2];
const client = createClient<paths>({ baseUrl: base });
const covered = new Set<string>();

/** Parses a route's answer with its generated schema, and notes the route as covered. */
function check<T>(route: string, schema: z.ZodType<T>, data: unknown): T {
  covered.add(route);
  const parsed = schema.safeParse(data);
  assert.ok(parsed.success, `${route}: ${JSON.stringify(data).slice(0, 300)}\n${parsed.error}`);
  return parsed.data as T;
}

/** The `data:` payloads of an SSE body, parsed by eventsource-parser. */
async function* sse(body: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  // Node's and the DOM's stream types disagree on TextDecoderStream's input; the object is the same.
  const decoder = new TextDecoderStream() as unknown as ReadableWritablePair<string, Uint8Array>;
  const events = body.pipeThrough(decoder).pipeThrough(new EventSourceParserStream());
  for await (const event of events) yield event.data;
}

async function events<T>(route: string, schema: z.ZodType<T>, body: ReadableStream<Uint8Array> | null) {
  assert.ok(body, `${route}: no body`);
  const out: T[] = [];
  for await (const data of sse(body)) {
    if (data === "[DONE]") break;
    out.push(check(route, schema, JSON.parse(data)));
  }
  return out;
}

const health = await client.GET("/health");
check("GET /health", s.zHealthResponse2, health.data);
const ready = await client.GET("/health/ready");
check("GET /health/ready", s.zReadyResponse, ready.data);
const metrics = await client.GET("/metrics", { parseAs: "text" });
check("GET /metrics", s.zMetricsResponse, metrics.data);
const models = await client.GET("/v1/models");
const chatModel = check("GET /v1/models", s.zModelsResponse, models.data).data[0].id;

const embed = await client.POST("/api/embed", { body: { texts: ["The quick brown fox."] } });
assert.equal(check("POST /api/embed", s.zEmbedResponse2, embed.data).dims, 384);
const openaiEmbed = await client.POST("/v1/embeddings", {
  body: { input: ["one", "two"], model: "all-MiniLM-L6-v2" },
});
check("POST /v1/embeddings", s.zEmbeddingsResponse, openaiEmbed.data);

const sentiment = await client.POST("/api/classify/sentiment", {
  body: { text: "I love this, it is wonderful" },
});
assert.equal(check("POST /api/classify/sentiment", s.zSentimentResponse, sentiment.data).label, "positive");
const batch = await client.POST("/api/classify/sentiment/batch", {
  body: { texts: ["Great product", "Terrible service"] },
});
check("POST /api/classify/sentiment/batch", s.zSentimentBatchResponse, batch.data);
const classifiers = await client.GET("/api/classifiers");
const name = check("GET /api/classifiers", s.zListResponse, classifiers.data).classifiers[0].name;
const one = await client.POST("/api/classify/{classifier}", {
  params: { path: { classifier: name } },
  body: { text: "Fine." },
});
check("POST /api/classify/{classifier}", s.zClassifyResponse2, one.data);
const many = await client.POST("/api/classify/{classifier}/batch", {
  params: { path: { classifier: name } },
  body: { texts: ["Fine.", "Awful."] },
});
check("POST /api/classify/{classifier}/batch", s.zClassifyBatchResponse, many.data);

const counted = await client.POST("/api/tokenize", {
  body: { messages: [{ role: "user", content: "What is the capital of France?" }] },
});
assert.ok(check("POST /api/tokenize", s.zTokenizeResponse2, counted.data).count > 5);

// Errors have their shapes too: FastAPI's 422 and detail strings.
const invalid = await client.POST("/api/embed", { body: { texts: [] } });
assert.equal(invalid.response.status, 422);
s.zHttpValidationError.parse(invalid.error);
const unknown = await client.POST("/api/classify/{classifier}", {
  params: { path: { classifier: "no-such-classifier" } },
  body: { text: "x" },
});
assert.equal(unknown.response.status, 404);
s.zHttpError.parse(unknown.error);

// Chat: a non-streaming completion, and the two SSE routes in order.
const completion = await client.POST("/v1/chat/completions", {
  body: { model: chatModel, max_tokens: 8, messages: [{ role: "user", content: "Say hi." }] },
});
check("POST /v1/chat/completions", s.zCompletionsResponse, completion.data);
const stream = await client.POST("/api/chat/stream", {
  body: { messages: [{ role: "user", content: "What is the capital of France?" }], max_tokens: 16 },
  parseAs: "stream",
});
const chat = await events("POST /api/chat/stream", s.zChatStreamEvent, stream.response.body);
assert.ok(chat.length >= 2);
assert.ok(chat.slice(0, -1).every((e) => e.type === "delta"), JSON.stringify(chat));
assert.equal(chat.at(-1)!.type, "done");
const sdk = await client.POST("/api/ai-sdk/chat", {
  body: { messages: [{ role: "user", parts: [{ type: "text", text: "Hi" }] }], max_tokens: 4 },
  parseAs: "stream",
});
const parts = await events("POST /api/ai-sdk/chat", s.zUiStreamPart, sdk.response.body);
assert.deepEqual([parts[0].type, parts.at(-1)!.type], ["start", "finish"]);

// RAG: ingest, list, search, query (sources first), the AI SDK's RAG stream, delete.
const collection = `typed-${Date.now()}`;
const doc = await client.POST("/api/rag/documents", {
  body: {
    collection,
    title: "Returns policy",
    content: "Customers may return any product within 30 days of delivery for a full refund.",
    metadata: { team: "support" },
  },
});
assert.equal(doc.response.status, 201);
const id = check("POST /api/rag/documents", s.zIngestResponse, doc.data).id;
const list = await client.GET("/api/rag/documents", { params: { query: { collection } } });
assert.equal(check("GET /api/rag/documents", s.zListDocumentsResponse, list.data).documents.length, 1);
const collections = await client.GET("/api/rag/collections");
check("GET /api/rag/collections", s.zCollectionsResponse, collections.data);
const found = await client.POST("/api/rag/search", { body: { query: "return a product", collection } });
assert.equal(check("POST /api/rag/search", s.zSearchResponse, found.data)[0].document_id, id);
const query = await client.POST("/api/rag/query", {
  body: { question: "How many days do I have to return a product?", collection, max_tokens: 16 },
  parseAs: "stream",
});
const answer = await events("POST /api/rag/query", s.zChatStreamEvent, query.response.body);
assert.equal(answer[0].type, "sources");
assert.equal(answer.at(-1)!.type, "done");
const sdkRag = await client.POST("/api/ai-sdk/rag", {
  body: {
    messages: [{ role: "user", parts: [{ type: "text", text: "How long can I return a product?" }] }],
    collection,
    max_tokens: 8,
  },
  parseAs: "stream",
});
const ragParts = await events("POST /api/ai-sdk/rag", s.zUiStreamPart, sdkRag.response.body);
assert.ok(ragParts.findIndex((p) => p.type === "source-document") < ragParts.findIndex((p) => p.type === "text-delta"));
const deleted = await client.DELETE("/api/rag/documents/{id}", { params: { path: { id: Number(id) } } });
assert.equal(deleted.response.status, 204);
covered.add("DELETE /api/rag/documents/{id}");

// Every route of the document was called and its answer checked.
const spec = JSON.parse(readFileSync(new URL("../../../openapi.json", import.meta.url), "utf8"));
const routes = Object.entries(spec.paths as Record<string, object>).flatMap(([path, ops]) =>
  Object.keys(ops).map((method) => `${method.toUpperCase()} ${path}`),
);
const missed = routes.filter((r) => !covered.has(r));
assert.deepEqual(missed, [], `routes not checked: ${missed.join(", ")}`);
console.log(`typed client: ${covered.size} routes checked`);
