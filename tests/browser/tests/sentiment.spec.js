// The sentiment box against the real classifier: the label, and a bar per score.
import { test, expect } from "./fixtures.js";

for (const [text, label] of [
  ["I love this, it is wonderful!", "positive"],
  ["The delivery was late and the box was damaged.", "negative"],
]) {
  test(`"${text}" shows as ${label}`, async ({ page }) => {
    await page.goto("/");
    const box = page.locator("#sentiment");
    await box.getByLabel("Text").fill(text);
    await box.getByLabel("Text").press("Enter");
    await expect(page.locator("#sentiment-label")).toHaveText(new RegExp(`^${label} \\d+%$`));
    const bars = box.getByRole("meter");
    await expect(bars).toHaveCount(3);
    // The largest bar comes first and is the label's.
    await expect(bars.first()).toHaveAccessibleName(label);
    const values = await bars.evaluateAll((meters) => meters.map((m) => m.value));
    expect(values.reduce((a, b) => a + b, 0)).toBeCloseTo(1, 2);
    expect(values).toEqual([...values].sort((a, b) => b - a));
  });
}
