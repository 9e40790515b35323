#!/usr/bin/env node
// Run an export folder's conformance.json through onnxruntime-node, reading only lmn.json:
//
//   node examples/node/verify.mjs DIR [--precision P ...] [--json] [--cases FILE] [--ort node|web]
//
// --ort web runs the same cases through onnxruntime-web's WASM build (examples/web/node_modules,
// after `npm ci` there): the page's kernels, without a browser.
// DIR's conformance.json is checked against its sha256 in lmn.json first; --cases runs another
// file of the same format instead (not in lmn.json, so not checked: your own vectors).
// Exits 0 when every case passes, 1 when one differs beyond its precision's tolerance, 2 when the
// folder cannot be checked. Same rules and output as the Python runtime's `lmn-verify`.

import { readFile, realpath, stat } from "node:fs/promises";
import { join, sep } from "node:path";

import { LmnError, checkFile, insideFolder, judge, loadModel, readManifest, runCase } from "./lmn.mjs";

const USAGE = "usage: node verify.mjs DIR [--precision P ...] [--json] [--cases FILE] [--ort node|web]";

function parseArgs(argv) {
  const args = { directory: null, precisions: [], json: false, cases: null, ort: "node" };
  for (let k = 0; k < argv.length; k++) {
    const a = argv[k];
    if (a === "--json") args.json = true;
    else if (a === "--precision") args.precisions.push(argv[++k] ?? "");
    else if (a.startsWith("--precision=")) args.precisions.push(a.slice("--precision=".length));
    else if (a === "--cases") args.cases = argv[++k] ?? "";
    else if (a === "--ort" && ["node", "web"].includes(argv[k + 1])) args.ort = argv[++k];
    else if (a === "-h" || a === "--help") {
      console.log(USAGE);
      process.exit(0);
    } else if (!a.startsWith("-") && args.directory === null) args.directory = a;
    else throw new LmnError(`unexpected argument ${a}\n${USAGE}`);
  }
  if (args.directory === null) throw new LmnError(USAGE);
  return args;
}

async function loadOrt(which) {
  if (which === "node") return import("onnxruntime-node");
  const web = new URL("../web/node_modules/onnxruntime-web/dist/ort.wasm.min.mjs", import.meta.url);
  let ort;
  try {
    ort = await import(web.href);
  } catch {
    throw new LmnError("--ort web needs onnxruntime-web: run `npm ci` in examples/web");
  }
  ort.env.wasm.numThreads = 1; // as the page runs it
  return ort;
}

const MAX_FILE_BYTES = 1 << 30; // no file of an export folder comes near this

/** A regular file's bytes (stat before open: a FIFO, device or directory is refused, never read). */
async function readRegular(path) {
  let info;
  try {
    info = await stat(path);
  } catch (e) {
    throw new LmnError(`cannot read ${path} (${e.code ?? e.message}); is it an lmn export folder?`);
  }
  if (!info.isFile()) throw new LmnError(`${path} is not a regular file (a directory, FIFO or device); re-export the model`);
  if (info.size > MAX_FILE_BYTES) throw new LmnError(`${path} is ${info.size} bytes, more than any export file; re-export the model`);
  return new Uint8Array(await readFile(path));
}

/** A file of the export folder, refused where its real path (symlinks followed) leaves the folder. */
async function readInside(directory, name) {
  if (!insideFolder(name)) throw new LmnError(`${JSON.stringify(name.slice(0, 80))} is outside the export folder; re-export the model`);
  const path = join(directory, name);
  let root, real;
  try {
    [root, real] = [await realpath(directory), await realpath(path)];
  } catch (e) {
    throw new LmnError(`cannot read ${path} (${e.code ?? e.message}); is it an lmn export folder?`);
  }
  if (real !== root && !real.startsWith(root + sep))
    throw new LmnError(`${name} leads outside the export folder (a symlink to ${real}); re-export the model`);
  return readRegular(real);
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const ort = await loadOrt(args.ort);
  const backend = `onnxruntime-${args.ort} ${ort.env.versions[args.ort]}`;
  const fetchFile = (name) => readInside(args.directory, name);
  const manifest = await readManifest(fetchFile);
  const path = args.cases ?? join(args.directory, "conformance.json");
  let cases;
  try {
    const bytes = await readRegular(path);
    if (args.cases === null) await checkFile(manifest, "conformance.json", bytes);
    cases = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    if (e instanceof LmnError) throw e;
    throw new LmnError(`cannot read ${path} (${e.message}); re-export the model`);
  }
  if (cases.format !== "lmn-conformance" || cases.format_version !== 1)
    throw new LmnError("conformance.json is not an lmn-conformance file of version 1; re-export the model");
  const models = new Map();
  const results = [];
  for (const kase of cases.cases) {
    if (args.precisions.length && !args.precisions.includes(kase.precision)) continue;
    if (!models.has(kase.precision)) models.set(kase.precision, await loadModel({ ort, fetchFile, manifest, precision: kase.precision }));
    const observed = await runCase(models.get(kase.precision), kase);
    results.push(judge(kase, cases.tolerances[kase.precision], observed));
  }
  if (!results.length) throw new LmnError(`no conformance case of ${args.directory} has precision ${args.precisions.join(", ")}`);
  const passed = results.every((r) => r.passed);
  if (args.json) {
    console.log(JSON.stringify({ directory: args.directory, backend, passed, cases: results }, null, 2));
  } else {
    for (const r of results) {
      const gap = r.max_logit_gap === null ? "non-finite" : r.max_logit_gap.toPrecision(2);
      console.log(`${r.passed ? "ok  " : "FAIL"} ${r.precision.padEnd(13)} ${r.name.padEnd(28)} argmax agreement ` +
        `${(100 * r.argmax_agreement).toFixed(2)}%${r.excused_flips ? ` (${r.excused_flips} near-tie flip${r.excused_flips > 1 ? "s" : ""} excused)` : ""}, max logit gap ${gap}${r.detail ? ", " + r.detail : ""}`);
    }
    console.log(`${results.filter((r) => r.passed).length} of ${results.length} cases passed (${args.directory}, ${backend})`);
  }
  return passed ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    console.error(`error: ${e instanceof LmnError ? e.message : e.stack ?? e}`);
    process.exit(2);
  },
);
