// Starts the servers the browser tests use and returns their teardown:
//   AITIER_URL        the default server: every default model, two model aliases, no key, its
//                     own SQLite file;
//   AITIER_KEYED_URL  one that asks for AITIER_KEY and runs one generation at a time with no
//                     queue (a second one gets 503 at once).
// Each listens on a port the OS picks (--port 0): its address is read from its JSON log line
// `listening`. Both are stopped after the run, and killed if the runner exits first.
import { spawn } from "node:child_process";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import readline from "node:readline";
import { requireChromium } from "./chromium.js";

const ROOT = path.resolve(import.meta.dirname, "../..");
const BIN = path.resolve(ROOT, process.env.AITIER_BIN || "target/debug/aitier");
export const KEY = "browser-test-key-0123456789abcdef";
/// Loading and warming every model in a debug build, two servers at once on 2 cores.
const READY_WITHIN_MS = 10 * 60_000;

const running = new Set();
process.on("exit", () => {
  for (const child of running) child.kill("SIGKILL");
});

async function start(name, flags, env = {}) {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), `aitier-browser-${name}-`));
  const logPath = path.join(dir, "server.log");
  const log = fs.createWriteStream(logPath);
  const child = spawn(
    BIN,
    [
      "serve",
      "--port", "0",
      "--log-format", "json",
      "--database-url", `sqlite://${dir}/rag.db`,
      "--shutdown-timeout-secs", "5",
      ...flags,
    ],
    // The default model paths are relative to the repository.
    { cwd: ROOT, env: { ...process.env, ...env }, stdio: ["ignore", "pipe", "pipe"] },
  );
  running.add(child);
  child.stderr.pipe(log);
  const exited = new Promise((resolve) => child.once("exit", (code, signal) => resolve({ code, signal })));
  const tail = () => fs.readFileSync(logPath, "utf8").split("\n").slice(-20).join("\n");

  const address = await new Promise((resolve, reject) => {
    const lines = readline.createInterface({ input: child.stdout });
    lines.on("line", (line) => {
      log.write(line + "\n");
      let record;
      try { record = JSON.parse(line); } catch { return; }
      const fields = record.fields ?? record;
      if (fields.message === "listening" && fields.addr) resolve(fields.addr);
    });
    exited.then(({ code, signal }) =>
      reject(new Error(`aitier (${name}) exited (${signal ?? code}) before listening:\n${tail()}`)));
    child.once("error", (e) => reject(new Error(`cannot run ${BIN} (build it with cargo build): ${e.message}`)));
  });
  const url = `http://${address}`;

  const deadline = Date.now() + READY_WITHIN_MS;
  for (;;) {
    const status = await fetch(`${url}/health/ready`).then((r) => r.status, () => 0);
    if (status === 200) break;
    if (child.exitCode !== null) throw new Error(`aitier (${name}) exited while loading:\n${tail()}`);
    if (Date.now() > deadline) throw new Error(`aitier (${name}) was not ready within ${READY_WITHIN_MS / 1000} s:\n${tail()}`);
    await new Promise((r) => setTimeout(r, 250));
  }

  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const killed = setTimeout(() => child.kill("SIGKILL"), 15_000);
      await exited;
      clearTimeout(killed);
    }
    running.delete(child);
    fs.rmSync(dir, { recursive: true, force: true });
  };
  return { url, stop };
}

export default async function globalSetup() {
  requireChromium();
  if (!fs.existsSync(BIN)) throw new Error(`${BIN} is missing: run cargo build (or set AITIER_BIN)`);
  const servers = await Promise.allSettled([
    // Aliases as a frontend written for OpenAI's names would use them: the picker offers the
    // chat one, not the embedding one.
    start("default", [
      "--model-aliases", "gpt-4o-mini=SmolLM2-135M-Instruct,text-embedding-3-small=all-MiniLM-L6-v2",
    ]),
    start("keyed", ["--max-concurrent-generations", "1", "--generation-queue", "0"], {
      AITIER_API_KEYS: KEY,
    }),
  ]);
  const stopAll = () => Promise.all(servers.filter((s) => s.status === "fulfilled").map((s) => s.value.stop()));
  const failed = servers.find((s) => s.status === "rejected");
  if (failed) {
    await stopAll();
    throw failed.reason;
  }
  process.env.AITIER_URL = servers[0].value.url;
  process.env.AITIER_KEYED_URL = servers[1].value.url;
  process.env.AITIER_KEY = KEY;
  return stopAll;
}
