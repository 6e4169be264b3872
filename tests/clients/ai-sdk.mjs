// The Vercel AI SDK (npm `ai`, what `useChat` runs on) against aitier's /api/ai-sdk routes: its own
// transport sends the request, its own parser and schema read the stream.
//   node tests/clients/ai-sdk.mjs http://127.0.0.1:PORT CHAT_MODEL
import assert from "node:assert/strict";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const [base, chatModel] = process.argv.slice(2);
const ask = (text) => [{ id: "u1", role: "user", parts: [{ type: "text", text }] }];

// Every chunk the SDK parsed (a chunk its schema refuses fails the stream), and the message it
// assembles from them, as useChat does.
async function run(api, messages, body = {}, onChunk = () => {}, abortSignal) {
  const transport = new DefaultChatTransport({ api: `${base}${api}`, body });
  const stream = await transport.sendMessages({
    chatId: "c1",
    messages,
    trigger: "submit-message",
    messageId: undefined,
    abortSignal,
  });
  const chunks = [];
  const seen = stream.pipeThrough(
    new TransformStream({
      transform(chunk, controller) {
        chunks.push(chunk);
        onChunk(chunk);
        controller.enqueue(chunk);
      },
    }),
  );
  let message;
  for await (const m of readUIMessageStream({ stream: seen })) message = m;
  return { chunks, message };
}

const text = (message) =>
  message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");

// Chat: the parts in order, the text assembled, the usage in the metadata.
{
  const { chunks, message } = await run(
    "/api/ai-sdk/chat",
    ask("What is the capital of France? Answer in one sentence."),
    { max_tokens: 48 },
  );
  const types = chunks.map((c) => c.type);
  assert.deepEqual(types.slice(0, 2), ["start", "text-start"], types.join(","));
  assert.deepEqual(types.slice(-2), ["text-end", "finish"], types.join(","));
  assert.ok(types.filter((t) => t === "text-delta").length > 1, types.join(","));
  assert.match(text(message), /Paris/);
  assert.equal(message.role, "assistant");
  const finish = chunks.at(-1);
  assert.equal(finish.finishReason, "stop");
  assert.equal(message.metadata.model, chatModel);
  assert.ok(message.metadata.usage.completion_tokens > 0);
  // The conversation goes back with the answer in it, as useChat sends it next time.
  const again = await run(
    "/api/ai-sdk/chat",
    [...ask("What is the capital of France?"), { ...message, id: "a1" }, ...ask("And of Italy?")],
    { max_tokens: 24 },
  );
  assert.ok(text(again.message).length > 0);
}

// Stop: aborting after the first delta ends the generation on the server.
{
  const controller = new AbortController();
  let deltas = 0;
  // The SDK ends the stream quietly on abort, as useChat's stop() does.
  const { chunks } = await run(
    "/api/ai-sdk/chat",
    ask("Write a very long story about a lighthouse keeper."),
    { max_tokens: 2000 },
    (chunk) => {
      if (chunk.type === "text-delta" && ++deltas === 1) controller.abort();
    },
    controller.signal,
  );
  assert.ok(controller.signal.aborted);
  assert.ok(!chunks.some((c) => c.type === "finish"), chunks.map((c) => c.type).join(","));
  // Well before the 2,000 tokens asked for could be generated (minutes in a debug build).
  const deadline = Date.now() + 20_000;
  for (;;) {
    const metrics = await (await fetch(`${base}/metrics`)).text();
    if (/aitier_chat_active_generations\{provider="local"\} 0\n/.test(metrics)) break;
    assert.ok(Date.now() < deadline, "the generation went on after stop()");
    await new Promise((r) => setTimeout(r, 100));
  }
}

// An error: the server's message reaches the SDK's error.
await assert.rejects(
  run("/api/ai-sdk/chat", ask("Hi"), { model: "gpt-nope" }),
  (e) => /Unknown model 'gpt-nope'/.test(e.message),
);

// RAG: the sources come first, as source-document parts and one data-sources part.
{
  const collection = `sdk-${Date.now()}`;
  const ingested = await fetch(`${base}/api/rag/documents`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      collection,
      title: "Returns policy",
      content:
        "Customers may return any product within 30 days of delivery for a full refund. Refunds are paid to the original card within five business days.",
    }),
  });
  assert.equal(ingested.status, 201, await ingested.text());
  const { chunks, message } = await run(
    "/api/ai-sdk/rag",
    ask("How many days do I have to return a product?"),
    { collection, max_tokens: 40 },
  );
  const types = chunks.map((c) => c.type);
  const firstDelta = types.indexOf("text-delta");
  assert.ok(firstDelta > 0, types.join(","));
  assert.ok(types.indexOf("source-document") < firstDelta, types.join(","));
  assert.ok(types.indexOf("data-sources") < firstDelta, types.join(","));
  const source = message.parts.find((p) => p.type === "source-document");
  assert.equal(source.sourceId, "1");
  assert.equal(source.title, "Returns policy");
  const sources = message.parts.find((p) => p.type === "data-sources").data;
  assert.match(sources[0].excerpt, /30 days/);
  assert.ok(text(message).length > 0);
  // Nothing relevant: 404 before any stream, as the SDK's error.
  await assert.rejects(
    run("/api/ai-sdk/rag", ask("Who painted the Mona Lisa?"), { collection: `${collection}-empty` }),
    (e) => /No relevant documents/.test(e.message),
  );
}
console.log("ai-sdk: ok");
