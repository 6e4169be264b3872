// Playwright for the page at `/`: Debian's Chromium (no browser download) against real aitier
// servers with the real models, which global-setup.js starts and stops. One worker: the tests share
// the servers and some read server-wide gauges.
import { defineConfig } from "@playwright/test";
import { CHROMIUM } from "./chromium.js";

export default defineConfig({
  testDir: "./tests",
  globalSetup: "./global-setup.js",
  workers: 1,
  fullyParallel: false,
  forbidOnly: true,
  retries: 0,
  // A debug build on 2 cores: loading the models and a first token can take many seconds.
  timeout: 5 * 60_000,
  expect: { timeout: 120_000 },
  reporter: [["list"]],
  outputDir: "../../target/browser-results",
  use: {
    browserName: "chromium",
    headless: true,
    launchOptions: {
      executablePath: CHROMIUM,
      args: [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    },
    actionTimeout: 60_000,
    navigationTimeout: 60_000,
    screenshot: "only-on-failure",
  },
});
