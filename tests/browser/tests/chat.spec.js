// Chat on the page against the real local model: streaming, Stop and Escape (the server cancels),
// errors, markdown; and the page at phone width.
import { test, expect, activeGenerations, chat, open, sse } from "./fixtures.js";

// A prompt SmolLM2 answers at length (greedy decoding repeats itself rather than stop): with a
// large max_tokens the generation runs for minutes unless it is cancelled.
const ENDLESS = "Count from 1 to 5000, one number per line.";

test("the answer streams in: text shows while the stream is open, then the usage", async ({ page }) => {
  await open(page);
  const c = chat(page);
  await page.getByLabel("Max tokens").fill("64");
  // Shift+Enter is a new line, not a send.
  await c.message.fill("Write a short story about a lighthouse keeper");
  await c.message.press("Shift+Enter");
  await c.message.pressSequentially("and a storm.");
  await expect(c.message).toHaveValue("Write a short story about a lighthouse keeper\nand a storm.");
  await expect(c.answers).toHaveCount(0);
  await c.message.press("Enter");

  // Checked in one go in the page: some answer text, Stop still enabled, no usage yet.
  const partial = await page.waitForFunction(() => {
    const answer = document.querySelector("#chat-log .message.assistant .answer");
    const meta = document.querySelector("#chat-log .message.assistant .meta");
    const streaming = !document.getElementById("stop").disabled && meta.textContent === "";
    const text = answer ? answer.textContent : "";
    return text.length > 0 && streaming ? text : null;
  }, null, { timeout: 180_000 });
  const partialText = await partial.jsonValue();

  const meta = c.answers.last().locator(".meta");
  await expect(meta).toContainText(/\d+ prompt \+ \d+ completion tokens/, { timeout: 240_000 });
  await expect(c.stop).toBeDisabled();
  await expect(c.send).toBeEnabled();
  const finalText = await c.answers.last().locator(".answer").textContent();
  expect(finalText.length).toBeGreaterThan(partialText.length);
  // The user's message stays in the conversation, and the context it uses is counted.
  await expect(page.locator("#chat-log .message.user")).toContainText("lighthouse keeper");
  const prompt = Number((await meta.textContent()).match(/(\d+) prompt/)[1]);
  const context = page.locator("#chat-context");
  await expect(context).toHaveText(/^Context: \d+ of 8192 tokens$/);
  // The whole conversation (question and answer) counts more than the question's prompt did.
  const used = Number((await context.textContent()).match(/Context: (\d+)/)[1]);
  expect(used).toBeGreaterThan(prompt);
});

for (const how of ["the Stop button", "Escape"]) {
  test(`${how} ends the generation on the server`, async ({ page, server }) => {
    await open(page);
    const c = chat(page);
    await page.getByLabel("Max tokens").fill("4096");
    await c.message.fill(ENDLESS);
    await c.send.click();
    const answer = c.answers.last();
    await expect(answer.locator(".answer")).not.toHaveText("", { timeout: 180_000 });
    await expect(c.stop).toBeEnabled();
    // The server is generating it now.
    await expect.poll(() => activeGenerations(server), { timeout: 30_000 }).toBe(1);

    if (how === "Escape") await page.keyboard.press("Escape");
    else await c.stop.click();

    await expect(answer.locator(".meta")).toHaveText("Stopped.");
    await expect(c.stop).toBeDisabled();
    // Thousands of tokens were asked for: only a cancellation frees the engine this soon.
    await expect
      .poll(() => activeGenerations(server), { timeout: 30_000, intervals: [100, 250, 500] })
      .toBe(0);
  });
}

test.describe("a refused request", () => {
  test.use({ expectedErrors: [/status of 422/] });

  test("shows the 422 detail and gives the message back", async ({ page }) => {
    await open(page);
    const c = chat(page);
    const long = "x".repeat(100_001);
    await c.message.fill(long);
    await c.message.press("Enter");
    await expect(c.error).toBeVisible();
    await expect(c.error).toContainText("messages.0.content");
    await expect(c.answers).toHaveCount(0);
    await expect(c.message).toHaveValue(long);
    await expect(c.send).toBeEnabled();
  });
});

test("an error event mid-stream shows, and the partial answer stays", async ({ page }) => {
  await page.route("**/api/chat/stream", (route) =>
    route.fulfill({
      status: 200,
      headers: { "content-type": "text/event-stream" },
      body: sse([
        { type: "delta", content: "The first half" },
        { type: "error", message: "The chat upstream failed" },
      ]),
    }));
  await open(page);
  const c = chat(page);
  await c.message.fill("Hello");
  await c.message.press("Enter");
  await expect(c.error).toHaveText("The chat upstream failed");
  await expect(c.answers.last().locator(".answer")).toHaveText("The first half");
  await expect(c.answers.last().locator(".meta")).toHaveText("Failed.");
});

test("the answer's markdown is rendered and sanitised", async ({ page }) => {
  const markdown = [
    "Some **bold**, *italic* and `<b>code</b>`.",
    "",
    "- one",
    "- two with [a link](https://example.com/a_b_c)",
    "",
    "1. first",
    "2. second",
    "",
    "```",
    "<script>window.hacked = 1</script>",
    "```",
    "",
    '<img src=x onerror="window.hacked = 2"> [bad](javascript:window.hacked=3) <a href="https://evil.example">raw</a>',
  ].join("\n");
  await page.route("**/api/chat/stream", (route) =>
    route.fulfill({
      status: 200,
      headers: { "content-type": "text/event-stream" },
      body: sse([
        ...markdown.match(/[\s\S]{1,7}/g).map((content) => ({ type: "delta", content })),
        { type: "done", finish_reason: "stop", usage: { prompt_tokens: 5, completion_tokens: 40 } },
      ]),
    }));
  await open(page);
  const c = chat(page);
  await c.message.fill("Show me markdown");
  await c.message.press("Enter");
  const answer = c.answers.last().locator(".answer");
  await expect(c.answers.last().locator(".meta")).toHaveText("5 prompt + 40 completion tokens · stop");

  await expect(answer.locator("strong")).toHaveText("bold");
  await expect(answer.locator("em")).toHaveText("italic");
  await expect(answer.locator("p code")).toHaveText("<b>code</b>");
  await expect(answer.locator("ul > li")).toHaveCount(2);
  await expect(answer.locator("ol > li")).toHaveCount(2);
  await expect(answer.locator("pre code")).toHaveText("<script>window.hacked = 1</script>");
  const links = answer.locator("a");
  await expect(links).toHaveCount(1);
  await expect(links).toHaveAttribute("href", "https://example.com/a_b_c");
  await expect(links).toHaveAttribute("rel", "noopener noreferrer");
  // The rest is text, shown as written.
  await expect(answer).toContainText('<img src=x onerror="window.hacked = 2">');
  await expect(answer).toContainText("[bad](javascript:window.hacked=3)");
  expect(await answer.locator("img, script, b").count()).toBe(0);
  expect(await page.evaluate(() => window.hacked)).toBeUndefined();
});

test("the page fits a phone's width", async ({ page }) => {
  await page.setViewportSize({ width: 360, height: 740 });
  await open(page);
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  expect(overflow).toBeLessThanOrEqual(0);
  const c = chat(page);
  await expect(c.send).toBeVisible();
  const box = await c.message.boundingBox();
  expect(box.width).toBeGreaterThan(250);
});
