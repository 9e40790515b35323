#!/usr/bin/env node
// Open the page in headless Chromium and print what its test hook produced, as JSON:
//
//   node examples/web/drive.mjs URL [--chromium /usr/bin/chromium] [--timeout-ms 30000]
//
// URL is the page with ?prompt=...&greedy=N&autorun=1 (served over http); prints
// {"done": "1" | "error" | null, "result": text, "calls": {...}, "error": text, "console": [...]}.
// Exits 0 when the page finished, 1 when it failed or timed out.

import { chromium } from "playwright-core";

const args = process.argv.slice(2);
const option = (name, fallback) => {
  const k = args.indexOf(name);
  return k >= 0 ? args.splice(k, 2)[1] : fallback;
};
const executablePath = option("--chromium", "/usr/bin/chromium");
const timeout = Number(option("--timeout-ms", "30000"));
const url = args[0];
if (!url) {
  console.error("usage: node drive.mjs URL [--chromium PATH] [--timeout-ms MS]");
  process.exit(2);
}

// Flags for a root user in a container: no sandbox, no GPU, nothing fetched behind the page's back.
const browser = await chromium.launch({
  executablePath,
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"],
});
const logs = [];
let report;
try {
  const page = await browser.newPage();
  page.on("console", (m) => logs.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => logs.push(`pageerror: ${e.message}`));
  await page.goto(url);
  try {
    await page.waitForSelector("body[data-done]", { timeout });
  } catch {
    // reported below as done: null
  }
  report = await page.evaluate(() => ({
    done: document.body.dataset.done ?? null,
    result: document.getElementById("result").textContent,
    calls: JSON.parse(document.getElementById("result").dataset.calls ?? "{}"),
    error: document.getElementById("error").textContent,
    status: document.getElementById("status").textContent,
  }));
} finally {
  await browser.close();
}
console.log(JSON.stringify({ ...report, console: logs }));
process.exit(report.done === "1" ? 0 : 1);
