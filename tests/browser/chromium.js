// Where Chromium is: Debian's package, or CHROMIUM_PATH. Missing, the run fails — never skips.
import fs from "node:fs";

export const CHROMIUM = process.env.CHROMIUM_PATH || "/usr/bin/chromium";

export function requireChromium() {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(
      `Chromium is not at ${CHROMIUM}: the browser tests need Debian's chromium ` +
        "(`apt-get install -y chromium`; .ci/run installs it) or CHROMIUM_PATH pointing at one. " +
        "`npx playwright install` cannot download browsers here.",
    );
  }
}
