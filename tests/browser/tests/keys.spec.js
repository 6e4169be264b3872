// Against the server that asks for an API key and runs one generation at a time with no queue:
// the page asks for the key and works once it has it; a second generation is refused with 503.
import { test, expect, activeGenerations, chat } from "./fixtures.js";

const KEYED = () => process.env.AITIER_KEYED_URL;
const KEY = () => process.env.AITIER_KEY;

test.use({ server: async ({}, use) => use(KEYED()) });

test.describe("without a key", () => {
  test.use({ expectedErrors: [/status of 401/] });

  test("the page asks for the key, and works once it is given", async ({ page }) => {
    await page.goto("/");
    const box = page.locator("#key-box");
    await expect(box).toBeVisible();
    await expect(box.getByRole("alert")).toContainText("Not authenticated");
    await expect(page.locator("#settings-error")).toContainText("Could not list the models");

    await box.getByLabel("API key").fill(KEY());
    await box.getByRole("button", { name: "Use key" }).click();
    await expect(page.getByLabel("Model")).toContainText("SmolLM2");
    await expect(page.locator("#settings-error")).toBeHidden();
    expect(await page.evaluate(() => localStorage.getItem("aitier.apiKey"))).toBe(KEY());

    const c = chat(page);
    await page.getByLabel("Max tokens").fill("8");
    await c.message.fill("Say hello.");
    await c.message.press("Enter");
    await expect(c.answers.last().locator(".meta")).toContainText("completion tokens", { timeout: 180_000 });
    await expect(c.error).toBeHidden();

    // The key is kept: after a reload the page needs nothing more.
    await page.reload();
    await expect(page.getByLabel("Model")).toContainText("SmolLM2");
    await expect(box.getByRole("alert")).toHaveText("Using the key kept in this browser.");
  });
});

test.describe("with the only generation slot taken", () => {
  test.use({ expectedErrors: [/status of 503/] });

  test("a chat shows the server's 503", async ({ page }) => {
    await page.addInitScript((key) => localStorage.setItem("aitier.apiKey", key), KEY());
    // Another client holds the one slot: its stream has started generating.
    const holder = new AbortController();
    const response = await fetch(`${KEYED()}/api/chat/stream`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${KEY()}` },
      body: JSON.stringify({
        messages: [{ role: "user", content: "Count from 1 to 5000, one number per line." }],
        max_tokens: 4096,
      }),
      signal: holder.signal,
    });
    expect(response.status).toBe(200);
    const reader = response.body.getReader();
    let seen = "";
    while (!seen.includes('"type":"delta"')) {
      const { value, done } = await reader.read();
      expect(done, "the holding stream ended early").toBe(false);
      seen += new TextDecoder().decode(value);
    }
    try {
      await page.goto("/");
      await expect(page.getByLabel("Model")).toContainText("SmolLM2");
      const c = chat(page);
      await c.message.fill("Hello?");
      await c.message.press("Enter");
      await expect(c.error).toBeVisible();
      await expect(c.error).toContainText(/retry in \d+ s/);
      await expect(c.message).toHaveValue("Hello?");
      await expect(c.answers).toHaveCount(0);
    } finally {
      holder.abort();
      await reader.cancel().catch(() => {});
    }
    // Leave the server idle for the next test.
    await expect.poll(() => activeGenerations(KEYED()), { timeout: 60_000 }).toBe(0);
  });
});
