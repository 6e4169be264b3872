// Documents on the page against the real embedding and chat models: an uploaded .txt becomes
// searchable, and an answer's numbered sources show before its first word.
import { test, expect, sse } from "./fixtures.js";

const FACT = [
  "The Zorblax 3000 is a burr coffee grinder made by Quellwater Appliances.",
  "Every Zorblax 3000 comes with a warranty of seventeen months from the date of purchase.",
  "Its hopper holds 340 grams of beans and it grinds in eleven settings.",
].join("\n");
const QUESTION = "How long is the warranty of the Zorblax 3000 coffee grinder?";

test.describe("an uploaded text file", () => {
  // Asked before the upload, the new collection has nothing: 404.
  test.use({ expectedErrors: [/status of 404/] });

  test("becomes searchable, and the sources show before the answer", async ({ page }) => {
    const collection = `browser-${Date.now()}`;
    await page.goto("/");
    const rag = page.locator("#rag");
    await rag.getByLabel("Collection", { exact: true }).fill(collection);
    await page.getByLabel("Max tokens").fill("48");

    await rag.getByLabel("Question").fill(QUESTION);
    await rag.getByRole("button", { name: "Ask" }).click();
    await expect(page.locator("#rag-error")).toHaveText("No relevant documents found in the collection");

    await rag.getByLabel("Upload a .txt or .md file").setInputFiles({
      name: "zorblax.txt",
      mimeType: "text/plain",
      buffer: Buffer.from(FACT),
    });
    await expect(rag.getByLabel("Or paste the text")).toHaveValue(FACT);
    await expect(rag.getByLabel("Title")).toHaveValue("zorblax.txt");
    await rag.getByRole("button", { name: "Add document" }).click();
    await expect(page.locator("#ingest-status")).toHaveText(
      new RegExp(`^Added “zorblax\\.txt” to ${collection} \\(\\d+ chunks?\\)\\.$`));
    await expect(rag.getByRole("button", { name: `${collection} · 1 document` })).toBeVisible();

    // Records, in the order the page made them, the first text added to the sources and to the
    // answer (one observer: its records keep the order of the changes).
    await page.evaluate(() => {
      window.appeared = [];
      const sources = document.getElementById("rag-sources");
      const answer = document.getElementById("rag-answer");
      new MutationObserver((records) => {
        for (const record of records) {
          const added = [...record.addedNodes].some((node) => node.textContent.trim());
          if (!added) continue;
          for (const [what, element] of [["sources", sources], ["answer", answer]]) {
            if (element.contains(record.target) && !window.appeared.includes(what)) window.appeared.push(what);
          }
        }
      }).observe(document.getElementById("rag-result"), { childList: true, subtree: true });
    });
    await rag.getByLabel("Question").press("Enter");
    await expect(page.locator("#rag-error")).toBeHidden();
    const sources = page.locator("#rag-sources > li");
    await expect(sources.first()).toContainText("zorblax.txt");
    await expect(sources.first()).toContainText("seventeen months");
    await expect(page.locator("#rag-meta")).toContainText(/\d+ prompt \+ \d+ completion tokens/, { timeout: 240_000 });
    await expect(page.locator("#rag-answer")).not.toHaveText("");
    expect(await page.evaluate(() => window.appeared)).toEqual(["sources", "answer"]);
  });
});

test("citations in an answer link to their sources", async ({ page }) => {
  await page.route("**/api/rag/query", (route) =>
    route.fulfill({
      status: 200,
      headers: { "content-type": "text/event-stream" },
      body: sse([
        {
          type: "sources",
          sources: [
            { id: 7, title: "Returns policy", excerpt: "Returns within 30 days.", score: 0.81 },
            { id: 9, title: "Shipping", excerpt: "Ships in 2 days.", score: 0.52 },
          ],
        },
        { type: "delta", content: "You have 30 days [1], and it ships fast [2]. Not [3]." },
        { type: "done", finish_reason: "stop", usage: { prompt_tokens: 50, completion_tokens: 14 } },
      ]),
    }));
  await page.goto("/");
  const rag = page.locator("#rag");
  await rag.getByLabel("Question").fill("How long do I have?");
  await rag.getByLabel("Question").press("Enter");
  await expect(page.locator("#rag-meta")).toHaveText("50 prompt + 14 completion tokens · stop");
  const cites = page.locator("#rag-answer a.cite");
  await expect(cites).toHaveCount(2);
  await expect(cites.nth(0)).toHaveAttribute("href", "#rag-source-1");
  await expect(cites.nth(1)).toHaveAttribute("href", "#rag-source-2");
  // [3] names no source: it stays text.
  await expect(page.locator("#rag-answer")).toContainText("Not [3].");
  await cites.nth(1).click();
  await expect(page.locator("#rag-source-2")).toContainText("Shipping");
  expect(await page.evaluate(() => location.hash)).toBe("#rag-source-2");
});
