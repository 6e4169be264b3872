// The page itself: served with its security headers, and quiet — no console error, no uncaught
// exception (the fixture fails any test that logs one; this one exercises the page at rest).
import { test, expect, open } from "./fixtures.js";

test("the page loads with its headers, its lists, and no console errors", async ({ page }) => {
  const violations = [];
  await page.exposeFunction("reportViolation", (v) => violations.push(v));
  await page.addInitScript(() =>
    document.addEventListener("securitypolicyviolation", (e) => window.reportViolation(e.violatedDirective)));
  const response = await page.goto("/");
  expect(response.status()).toBe(200);
  expect(response.headers()["content-security-policy"]).toMatch(/^default-src 'self';/);
  expect(response.headers()["x-content-type-options"]).toBe("nosniff");
  await open(page);
  // The chat models and their aliases are offered; the embedding model and its alias are not.
  await expect(page.getByLabel("Model").locator("option")).toHaveText([
    "SmolLM2-135M-Instruct",
    "gpt-4o-mini (→ SmolLM2-135M-Instruct)",
  ]);
  await expect(page.getByRole("heading", { name: "Chat" })).toBeVisible();
  await expect(page.locator("#key-box")).toBeHidden();
  await expect(page.locator("#settings-error")).toBeHidden();
  await expect(page.locator("#rag-error")).toBeHidden();
  expect(violations).toEqual([]);
});
