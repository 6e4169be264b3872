// What every browser test shares: the servers' addresses, a page that fails its test on any console
// error or uncaught exception (except the HTTP errors a test provokes on purpose, which Chromium
// logs as "Failed to load resource"), and helpers that read the server behind the page.
import { test as base, expect } from "@playwright/test";

export { expect };

export const test = base.extend({
  /// Console errors a test expects (regular expressions), e.g. the 422 it provokes.
  expectedErrors: [[], { option: true }],
  server: [async ({}, use) => use(process.env.AITIER_URL), { option: true }],
  baseURL: async ({ server }, use) => use(server),
  page: async ({ page, expectedErrors }, use) => {
    const problems = [];
    page.on("console", (message) => {
      if (message.type() !== "error") return;
      const text = message.text();
      if (!expectedErrors.some((expected) => expected.test(text))) problems.push(`console error: ${text}`);
    });
    page.on("pageerror", (error) => problems.push(`uncaught: ${error.message}`));
    await use(page);
    expect(problems, "errors on the page").toEqual([]);
  },
});

/// The number of local generations the server is running now, from GET /metrics (null before the
/// chat engine has reported any).
export async function activeGenerations(server) {
  const text = await (await fetch(`${server}/metrics`)).text();
  const line = text.match(/^aitier_chat_active_generations\{provider="local"\} (\S+)$/m);
  return line ? Number(line[1]) : null;
}

/// A Server-Sent Events body of chat events, as the server writes them.
export function sse(events) {
  return events.map((event) => `data: ${JSON.stringify(event)}\n\n`).join("");
}

/// The chat section's parts.
export function chat(page) {
  const section = page.locator("#chat");
  return {
    message: section.getByLabel("Message"),
    send: section.getByRole("button", { name: "Send" }),
    stop: section.getByRole("button", { name: "Stop" }),
    answers: section.locator(".message.assistant"),
    error: page.locator("#chat-error"),
  };
}

/// Opens the page and waits until the model list has come from the server.
export async function open(page) {
  await page.goto("/");
  await expect(page.getByLabel("Model")).toContainText("SmolLM2");
}
