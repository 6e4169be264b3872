// The official openai npm client against aitier's /v1: models, a completion, a stream, embeddings.
//   node tests/clients/openai.mjs http://127.0.0.1:PORT CHAT_MODEL EMBEDDING_MODEL
import assert from "node:assert/strict";
import OpenAI from "openai";

const [base, chatModel, embeddingModel] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused" });

const ids = [];
for await (const model of client.models.list()) ids.push(model.id);
assert.ok(ids.includes(chatModel) && ids.includes(embeddingModel), ids.join(", "));

const messages = [
  { role: "user", content: "What is the capital of France? Answer in one sentence." },
];
const full = await client.chat.completions.create({ model: chatModel, messages, max_tokens: 48 });
assert.match(full.choices[0].message.content, /Paris/);
assert.equal(full.choices[0].finish_reason, "stop");
assert.ok(full.usage.completion_tokens > 0);

const stream = await client.chat.completions.create({
  model: chatModel,
  messages,
  max_tokens: 48,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let usage;
for await (const chunk of stream) {
  text += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
assert.equal(text, full.choices[0].message.content);
assert.deepEqual(usage, full.usage);

const embeddings = await client.embeddings.create({ model: embeddingModel, input: ["hello", "world"] });
assert.equal(embeddings.data.length, 2);
assert.equal(embeddings.data[0].embedding.length, 384);

// An unknown model is OpenAI's NotFoundError, with its code.
await assert.rejects(
  client.chat.completions.create({ model: "gpt-nonexistent", messages }),
  (error) => error instanceof OpenAI.NotFoundError && error.code === "model_not_found",
);
console.log("ok");
