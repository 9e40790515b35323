// lmn.mjs: a client for lmn export folders (manifest format 4), written from lmn.json alone.
//
// Runs in Node (onnxruntime-node) and in a browser (onnxruntime-web): the caller passes the `ort`
// module and `fetchFile(name) -> Promise<Uint8Array>`; nothing here imports a platform module.
//
//   const model = await loadModel({ ort, fetchFile, precision: "fp32" });
//   const stream = model.stream();            // the initial state; stream({ pointer: 5n }) starts at p
//   await stream.feed("ROMEO:\n");            // prefill graphs for a long enough chunk (at any pointer), else steps
//   for await (const char of stream.generate(200, { temperature: 0 })) process.stdout.write(char);
//   const saved = await stream.saveState();   // bytes in the Python runtime's state-file format
//
// What comes from lmn.json: the graphs by name/precision/levels/size, every tensor by its role,
// state tensors and their initial value (`state.tensors`), the pointer tensor and its bound
// (`pointer`, decimal strings -> BigInt), the fast-path rule (`fast_paths`), the prefill rule
// (`prefill`), the vocabulary (unit, tokens, id range, start token, unknown policy) and file digests.
// Pointers and int64 tensors are BigInt / BigInt64Array throughout.

export const MANIFEST = "lmn.json";
export const FORMAT = "lmn-export";
export const FORMAT_VERSION = 4;

/** An export folder, argument or stream operation this client refuses; the message says what to do. */
export class LmnError extends Error {
  constructor(message) {
    super(message);
    this.name = "LmnError";
  }
}

const STATE_MAX_HEADER_BYTES = 1 << 16; // as runtime/state_file.py MAX_HEADER_BYTES
const ARRAYS = { float32: Float32Array, float16: Uint16Array, int64: BigInt64Array, int32: Int32Array };

// ---- digests -------------------------------------------------------------------------------

async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest("SHA-256", bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

const PLACEHOLDER = new TextEncoder().encode("0".repeat(64));

/**
 * Why the bytes of lmn.json fail lmn.json `integrity` (null when they pass): its sha256 is over the
 * bytes as written, with the digest's own 64 hex digits (found exactly once) replaced by 64 "0".
 */
export async function integrityError(bytes, manifest) {
  const digest = manifest.integrity?.sha256;
  if (typeof digest !== "string") return "carries no integrity check (written by an older lmn-export); re-export the model";
  const needle = new TextEncoder().encode(digest);
  const at = [];
  for (let i = 0; i + needle.length <= bytes.length && at.length < 2; i++)
    if (needle.every((b, k) => bytes[i + k] === b)) at.push(i);
  if (!/^[0-9a-f]{64}$/.test(digest) || at.length !== 1)
    return "has an integrity.sha256 that is not 64 lowercase hex digits found exactly once in the file; re-export the model";
  const blanked = Uint8Array.from(bytes);
  blanked.set(PLACEHOLDER, at[0]);
  if ((await sha256Hex(blanked)) !== digest)
    return "was modified after export (its bytes, re-serializations included, do not match its own sha256); " +
      "re-export the model, or restore the folder";
  return null;
}

// ---- the manifest --------------------------------------------------------------------------

function need(condition, message) {
  if (!condition) throw new LmnError(`${MANIFEST}: ${message}; re-export the model`);
}

/**
 * Whether a file name from lmn.json stays inside the export folder: a relative path of plain segments
 * (no "..", ".", empty or absolute part, no backslash, drive, URL scheme, query or %-escape that a
 * fetch could resolve elsewhere). A symlink leaving the folder is the reader's to refuse (verify.mjs does).
 */
export function insideFolder(name) {
  return typeof name === "string" && name.length > 0 && name.length <= 255 && !/[\\:%?#\0]/.test(name) &&
    name.split("/").every((part) => part !== "" && part !== "." && part !== "..");
}

/** The fields this client reads are present and coherent (lmn.schema.json has the full rules). */
function checkManifest(m) {
  if (m?.format !== FORMAT) throw new LmnError(`${MANIFEST} is not an lmn export manifest (format ${JSON.stringify(m?.format)})`);
  if (m.format_version !== FORMAT_VERSION)
    throw new LmnError(`${MANIFEST} has manifest format ${m.format_version}; this client reads format ${FORMAT_VERSION}: ` +
      "re-export the model with the current lmn-export");
  const v = m.vocabulary;
  need(v && ["chars", "bytes"].includes(v.kind), "vocabulary.kind must be chars or bytes");
  need(v.token_ids?.min === 0 && Number.isInteger(v.token_ids?.max) && v.token_ids.max === v.size - 1,
    "vocabulary.token_ids must be 0..size-1");
  need(v.kind === "bytes" || [...v.tokens].length === v.size, "vocabulary.tokens must hold `size` code points");
  need(Array.isArray(v.start?.ids) && v.start.ids.length > 0, "vocabulary.start.ids is missing");
  need(Array.isArray(m.state?.tensors) && m.state.tensors.every((t) => t.initial === 0), "state.tensors with initial 0");
  need(m.files && typeof m.files === "object" && Array.isArray(m.graphs), "files and graphs are missing");
  for (const name of [...Object.keys(m.files), ...m.graphs.map((g) => g.file)])
    need(insideFolder(name), `it lists ${JSON.stringify(String(name).slice(0, 80))}, outside the export folder (a '..', ` +
      "absolute path or symlink)");
  need(m.state.tensors.some((t) => t.name === m.pointer?.tensor), "pointer.tensor must name a state tensor");
  need(/^(0|[1-9][0-9]{0,18})$/.test(m.pointer.max ?? ""), "pointer.max must be a decimal string");
  if (m.fast_paths) {
    const f = m.fast_paths;
    need(f.graph === "step_levels" && f.pointer === "input" && f.rows === "all" && f.fallback === "step" &&
      f.levels === "min(trailing_zeros(pointer + 1), levels_cap)", "fast_paths is not the rule this client knows");
  }
  if (m.prefill) {
    const p = m.prefill;
    need(p.graph === "prefill" && p.starts_from === "any state" && p.length_min === 1 && p.length_max === "size" &&
      p.logits_position === "length - 1" && p.pointer_after === "pointer + length", "prefill is not the rule this client knows");
  }
}

function roleOf(tensors, role) {
  const found = tensors.filter((t) => t.role === role);
  if (found.length !== 1) throw new LmnError(`${MANIFEST}: a graph needs exactly one tensor of role ${role}; re-export the model`);
  return found[0];
}

function dims(shape) {
  return shape.map((d) => (d === "batch" ? 1 : d));
}

// ---- the vocabulary ------------------------------------------------------------------------

/** Text <-> token ids as lmn.json `vocabulary` says: code points of `tokens`, or UTF-8 bytes. */
export class Vocabulary {
  constructor(section, unknown) {
    this.section = section;
    this.kind = section.kind;
    this.size = section.size;
    this.unknown = unknown ?? section.unknown.default;
    if (!Object.hasOwn(section.unknown.policies, this.unknown))
      throw new LmnError(`unknown must be one of ${Object.keys(section.unknown.policies).join(", ")}, got ${this.unknown}`);
    if (this.kind === "chars") {
      this.tokens = [...section.tokens]; // code points, not UTF-16 units
      this.index = new Map(this.tokens.map((c, i) => [c, i]));
    }
  }

  encode(text) {
    if (this.kind === "bytes") return [...new TextEncoder().encode(text)];
    const chars = [...text];
    const missing = [...new Set(chars.filter((c) => !this.index.has(c)))].sort();
    if (missing.length && this.unknown === "error")
      throw new LmnError(`characters not in the model's vocabulary: ${JSON.stringify(missing.join(""))} ` +
        "(choose unknown = skip to drop them)");
    return chars.filter((c) => this.index.has(c)).map((c) => this.index.get(c));
  }

  decode(ids) {
    if (this.kind === "bytes") return new TextDecoder().decode(Uint8Array.from(ids));
    return ids.map((i) => this.tokens[i]).join("");
  }

  /** A streaming decoder: whole characters out; with bytes, a character's leading bytes wait (`pending`). */
  decoder(pending = []) {
    return this.kind === "bytes" ? new ByteDecoder(pending) : new CharDecoder(this.tokens, pending);
  }
}

class CharDecoder {
  constructor(tokens, pending) {
    if (pending.length) throw new LmnError("a character vocabulary holds no pending bytes");
    this.tokens = tokens;
    this.pending = [];
  }
  decode(id) {
    return this.tokens[id];
  }
  skip() {}
}

/** UTF-8 bytes -> characters; a broken sequence becomes U+FFFD. `pending`: the start of a character. */
class ByteDecoder {
  constructor(pending) {
    this.text = new TextDecoder("utf-8");
    this.recent = [];
    this.skip(pending);
    if (this.pending.length !== pending.length) throw new LmnError("pending bytes are not the start of a UTF-8 character");
  }
  decode(id) {
    this.recent = [...this.recent, id].slice(-3);
    return this.text.decode(Uint8Array.of(id), { stream: true });
  }
  skip(ids) {
    for (const id of ids) this.decode(id);
  }
  /** The bytes the decoder holds: the longest recent suffix that is an incomplete character. */
  get pending() {
    for (let k = this.recent.length; k > 0; k--) {
      const tail = this.recent.slice(-k);
      if (tail[0] >= 0xc2 && new TextDecoder().decode(Uint8Array.from(tail), { stream: true }) === "") return tail;
    }
    return [];
  }
}

// ---- the model -----------------------------------------------------------------------------

/** lmn.json, read and checked: format 4, the fields this client uses, and (`verify`) its own sha256. */
export async function readManifest(fetchFile, { verify = true } = {}) {
  const bytes = await fetchFile(MANIFEST);
  let manifest;
  try {
    manifest = JSON.parse(new TextDecoder().decode(bytes));
  } catch (e) {
    throw new LmnError(`${MANIFEST} is not valid JSON (${e.message}); re-export the model`);
  }
  checkManifest(manifest);
  const why = verify ? await integrityError(bytes, manifest) : null;
  if (why) throw new LmnError(`${MANIFEST} ${why}`);
  return manifest;
}

/** A file of the folder matches its size and sha256 in lmn.json `files`. */
export async function checkFile(manifest, name, bytes) {
  const want = manifest.files[name];
  if (!want) throw new LmnError(`${MANIFEST} lists no digest for ${name}; re-export the model`);
  if (bytes.length !== want.bytes || (await sha256Hex(bytes)) !== want.sha256)
    throw new LmnError(`${name} does not match its sha256 in ${MANIFEST} (truncated or replaced); re-export the model`);
}

/**
 * Load an export folder: lmn.json (format, integrity), the graphs of `precision` (checked against
 * `files` digests when `verify`), their sessions with inputs and outputs checked against the roles.
 */
export async function loadModel({ ort, fetchFile, precision = "fp32", verify = true, unknown, sessionOptions = {},
                                  prefillMinTokens, manifest } = {}) {
  manifest ??= await readManifest(fetchFile, { verify });
  const model = new Model(ort, fetchFile, manifest, { precision, verify, unknown, sessionOptions, prefillMinTokens });
  await model.open();
  return model;
}

export class Model {
  constructor(ort, fetchFile, manifest, { precision, verify, unknown, sessionOptions, prefillMinTokens }) {
    this.ort = ort;
    this.fetchFile = fetchFile;
    this.manifest = manifest;
    this.precision = precision;
    this.verify = verify;
    // lmn.json prefill.min_prompt_tokens: the runtime's choice of when to prefill (outputs agree either way)
    this.prefillMinTokens = prefillMinTokens ?? manifest.prefill?.min_prompt_tokens ?? Infinity;
    this.sessionOptions = { graphOptimizationLevel: "all", intraOpNumThreads: 1, interOpNumThreads: 1, ...sessionOptions };
    this.vocab = new Vocabulary(manifest.vocabulary, unknown);
    this.startIds = manifest.vocabulary.start.ids;
    this.pointerMax = BigInt(manifest.pointer.max); // the largest input pointer the step graphs support
    this.pointerTensor = manifest.pointer.tensor;
    const onnx = manifest.graphs.filter((g) => g.target === "onnx");
    this.precisions = [...new Set(onnx.filter((g) => g.name === "step").map((g) => g.precision))];
    this.stepGraph = onnx.find((g) => g.name === "step" && g.precision === precision);
    if (!this.stepGraph)
      throw new LmnError(`the export has no ${precision} ONNX step graph (it has ${this.precisions.join(", ") || "none"})`);
    // fast paths: step graphs valid where lmn.json fast_paths gives k levels
    this.fastGraphs = new Map(onnx.filter((g) => g.name === "step_levels" && g.precision === precision).map((g) => [g.levels, g]));
    const rule = manifest.fast_paths;
    this.fastRule = rule && { from: BigInt(rule.valid_from_pointer), cap: BigInt(rule.levels_cap) };
    // prefill: per size, this precision's graph, else the one of lmn.json prefill.precision_fallback
    const prefill = new Map();
    for (const p of [...new Set([manifest.prefill?.precision_fallback ?? "fp32", precision])])
      for (const g of onnx.filter((g) => g.name === "prefill" && g.precision === p)) prefill.set(g.size, g);
    this.prefillGraphs = manifest.prefill ? [...prefill.values()].sort((a, b) => a.size - b.size) : [];
    this.sessions = new Map(); // file -> Promise<session>
    this.weights = new Map(); // weights file -> Promise<its bytes, checked>: one copy, shared by every graph of a precision
    const tensors = new Map(manifest.state.tensors.map((t) => [t.name, t]));
    for (const g of [this.stepGraph, ...this.fastGraphs.values()]) {
      need(g.state.length === tensors.size && g.state.every((p) => tensors.has(p.tensor)),
        `graph ${g.file} must carry every state tensor`);
    }
    this.stateTensors = tensors;
  }

  async open() {
    await Promise.all([this.stepGraph, ...this.fastGraphs.values()].map((g) => this.session(g)));
  }

  /** The session of a graph (created once), its file checked against `files` and its I/O against the roles. */
  session(graph) {
    if (!this.sessions.has(graph.file)) this.sessions.set(graph.file, this.openSession(graph));
    return this.sessions.get(graph.file);
  }

  /** The bytes of a weights file (lmn.json graph field `weights`), fetched and checked once. */
  weightsBytes(name) {
    if (!this.weights.has(name)) {
      this.weights.set(name, this.fetchFile(name).then(async (bytes) => {
        if (this.verify) await checkFile(this.manifest, name, bytes);
        return bytes;
      }));
    }
    return this.weights.get(name);
  }

  async openSession(graph) {
    const bytes = await this.fetchFile(graph.file);
    if (this.verify) await checkFile(this.manifest, graph.file, bytes);
    need(typeof graph.weights === "string", `graph ${graph.file} names no weights file`);
    // the graph reads its weight tensors from graph.weights (ONNX external data): given as bytes, one copy for all graphs
    const externalData = [{ path: graph.weights, data: await this.weightsBytes(graph.weights) }];
    let session;
    try {
      session = await this.ort.InferenceSession.create(bytes, { ...this.sessionOptions, externalData });
    } catch (e) {
      throw new LmnError(`onnxruntime cannot load ${graph.file} (${String(e.message ?? e).split("\n")[0]})`);
    }
    const same = (a, b) => a.length === b.length && [...a].sort().join("\0") === [...b].sort().join("\0");
    if (!same(session.inputNames, graph.inputs.map((t) => t.name)) || !same(session.outputNames, graph.outputs.map((t) => t.name)))
      throw new LmnError(`${graph.file} has inputs ${session.inputNames} and outputs ${session.outputNames}, not the ones ` +
        `${MANIFEST} declares; the folder mixes files of different exports: re-export it`);
    return session;
  }

  /** The step_levels graph lmn.json `fast_paths` picks for a step at input pointer p, else the step graph. */
  graphFor(pointer) {
    const rule = this.fastRule;
    if (!rule || pointer < rule.from) return this.stepGraph;
    let zeros = 0n;
    for (let q = pointer + 1n; (q & 1n) === 0n; q >>= 1n) zeros++;
    const levels = Number(zeros < rule.cap ? zeros : rule.cap);
    return this.fastGraphs.get(levels) ?? this.stepGraph;
  }

  /** The ids are whole numbers in lmn.json `vocabulary.token_ids` (the graphs do not check). */
  checkIds(ids) {
    const { min, max } = this.manifest.vocabulary.token_ids;
    const bad = ids.filter((i) => !Number.isInteger(i) || i < min || i > max);
    if (bad.length) throw new LmnError(`token ids out of range: they must be whole numbers in [${min}, ${max}]; got ${bad.slice(0, 5)}`);
  }

  /** The state tensors of `state.tensors` with their initial value (0), the pointer set to p (`state.start_at_pointer`). */
  initialState(pointer = 0n) {
    const state = {};
    for (const t of this.stateTensors.values()) {
      const shape = dims(t.shape);
      const data = new ARRAYS[t.dtype](shape.reduce((a, b) => a * b, 1)); // zeros
      if (t.name === this.pointerTensor) data.fill(t.dtype === "int64" ? BigInt(pointer) : Number(pointer));
      state[t.name] = new this.ort.Tensor(t.dtype, data, shape);
    }
    return state;
  }

  stream(options) {
    return new Stream(this, options);
  }

  /** The graph every stream's next step takes (lmn.json fast_paths `rows: all`: the same levels for all, else step). */
  graphForAll(streams) {
    const graphs = new Set(streams.map((s) => this.graphFor(s.pointer)));
    return graphs.size === 1 ? [...graphs][0] : this.stepGraph;
  }

  /** Whether every step graph of this precision may take several streams in one call (lmn.json `batch_rows`). */
  get batchable() {
    return [this.stepGraph, ...this.fastGraphs.values()].every((g) => g.batch_rows === "independent");
  }

  /**
   * Step several streams in one call, stacked on the batch axis (one id each); returns their logits.
   * Refused for a graph whose lmn.json `batch_rows` is "coupled": its rows would change each other.
   */
  async stepBatch(streams, ids) {
    this.checkIds(ids);
    streams.forEach((s) => s.checkRoom(1));
    const graph = this.graphForAll(streams);
    if (graph.batch_rows !== "independent")
      throw new LmnError(`${graph.file} has batch_rows ${graph.batch_rows} in ${MANIFEST}: its rows change each ` +
        "other's outputs, so step each stream alone");
    const token = roleOf(graph.inputs, "token");
    const B = streams.length;
    const feeds = { [token.name]: new this.ort.Tensor(token.dtype,
      ARRAYS[token.dtype].from(ids, (id) => (token.dtype === "int64" ? BigInt(id) : id)), [B]) };
    for (const pair of graph.state) { // (B, ...) from each stream's (1, ...)
      const parts = streams.map((s) => s.state[pair.tensor]);
      const data = new ARRAYS[parts[0].type](parts.reduce((n, t) => n + t.data.length, 0));
      parts.forEach((t, b) => data.set(t.data, b * t.data.length));
      feeds[pair.input] = new this.ort.Tensor(parts[0].type, data, [B, ...parts[0].dims.slice(1)]);
    }
    const out = await (await this.session(graph)).run(feeds);
    const logits = out[roleOf(graph.outputs, "logits").name].data; // (B, V)
    streams.forEach((s, b) => {
      const state = {};
      for (const pair of graph.state) {
        const t = out[pair.output];
        const size = t.data.length / B;
        state[pair.tensor] = new this.ort.Tensor(t.type, t.data.slice(b * size, (b + 1) * size), [1, ...t.dims.slice(1)]);
      }
      s.state = state;
      s.logits = logits.slice(b * this.vocab.size, (b + 1) * this.vocab.size);
      s.tokensSeen += 1;
      s.decoder.skip([ids[b]]);
      s.count(graph.file);
    });
    return streams.map((s) => s.logits);
  }
}

// ---- sampling ------------------------------------------------------------------------------

/** The lowest id among the equal maxima (the contract's greedy). */
export function argmax(logits) {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

/** Greedy at temperature 0; else a draw from softmax(logits / temperature) over the top_k ids. */
export function sample(logits, { temperature = 0, topK = 0, random = Math.random } = {}) {
  if (!(temperature >= 0)) throw new LmnError(`temperature must be >= 0, got ${temperature}`);
  if (temperature === 0) return argmax(logits);
  let ids = [...logits.keys()];
  if (topK > 0) ids = ids.sort((a, b) => logits[b] - logits[a] || a - b).slice(0, topK);
  const top = Math.max(...ids.map((i) => logits[i]));
  const weights = ids.map((i) => Math.exp((logits[i] - top) / temperature));
  let r = random() * weights.reduce((a, b) => a + b, 0);
  for (let k = 0; k < ids.length; k++) if ((r -= weights[k]) < 0) return ids[k];
  return ids[ids.length - 1];
}

// ---- a stream ------------------------------------------------------------------------------

const STATE_MAGIC = "LMNSTATE";
const STATE_VERSION = 1;

/** One stream's state over a shared Model: feed text or ids, generate, save and restore. */
export class Stream {
  constructor(model, { pointer = 0n } = {}) {
    const p = typeof pointer === "bigint" ? pointer : Number.isInteger(pointer) ? BigInt(pointer) : NaN;
    if (typeof p !== "bigint" || p < 0n || p > model.pointerMax)
      throw new LmnError(`pointer must be a whole number in [0, ${model.pointerMax}] (lmn.json pointer.max), got ${pointer}`);
    this.model = model;
    this.startPointer = p;
    this.state = model.initialState(p);
    // Float32Array (V): scores for the next token. null until the first token is fed or generated, then the
    // output of the last one (a prefill: its last position); a new array after each step, never shared
    this.logits = null;
    this.tokensSeen = 0;
    this.decoder = model.vocab.decoder();
    this.calls = {}; // graph file -> calls: which graph did the work
  }

  /** The input pointer of the next step. */
  get pointer() {
    return BigInt(this.state[this.model.pointerTensor].data[0]);
  }

  /** Back to the initial state at the pointer this stream started at. */
  reset() {
    Object.assign(this, new Stream(this.model, { pointer: this.startPointer }));
  }

  /** `count` more tokens fit: the last of them steps from a pointer <= pointer.max. */
  checkRoom(count) {
    if (this.pointer + BigInt(count) - 1n > this.model.pointerMax)
      throw new LmnError(`the stream is at pointer ${this.pointer} and this export supports pointers up to ` +
        `${this.model.pointerMax} (lmn.json pointer.max); ${count} more tokens do not fit: reset the stream`);
  }

  count(file) {
    this.calls[file] = (this.calls[file] ?? 0) + 1;
  }

  /**
   * Feed token ids. A chunk of at least lmn.json `prefill.min_prompt_tokens` ids goes through prefill graphs
   * from the stream's state, at any pointer (in pieces of the largest graph); shorter chunks are stepped.
   */
  async feedIds(ids) {
    ids = [...ids];
    this.model.checkIds(ids);
    this.checkRoom(ids.length);
    const m = this.model;
    while (m.prefillGraphs.length && ids.length >= m.prefillMinTokens) {
      const used = await this.prefill(ids);
      ids = ids.slice(used);
    }
    for (const id of ids) {
      await this.step(id);
      this.decoder.skip([id]); // a fed character's leading bytes wait in the decoder for the next generate
    }
  }

  async feed(text) {
    await this.feedIds(this.model.vocab.encode(text));
  }

  /**
   * lmn.json `prefill`: from the stream's state (any pointer), the smallest graph whose size holds the ids
   * (or the largest, for the first `size` of them); returns how many ids it consumed.
   */
  async prefill(ids) {
    const m = this.model;
    m.checkIds(ids);
    const graph = m.prefillGraphs.find((g) => g.size >= ids.length) ?? m.prefillGraphs[m.prefillGraphs.length - 1];
    const used = Math.min(ids.length, graph.size);
    if (!(used >= m.manifest.prefill.length_min && used <= graph.size))
      throw new LmnError(`prefill length must be in [1, ${graph.size}], got ${used}`);
    this.checkRoom(used);
    const tokensSpec = roleOf(graph.inputs, "tokens");
    const lengthSpec = roleOf(graph.inputs, "length");
    const tokens = new ARRAYS[tokensSpec.dtype](graph.size);
    const cast = (dtype, v) => (dtype === "int64" ? BigInt(v) : v);
    tokens.fill(cast(tokensSpec.dtype, m.manifest.prefill.padding_id));
    ids.slice(0, used).forEach((id, k) => (tokens[k] = cast(tokensSpec.dtype, id)));
    const length = ARRAYS[lengthSpec.dtype].of(cast(lengthSpec.dtype, used));
    const feeds = {
      [tokensSpec.name]: new m.ort.Tensor(tokensSpec.dtype, tokens, dims(tokensSpec.shape)),
      [lengthSpec.name]: new m.ort.Tensor(lengthSpec.dtype, length, [1]),
    };
    if (graph.state.length !== m.stateTensors.size) throw new LmnError(`${graph.file} does not carry every state tensor; re-export the model`);
    for (const pair of graph.state) feeds[pair.input] = this.state[pair.tensor];
    const expected = this.pointer + BigInt(used);
    const out = await (await m.session(graph)).run(feeds);
    const state = {};
    for (const pair of graph.state) state[pair.tensor] = out[pair.output];
    this.state = state;
    if (this.pointer !== expected) throw new LmnError(`${graph.file} returned pointer ${this.pointer}, expected ${expected}`);
    this.logits = out[roleOf(graph.outputs, "logits").name].data.slice(0, m.vocab.size);
    this.tokensSeen += used;
    this.decoder.skip(ids.slice(0, used));
    this.count(graph.file);
    return used;
  }

  /** Feed one token id through the graph the fast-path rule picks; returns the logits (V). */
  async step(id) {
    const m = this.model;
    m.checkIds([id]);
    this.checkRoom(1);
    const graph = m.graphFor(this.pointer);
    const token = roleOf(graph.inputs, "token");
    const feeds = { [token.name]: new m.ort.Tensor(token.dtype, ARRAYS[token.dtype].of(token.dtype === "int64" ? BigInt(id) : id), [1]) };
    for (const pair of graph.state) feeds[pair.input] = this.state[pair.tensor];
    const out = await (await m.session(graph)).run(feeds);
    const state = {};
    for (const pair of graph.state) state[pair.tensor] = out[pair.output];
    this.state = state;
    this.logits = out[roleOf(graph.outputs, "logits").name].data.slice(0, m.vocab.size);
    this.tokensSeen += 1;
    this.count(graph.file);
    return this.logits;
  }

  /**
   * Generate up to `maxTokens` tokens, each fed back, yielding characters as they complete
   * (temperature 0: greedy). An empty stream is first fed lmn.json `vocabulary.start`.
   */
  async *generate(maxTokens, { temperature = 0, topK = 0, random = Math.random } = {}) {
    if (!Number.isInteger(maxTokens) || maxTokens < 0) throw new LmnError(`maxTokens must be a whole number >= 0, got ${maxTokens}`);
    if (maxTokens === 0) return;
    if (this.logits === null) await this.feedIds(this.model.startIds);
    for (let k = 0; k < maxTokens; k++) {
      this.checkRoom(1);
      const id = sample(this.logits, { temperature, topK, random });
      await this.step(id);
      const chars = this.decoder.decode(id);
      if (chars) yield chars;
    }
  }

  /** The identity a state file carries (as runtime/stream.py writes it). */
  identity() {
    return { model: this.model.manifest.source?.sha256 ?? "", backend_state: this.model.stepGraph.state.map((p) => p.input) };
  }

  /**
   * This stream's state as a state file of the Python runtime (runtime/state_file.py): MAGIC |
   * header length (u32 LE) | header JSON | arrays | sha256 of all before. `extra`: more header fields.
   */
  async saveState(extra = {}) {
    const arrays = this.model.stepGraph.state.map((p) => [p.input, this.state[p.tensor]]);
    const specs = arrays.map(([name, t]) => ({ name, dtype: t.type, shape: [...t.dims] }));
    const datas = arrays.map(([, t]) => t.data);
    if (this.logits) {
      specs.push({ name: "logits", dtype: "float32", shape: [this.logits.length] });
      datas.push(this.logits);
    }
    const header = { ...extra, version: STATE_VERSION, ...this.identity(), tokens_seen: this.tokensSeen,
                     pending_bytes: this.decoder.pending.map((b) => b.toString(16).padStart(2, "0")).join(""), arrays: specs };
    const head = new TextEncoder().encode(JSON.stringify(header));
    const size = 12 + head.length + datas.reduce((a, d) => a + d.byteLength, 0);
    const body = new Uint8Array(size);
    body.set(new TextEncoder().encode(STATE_MAGIC), 0);
    new DataView(body.buffer).setUint32(8, head.length, true);
    body.set(head, 12);
    let offset = 12 + head.length;
    for (const d of datas) {
      body.set(new Uint8Array(d.buffer, d.byteOffset, d.byteLength), offset); // little-endian hosts (all of them in practice)
      offset += d.byteLength;
    }
    const digest = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", body));
    const file = new Uint8Array(size + 32);
    file.set(body);
    file.set(digest, size);
    return file;
  }

  /** Replace this stream's state with a saved one (checked first; on an error nothing changes). Returns the header. */
  async loadState(bytes) {
    const fail = (why) => {
      throw new LmnError(`not a usable state file for this model: ${why}; nothing was loaded`);
    };
    // a copy as a plain Uint8Array: a Node Buffer's slice() is a view into a shared pool, not a copy
    bytes = new Uint8Array(bytes instanceof Uint8Array ? bytes : new Uint8Array(bytes));
    if (bytes.length < 44 || new TextDecoder().decode(bytes.subarray(0, 8)) !== STATE_MAGIC) fail("no LMNSTATE header");
    const body = bytes.subarray(0, bytes.length - 32);
    const digest = new Uint8Array(await globalThis.crypto.subtle.digest("SHA-256", body.slice()));
    if (digest.some((b, k) => b !== bytes[body.length + k])) fail("truncated or corrupt (checksum mismatch)");
    const headLength = new DataView(body.buffer, body.byteOffset).getUint32(8, true);
    if (headLength > Math.min(STATE_MAX_HEADER_BYTES, body.length - 12)) fail(`a header of ${headLength} bytes`);
    let header;
    try {
      header = JSON.parse(new TextDecoder().decode(body.subarray(12, 12 + headLength)));
    } catch {
      fail("unreadable header");
    }
    if (header.version !== STATE_VERSION) fail(`state format version ${header.version}`);
    const identity = this.identity();
    for (const [key, want] of Object.entries(identity))
      if (JSON.stringify(header[key]) !== JSON.stringify(want)) fail(`it belongs to another model (${key} differs)`);
    const m = this.model;
    const byInput = new Map(m.stepGraph.state.map((p) => [p.input, p.tensor]));
    const state = {};
    let logits = null;
    let offset = 12 + headLength;
    for (const spec of header.arrays ?? []) {
      const tensor = byInput.get(spec.name);
      const want = tensor ? m.stateTensors.get(tensor) : { dtype: "float32", shape: [m.vocab.size] };
      if (!tensor && spec.name !== "logits") fail(`unexpected array ${spec.name}`);
      if (spec.dtype !== want.dtype || JSON.stringify(spec.shape) !== JSON.stringify(dims(want.shape))) fail(`${spec.name} has the wrong shape or dtype`);
      const count = spec.shape.reduce((a, b) => a * b, 1);
      const Array_ = ARRAYS[spec.dtype];
      const data = new Array_(body.slice(offset, offset + count * Array_.BYTES_PER_ELEMENT).buffer);
      if (data.length !== count) fail("array sizes do not add up");
      offset += data.byteLength;
      if (spec.dtype === "float32" ? !data.every(Number.isFinite) : spec.dtype !== "float16" && data.some((x) => x < 0))
        fail(`${spec.name} holds ${spec.dtype === "float32" ? "non-finite" : "negative"} values`);
      if (spec.dtype === "float16" && data.some((h) => (h & 0x7c00) === 0x7c00)) fail(`${spec.name} holds non-finite values`);
      if (tensor) state[tensor] = new m.ort.Tensor(spec.dtype, data, spec.shape);
      else logits = data;
    }
    if (offset !== body.length || Object.keys(state).length !== m.stateTensors.size) fail("array sizes do not add up");
    if (!Number.isSafeInteger(header.tokens_seen) || header.tokens_seen < 0 || (logits === null) !== (header.tokens_seen === 0))
      fail(`tokens_seen ${header.tokens_seen} does not fit its logits`);
    if (BigInt(state[m.pointerTensor].data[0]) > m.pointerMax || BigInt(state[m.pointerTensor].data[0]) < 0n) fail(`pointer out of range (past lmn.json pointer.max ${m.pointerMax})`);
    const pending = (header.pending_bytes ?? "").match(/../g)?.map((h) => parseInt(h, 16)) ?? [];
    let decoder;
    try {
      decoder = m.vocab.decoder(pending);
    } catch (e) {
      fail(e.message);
    }
    Object.assign(this, { state, logits, tokensSeen: header.tokens_seen, decoder });
    return header;
  }
}

// ---- conformance ---------------------------------------------------------------------------

/** The top-2 margin of logits (float64). */
export function margin(logits) {
  let a = -Infinity;
  let b = -Infinity;
  for (const v of logits) {
    if (v > a) [a, b] = [v, a];
    else if (v > b) b = v;
  }
  return a - b;
}

/** Run one case of conformance.json through fresh streams (its `about` says how); batches `batch_with` when allowed. */
export async function runCase(model, kase, { batch = true } = {}) {
  const stream = model.stream({ pointer: BigInt(kase.start_pointer ?? "0") });
  const observed = { argmax: [], logits: new Map(), greedy: [], margins: [], text: "", batch_gap: 0 };
  if (kase.decode) { // the text decoder alone: ids as generated tokens
    for (const id of kase.decode.ids) observed.text += stream.decoder.decode(id);
    return observed;
  }
  const wanted = new Set(Object.keys(kase.logits).map(Number));
  const record = () => {
    const step = observed.argmax.length;
    observed.argmax.push(argmax(stream.logits));
    if (wanted.has(step)) observed.logits.set(step, Float32Array.from(stream.logits));
  };
  if (kase.prompt?.length) {
    await stream.feedIds(kase.prompt); // a prefill graph where the runtime chooses one, as for a user's prompt
    record();
  }
  const others = batch && kase.batch_with?.length && model.batchable
    ? kase.batch_with.map((o) => model.stream({ pointer: BigInt(o.start_pointer) })) : [];
  for (const [k, token] of kase.tokens.entries()) {
    if (others.length) await model.stepBatch([stream, ...others], [token, ...kase.batch_with.map((o) => o.tokens[k])]);
    else await stream.feedIds([token]);
    record();
  }
  for (const chunk of kase.chunks ?? []) {
    await stream.feedIds(chunk); // at once, mid-stream: a prefill graph from the stream's state where the runtime chooses one
    record();
  }
  for (let k = 0; k < (kase.greedy?.ids.length ?? 0); k++) {
    const id = argmax(stream.logits);
    observed.greedy.push(id);
    observed.margins.push(margin(stream.logits));
    for await (const chars of stream.generate(1, { temperature: 0 })) observed.text += chars; // feeds the argmax
  }
  if (others.length) { // the same stream alone: batching must not change it (batch_atol)
    const alone = await runCase(model, kase, { batch: false });
    for (const [step, got] of observed.logits)
      for (let i = 0; i < got.length; i++)
        observed.batch_gap = Math.max(observed.batch_gap, Math.abs(got[i] - alone.logits.get(step)[i]));
  }
  observed.calls = stream.calls;
  return observed;
}

/** conformance.json's judging rules (runtime/conformance.py `judge`): one result per case. */
export function judge(kase, tolerance, observed) {
  if (kase.decode) {
    const passed = observed.text === kase.decode.text;
    return { name: kase.name, precision: kase.precision, passed, argmax_agreement: 1, max_logit_gap: 0, greedy_ok: true,
             detail: passed ? "" : `decoded ${JSON.stringify(observed.text)}, expected ${JSON.stringify(kase.decode.text)}` };
  }
  const want = kase.argmax;
  const atol = tolerance.logits_atol;
  // a flip where the expected top-2 margin is <= 2 x logits_atol is a near tie: excused and counted
  // (a case without argmax_margins, from an older file, excuses none)
  const margins = kase.argmax_margins?.length ? kase.argmax_margins : want.map(() => Infinity);
  const ids = observed.argmax.slice(0, want.length);
  const same = ids.filter((a, k) => a === want[k]).length;
  const excused = ids.filter((a, k) => a !== want[k] && margins[k] <= 2 * atol).length;
  const agreement = want.length ? (same + excused) / want.length : 1;
  let gap = 0;
  for (const [step, expected] of Object.entries(kase.logits)) {
    const got = observed.logits.get(Number(step));
    if (!got || got.length !== expected.length || !got.every(Number.isFinite)) {
      gap = null;
      break;
    }
    for (let i = 0; i < expected.length; i++) gap = Math.max(gap, Math.abs(got[i] - expected[i]));
  }
  let greedyOk = true;
  let detail = "";
  const expectedGreedy = kase.greedy?.ids ?? [];
  for (let k = 0; k < Math.min(observed.greedy.length, expectedGreedy.length); k++) {
    if (observed.greedy[k] !== expectedGreedy[k]) {
      greedyOk = kase.greedy.margins[k] <= 2 * atol;
      detail = `greedy token ${k}: ${observed.greedy[k]} vs ${expectedGreedy[k]} (expected margin ${kase.greedy.margins[k].toPrecision(3)})`;
      break;
    }
  }
  const sameIds = observed.greedy.length === expectedGreedy.length && observed.greedy.every((id, k) => id === expectedGreedy[k]);
  if (sameIds && kase.greedy?.text !== undefined && observed.text !== kase.greedy.text) {
    greedyOk = false;
    detail = `greedy text ${JSON.stringify(observed.text)}, expected ${JSON.stringify(kase.greedy.text)}`;
  }
  if (observed.greedy.length !== expectedGreedy.length) {
    greedyOk = false;
    detail = `generated ${observed.greedy.length} greedy tokens, expected ${expectedGreedy.length}`;
  }
  const batchOk = observed.batch_gap <= (tolerance.batch_atol ?? 0); // NaN compares false: a failure
  if (!batchOk) detail = `batched rows differ from the stream alone by ${observed.batch_gap.toPrecision(3)} (batch_rows)`;
  const passed = gap !== null && gap <= atol && agreement >= tolerance.min_argmax_agreement && greedyOk && batchOk &&
    observed.argmax.length === want.length;
  return { name: kase.name, precision: kase.precision, passed, argmax_agreement: agreement, max_logit_gap: gap,
           greedy_ok: greedyOk, batch_gap: observed.batch_gap, excused_flips: excused, detail };
}
