// The page: an lmn export streamed in the browser with onnxruntime-web (WASM), through the same
// client library as the Node verifier (examples/node/lmn.mjs), reading only lmn.json.
//
// URL parameters: export=URL (default ../../runtime/default/), precision=P (default fp32),
// temperature=T, count=N; and the test hook: prompt=TEXT&greedy=N&autorun=1 feeds TEXT at once
// (as runtime.Stream.feed does), generates N tokens greedily, writes them to #result and sets
// <body data-done="1"> ("error" on a failure, with the message in #error).

import * as ort from "./node_modules/onnxruntime-web/dist/ort.wasm.min.mjs";
import { LmnError, loadModel } from "../node/lmn.mjs";

ort.env.wasm.numThreads = 1; // no cross-origin isolation needed; the model is small
ort.env.wasm.wasmPaths = new URL("./node_modules/onnxruntime-web/dist/", import.meta.url).href;

const params = new URLSearchParams(location.search);
const exportUrl = new URL(params.get("export") ?? "../../runtime/default/", location.href);
if (!exportUrl.pathname.endsWith("/")) exportUrl.pathname += "/";
const $ = (id) => document.getElementById(id);
const ui = {
  text: $("text"), generate: $("generate"), stop: $("stop"), reset: $("reset"), count: $("count"),
  temperature: $("temperature"), precision: $("precision"), skip: $("skip"), save: $("save"),
  upload: $("upload"), keep: $("keep"), restore: $("restore"), status: $("status"), info: $("info"),
  error: $("error"), result: $("result"),
};

let model = null;
let stream = null;
let fed = ""; // the text the stream has been fed (typed or generated), in order
let stopping = false;
let queue = Promise.resolve(); // one model operation at a time, in the order asked
let speed = "";

async function fetchFile(name) {
  const response = await fetch(new URL(name, exportUrl));
  if (!response.ok) throw new LmnError(`cannot fetch ${new URL(name, exportUrl)} (HTTP ${response.status})`);
  return new Uint8Array(await response.arrayBuffer());
}

function run(task) {
  queue = queue.then(task).catch((e) => {
    ui.error.textContent = e instanceof LmnError ? e.message : String(e.stack ?? e);
    console.error(e);
  });
  return queue;
}

function show(status) {
  ui.status.textContent = status;
  if (!stream) return;
  const calls = Object.entries(stream.calls).map(([file, n]) => `${file} ${n}`).join(", ");
  ui.info.textContent = `pointer ${stream.pointer} · ${stream.tokensSeen} tokens seen · state ` +
    `${model.manifest.state.bytes_per_stream} bytes${speed ? " · " + speed : ""}${calls ? " · graph calls: " + calls : ""}`;
}

function enable(on) {
  for (const el of [ui.text, ui.generate, ui.reset, ui.save, ui.upload, ui.keep, ui.restore, ui.precision]) el.disabled = !on;
}

async function open(precision) {
  enable(false);
  show(`Loading ${precision} graphs from ${exportUrl.href}…`);
  try {
    model = await loadModel({ ort, fetchFile, precision, unknown: ui.skip.checked ? "skip" : undefined });
  } finally {
    enable(model !== null); // a failed switch keeps the model and stream it had
  }
  stream = model.stream();
  fed = "";
  ui.precision.replaceChildren(...model.precisions.map((p) =>
    new Option(p === "fp32" ? p : `${p} (run-time int8 activations: logits within 1.0 of onnxruntime CPU)`, p, false, p === precision)));
  const quantized = model.stepGraph.quantization;
  const tolerance = quantized ? await conformanceTolerance(precision) : null;
  $("precision-note").textContent = quantized
    ? `${precision}: weights ${quantized.bits}-bit (${quantized.kind}); activations ${quantized.activations}. ` +
      "onnxruntime-web's int8 kernels round the activations their own way: on the shipped model its logits differ by " +
      "0.15 to 0.5 from onnxruntime CPU's, within conformance.json's tolerance for this precision" +
      (tolerance ? ` (${tolerance.logits_atol} per logit, ${100 * tolerance.min_argmax_agreement}% argmax agreement, near-tie flips excused)` : "") +
      ", so continuations may differ from the Python runtime's where two tokens are nearly tied. fp32 matches within 2e-4."
    : "";
  enable(true);
  show(`Ready: ${model.manifest.model.arch} model, ${model.vocab.size} tokens (${model.vocab.section.unit}s), ` +
    `${precision} graphs. Type, then Enter.`);
}

/** conformance.json's `tolerances[precision]` (the bound this precision's logits conform to), or null without the file. */
async function conformanceTolerance(precision) {
  try {
    return JSON.parse(new TextDecoder().decode(await fetchFile("conformance.json"))).tolerances?.[precision] ?? null;
  } catch {
    return null;
  }
}

/** Feed what the text area holds beyond what the stream has seen; an edit before its end starts over. */
async function sync() {
  const text = ui.text.value;
  if (!text.startsWith(fed)) {
    stream.reset();
    fed = "";
  }
  const more = text.slice(fed.length);
  if (!more) return;
  ui.error.textContent = "";
  await stream.feed(more); // raises (nothing fed) on a character outside the vocabulary, policy "error"
  fed = text;
  show("Fed.");
}

async function generate(count, temperature) {
  await sync();
  if (stream.logits === null) {
    // generating from nothing feeds lmn.json vocabulary.start; show it in the text as well
    ui.text.value = model.manifest.vocabulary.start.text;
    await sync();
  }
  stopping = false;
  ui.text.readOnly = true;
  ui.stop.disabled = false;
  let out = "";
  const began = performance.now();
  let tokens = 0;
  try {
    for await (const chars of stream.generate(count, { temperature })) {
      out += chars;
      fed += chars;
      ui.text.value = fed;
      tokens++;
      if (tokens % 8 === 0) {
        ui.text.scrollTop = ui.text.scrollHeight;
        await new Promise((resolve) => setTimeout(resolve)); // let the page paint and take a Stop
      }
      if (stopping) break;
    }
  } finally {
    ui.text.readOnly = false;
    ui.stop.disabled = true;
    speed = `${(tokens / ((performance.now() - began) / 1000)).toFixed(0)} tokens/s`;
    show(`Generated ${tokens} tokens.`);
  }
  return out;
}

function temperature() {
  const t = Number(ui.temperature.value);
  if (!(t >= 0)) throw new LmnError("temperature must be a number >= 0");
  return t;
}

// ---- state: download / upload (the Python runtime's state-file format) and browser storage ----

const storageKey = () => `lmn-state:${model.manifest.integrity.sha256}`;

async function saved() {
  await sync();
  return stream.saveState({ transcript: fed }); // `transcript`: an extra header field the Python runtime ignores
}

async function restore(bytes) {
  const header = await stream.loadState(bytes);
  fed = ui.text.value = header.transcript ?? "";
  show(`Restored a state of ${header.tokens_seen} tokens${header.transcript === undefined ? " (the file holds no text)" : ""}.`);
}

const base64 = {
  encode: (bytes) => btoa(Array.from(bytes, (b) => String.fromCharCode(b)).join("")),
  decode: (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0)),
};

ui.save.onclick = () => run(async () => {
  const bytes = await saved();
  const link = Object.assign(document.createElement("a"), {
    href: URL.createObjectURL(new Blob([bytes], { type: "application/octet-stream" })), download: "stream.lmnstate",
  });
  link.click();
  URL.revokeObjectURL(link.href);
  show(`Saved ${bytes.length} bytes.`);
});
ui.upload.onchange = () => run(async () => {
  const file = ui.upload.files[0];
  if (file) await restore(new Uint8Array(await file.arrayBuffer()));
  ui.upload.value = "";
});
ui.keep.onclick = () => run(async () => {
  const bytes = await saved();
  localStorage.setItem(storageKey(), base64.encode(bytes));
  show(`Kept ${bytes.length} bytes in this browser.`);
});
ui.restore.onclick = () => run(async () => {
  const text = localStorage.getItem(storageKey());
  if (!text) throw new LmnError("this browser keeps no state for this model yet");
  await restore(base64.decode(text));
});

// ---- typing and buttons ----

ui.text.addEventListener("input", () => run(sync));
ui.text.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    ui.generate.click();
  }
});
ui.generate.onclick = () => run(() => generate(Math.max(1, Number(ui.count.value) | 0), temperature()));
ui.stop.onclick = () => (stopping = true);
ui.reset.onclick = () => run(async () => {
  stream.reset();
  fed = ui.text.value = "";
  speed = "";
  show("Reset: an empty stream.");
});
ui.precision.onchange = () => run(() => open(ui.precision.value).then(sync));
ui.skip.onchange = () => run(() => open(model.precision).then(sync));

// ---- start, and the test hook ----

$("export").textContent = exportUrl.href;
if (params.has("temperature")) ui.temperature.value = params.get("temperature");
if (params.has("count")) ui.count.value = params.get("count");

run(async () => {
  await open(params.get("precision") ?? "fp32");
  if (params.get("autorun") !== "1") return;
  const prompt = params.get("prompt") ?? "";
  const greedy = Number(params.get("greedy") ?? "0");
  ui.text.value = prompt;
  await sync(); // the whole prompt at once: a prefill graph for a long one, as runtime.Stream.feed
  ui.result.textContent = await generate(greedy, 0);
  ui.result.hidden = false;
  ui.result.dataset.calls = JSON.stringify(stream.calls);
  document.body.dataset.done = "1";
}).then(() => {
  if (params.get("autorun") === "1" && document.body.dataset.done !== "1") document.body.dataset.done = "error";
});
