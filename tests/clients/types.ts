// What a frontend writes against the types `openapi-typescript openapi.json` generates: it must
// compile. The chat events are a discriminated union on `type`, so each case narrows to its own
// fields and the `never` check fails to compile if the union gains a case this switch misses.
import type { components, paths } from "../../target/clients/api";

type ChatStreamEvent = components["schemas"]["ChatStreamEvent"];

export function render(event: ChatStreamEvent): string {
  switch (event.type) {
    case "delta":
      return event.content;
    case "done":
      return `${event.finish_reason}: ${event.usage.prompt_tokens} + ${event.usage.completion_tokens} tokens`;
    case "error":
      return `failed: ${event.message}`;
    case "sources":
      return event.sources.map((s, i) => `[${i + 1}] ${s.title} (${s.score.toFixed(2)})`).join("\n");
    default: {
      const unhandled: never = event;
      return unhandled;
    }
  }
}

/** A browser's SSE reader: `data:` lines in, typed events out. */
export async function* chat(
  body: paths["/api/chat/stream"]["post"]["requestBody"]["content"]["application/json"],
): AsyncGenerator<ChatStreamEvent> {
  const response = await fetch("/api/chat/stream", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const reader = response.body!.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end: number;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of frame.split("\n")) {
        if (line.startsWith("data: ")) yield JSON.parse(line.slice(6)) as ChatStreamEvent;
      }
    }
  }
}

export const question: Parameters<typeof chat>[0] = {
  messages: [{ role: "user", content: "What is the capital of France?" }],
  max_tokens: 64,
};
