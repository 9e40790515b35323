#!/usr/bin/env python
"""Mutation check: break the code one line at a time and prove the named tests notice.

    python tests/mutants.py --list               the mutants, their tests, and whether each still applies
    python tests/mutants.py                      run every mutant
    python tests/mutants.py --only NAME [NAME..] run some (exact names, or shell-style patterns)

Not a pytest module (no test_ functions; pytest collects test_*.py only). It copies the repository
(git ls-files: tracked plus untracked-not-ignored files, no .venv) into a scratch folder, checks
that the mutants' tests pass there unchanged (the baseline: a failing test proves nothing about a
mutant), then for each mutant replaces one exact snippet of one file, runs that mutant's tests
with `python -m pytest -x -q -p no:cacheprovider` (this interpreter, PYTHONPATH = the scratch
copy, so the copy's code is what runs), and puts the file back.

KILLED: a test failed (or could not even import the mutated code). SURVIVED: every test passed,
so nothing guards that line. Exit status: 1 if any mutant survived; 2 if a mutant no longer
applies (its original snippet is not in the file exactly once: update the list), a test path is
missing, or the baseline fails; 0 otherwise.

Each mutant names the smallest set of tests that ought to kill it, so a run takes minutes.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to the repository root
    original: str  # must occur exactly once in the file
    replacement: str
    tests: tuple[str, ...]  # pytest node ids or paths
    why: str  # what a user would feel
    note: str = ""


MUTANTS = [
    # --- from the review ---------------------------------------------------------------------
    Mutant("onnx-stepper-never-fast",
           "runtime/backends.py",
           "            bindings = self.fast.get(self.rule.levels(self.pointer), bindings)\n",
           "            bindings = self.bindings\n",
           ("tests/runtime/test_stream.py::test_which_graph_ran_is_observable",),
           "the ONNX stepper never binds a fast path: every token pays for the general graph"),
    Mutant("fp32-parity-tolerance-10000x",
           "lmn_export/validate.py",
           "FP32_ATOL = 1e-4\n",
           "FP32_ATOL = 1.0\n",
           ("tests/lmn_export/test_parity.py::test_export_applies_the_documented_fp32_bound",),
           "lmn-export passes graphs whose logits are off by up to 1.0"),
    Mutant("quantized-loads-fp32-step",
           "runtime/model.py",
           'self.step_graph = manifest.graph("step", "onnx", precision)',
           'self.step_graph = manifest.graph("step", "onnx", "fp32")',
           ("tests/runtime/test_shipped.py::test_shipped_quantized_graphs_stay_close_to_the_checkpoint",),
           'runtime.load(precision="int4") silently runs the fp32 step graph'),
    Mutant("quantized-prefill-never-used",
           "runtime/model.py",
           'prefill.update({g["size"]: g for g in manifest.graphs("onnx", "prefill", precision)})',
           'pass',
           ("tests/lmn_export/test_export_folder.py::test_fast_paths_listed_and_used",),
           "a quantized stream prefills with the fp32 graph although the export has its own"),
    Mutant("prefill-never-used",
           "runtime/stream.py",
           "PREFILL_MIN_TOKENS = 16",
           "PREFILL_MIN_TOKENS = 10**9",
           ("tests/runtime/test_stream.py::test_which_graph_ran_is_observable",),
           "long prompts are stepped one token at a time, never prefilled"),
    Mutant("coreml-platform-check-removed",
           "runtime/backends.py",
           'if platform.system() != "Darwin":',
           "if False:",
           ("tests/lmn_export/test_export_folder.py::test_coreml_backend_refuses_to_run_off_macos",),
           "backend='coreml' off macOS crashes later instead of saying what to use"),
    Mutant("chat-reset-only-prints",
           "runtime/chat.py",
           "                self.stream.reset()\n",
           "",
           ("tests/runtime/test_reliability.py::test_chat_temp_zero_is_greedy_and_reset_clears_the_state",),
           "/reset in lmn-chat prints [state reset] and keeps the conversation"),
    Mutant("resume-reinitializes-weights",
           "models/train.py",
           "        model, vocab, meta = load(out)\n        model.train()\n",
           "        model, vocab, meta = load(out)\n        model = build_model(model.config).train()\n",
           ("tests/models/test_train.py::test_resume_reproduces_an_unbroken_run_bit_for_bit",),
           "--resume throws the trained weights away and trains fresh ones"),
    Mutant("per-row-update-takes-new",
           "models/memory.py",
           "return computed if changed is None else torch.where(changed, computed, nodes)",
           "return computed",
           ("tests/models/test_modes.py::test_mixed_pointer_rows_step_like_each_row_alone",
            "tests/models/test_modes.py::test_presets_mixed_pointer_rows_step_like_each_row_alone"),
           "in a batch at mixed pointers, rows that should keep a level overwrite it (wrong memory)"),
    Mutant("per-row-update-keeps-old",
           "models/memory.py",
           "changed = level_flags(pointer, self.node_block_sizes)  # (B, S)",
           "changed = self.node_block_sizes.eq(1).expand(pointer.shape[0], -1)  # (B, S)",
           ("tests/models/test_modes.py::test_mixed_pointer_rows_step_like_each_row_alone",
            "tests/models/test_modes.py::test_presets_mixed_pointer_rows_step_like_each_row_alone"),
           "in a batch at mixed pointers, no row ever re-summarizes: the summaries freeze"),
    # --- more one-line mutants a user would feel ---------------------------------------------
    Mutant("stream-parity-nan-swallowed",
           "lmn_export/validate.py",
           "    if not (np.isfinite(got).all() and np.isfinite(want).all()):\n        return math.inf\n",
           "",
           ("tests/lmn_export/test_parity.py::test_nan_outputs_fail_parity",),
           "a graph that outputs NaN passes parity (max(prev, nan) keeps prev)"),
    Mutant("output-diff-no-finite-check",
           "lmn_export/validate.py",
           "return math.isfinite(self.max_abs_diff) and self.max_abs_diff <= self.atol",
           "return self.max_abs_diff <= self.atol",
           ("tests/lmn_export/test_parity.py::test_a_nan_gap_never_passes",),
           "an infinite gap passes an unbounded tolerance"),
    Mutant("quantized-loss-guard-nan",
           "lmn_export/quantize.py",
           "increase = max(0.0, loss_q - loss_fp32) if finite else math.inf",
           "increase = max(0.0, loss_q - loss_fp32)",
           ("tests/lmn_export/test_parity.py::test_quantized_gate_fails_both_checks_on_nan_logits",),
           "NaN quantized logits pass the loss gate (max(0.0, nan) is 0.0)"),
    Mutant("level-flag-off-by-one",
           "models/memory.py",
           "return torch.remainder(pointer.unsqueeze(-1) + 1, block_sizes) == 0",
           "return torch.remainder(pointer.unsqueeze(-1), block_sizes) == 0",
           ("tests/models/test_state.py::test_level_flags_exact_near_float_limits",),
           "each level re-summarizes one token early: the step disagrees with the parallel pass"),
    Mutant("level-valid-off-by-one",
           "models/memory.py",
           "return position.unsqueeze(-1) + 1 >= block_sizes",
           "return position.unsqueeze(-1) >= block_sizes",
           ("tests/models/test_state.py::test_level_flags_exact_near_float_limits",),
           "a completed level stays masked one token too long"),
    Mutant("fast-path-before-memory-full",
           "runtime/backends.py",
           "        if pointer < self.valid_from_pointer:\n",
           "        if pointer < self.valid_from_pointer - 1:\n",
           ("tests/runtime/test_stream.py::test_fast_paths_stream_like_the_general_graph",),
           "a fast path (no mask) runs one token before the memory is full: it reads an empty slot"),
    # --- the contract (manifest format 2, issue 13) ----------------------------------------------
    Mutant("pointer-guard-removed",
           "runtime/stream.py",
           "        if pointer + count - 1 <= self.model.pointer_max:\n",
           "        if True:\n",
           ("tests/lmn_export/test_contract.py::test_pointer_guards",),
           "a stream steps past the largest pointer its graphs support: pointer + 1 wraps and the logits are garbage"),
    Mutant("fast-path-rule-ignores-manifest",
           "runtime/model.py",
           "        rule = FastPathRule.from_manifest(self.manifest.fast_paths) if self.fast_paths else None\n",
           "        rule = FastPathRule.for_max_levels(self.config['max_levels']) if self.fast_paths else None\n",
           ("tests/lmn_export/test_contract.py::test_fast_path_rule_is_read_from_the_manifest",),
           "the runtime re-derives the fast-path rule instead of reading lmn.json: the contract is not what runs"),
    Mutant("token-bound-by-position",
           "runtime/backends.py",
           '        token_spec = role_tensor(graph["inputs"], "token")\n',
           '        token_spec = graph["inputs"][0]\n',
           ("tests/lmn_export/test_contract.py::test_runtime_binds_tensors_by_role_not_position",),
           "the token is bound by its position, not its role: a graph with another input order breaks"),
    Mutant("schema-check-skipped",
           "runtime/manifest.py",
           "    check_schema(path, data)\n    check_fields(path, data)\n",
           "    check_fields(path, data)\n",
           ("tests/runtime/test_reliability.py::test_malformed_manifests_are_one_line_errors",),
           "a malformed lmn.json crashes deep in the runtime instead of a one-line error naming the field"),
    Mutant("conformance-nan-passes",
           "runtime/conformance.py",
           "not (np.isfinite(got).all() and np.isfinite(expected).all())",
           "False",
           ("tests/lmn_export/test_contract.py::test_lmn_verify_fails_on_a_changed_vector",),
           "lmn-verify passes vectors whose expected logits are NaN"),
    Mutant("prefill-length-unguarded",
           "runtime/model.py",
           "        if not ids or bad:\n",
           "        if bad:\n",
           ("tests/lmn_export/test_contract.py::test_prefill_guard",),
           "an empty prompt reaches the prefill graph, which returns pointer 0 with non-zero memory"),
    Mutant("check-io-skipped",
           "runtime/model.py",
           "        check_io(session, graph, path)\n",
           "",
           ("tests/runtime/test_reliability.py::test_a_wrong_graph_under_a_correct_sha_is_refused_at_load",),
           "a folder mixing graphs of different exports loads and fails mid-stream"),
    Mutant("manifest-integrity-skipped",
           "runtime/manifest.py",
           "    check_integrity(path, data)\n",
           "",
           ("tests/runtime/test_reliability.py::test_one_changed_byte_in_the_manifest_is_refused",),
           "an edited lmn.json (a vocabulary character, a shape) loads silently"),
    Mutant("state-file-checksum-skipped",
           "runtime/state_file.py",
           "if hashlib.sha256(body).digest() != digest:",
           "if False:",
           ("tests/runtime/test_stream.py::test_bad_state_files_are_refused_whole",),
           "a corrupt saved conversation loads garbage memory"),
    Mutant("sampling-top-k-ignored",
           "runtime/sampling.py",
           "if top_k is not None and top_k < len(z):",
           "if False:",
           ("tests/runtime/test_reliability.py::test_top_k_one_is_greedy",),
           "--top-k has no effect"),
    Mutant("stop-string-check-removed",
           "runtime/stream.py",
           "stopped = stopped or any(tail.endswith(s) for s in stop)",
           "stopped = False",
           ("tests/runtime/test_stream.py::test_stop_string_ends_generation",),
           "generation runs past its stop string to max_tokens"),
    Mutant("plain-stop-string-split",
           "runtime/stream.py",
           "        stop = (stop,)\n",
           "        stop = tuple(stop)\n",
           ("tests/runtime/test_reliability.py::test_a_plain_stop_string_is_one_string",),
           "stop='ab' stops at the first 'a' or 'b'"),
    Mutant("feed-ids-accepts-vocab-size",
           "runtime/stream.py",
           "not 0 <= i < vocab_size]",
           "not 0 <= i <= vocab_size]",
           ("tests/runtime/test_reliability.py::test_feed_ids_refuses_what_is_not_a_token_id",),
           "token id == vocab size is fed to the graph (out-of-range gather)"),
    Mutant("state-load-forgets-tokens-seen",
           "runtime/stream.py",
           "        self.tokens_seen = tokens_seen\n",
           "",
           ("tests/runtime/test_stream.py::test_state_round_trip_and_size",),
           "a loaded conversation reports 0 tokens seen (and a GPT export's capacity check is wrong)"),
    # --- one copy of the weights (manifest format 4, issue 21) ------------------------------------
    Mutant("weights-stored-per-reference",
           "lmn_export/weights_store.py",
           "        return self.where.get(_key(array))\n",
           "        return None\n",
           ("tests/lmn_export/test_weights_store.py::test_each_tensor_is_stored_once_and_the_graphs_compute_the_same",),
           "every graph stores its own copy of each weight again: the export is eight times its weights"),
    Mutant("weights-read-back-skipped",
           "lmn_export/weights_store.py",
           "        wrong = [n for n, digest in expected.items() if read.get(n) != digest]\n",
           "        wrong = []\n",
           ("tests/lmn_export/test_weights_store.py::test_a_store_that_reads_back_other_bytes_is_refused",),
           "a weights file written wrong is published: every graph of the precision reads other numbers"),
    Mutant("weights-file-unlisted",
           "runtime/manifest.py",
           '        if entry["target"] == "onnx" and entry.get("weights") not in data["files"]:\n',
           "        if False:\n",
           ("tests/lmn_export/test_weights_store.py::test_a_graph_without_its_weights_file_is_refused",),
           "a graph whose weights file lmn.json does not list (so never verified) is loaded"),
    Mutant("short-names-rename-the-weights",
           "lmn_export/weights_store.py",
           "    kept |= {t.name for g in _graphs(graph) for t in g.initializer}\n",
           "",
           ("tests/lmn_export/test_weights_store.py::test_each_tensor_is_stored_once_and_the_graphs_compute_the_same",),
           "the weights get short names too: lmn.json's record of the weights left in fp32 names tensors the graph lacks"),
    Mutant("short-names-take-a-contract-name",
           "lmn_export/weights_store.py",
           "    fresh = (n for n in map(_short_name, itertools.count()) if n not in kept)\n",
           "    fresh = map(_short_name, itertools.count())\n",
           ("tests/lmn_export/test_weights_store.py::test_short_names_never_take_a_contract_name",),
           "an internal value is renamed to a graph input's name: the graph reads the wrong tensor"),
    Mutant("coreml-function-check-skipped",
           "lmn_export/coreml_package.py",
           "        if name not in functions or program_digest(functions[name]) != program_digest(_functions(source)[\"main\"]):\n",
           "        if name not in functions:\n",
           ("tests/lmn_export/test_coreml_package.py::test_a_combined_function_that_is_not_its_source_is_refused",),
           "a Core ML package whose functions are not the programs that passed parity is published"),
]


def git_files(root: Path) -> list[str]:
    """Tracked files plus untracked files git does not ignore, .venv excluded, existing ones only."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=root, capture_output=True, check=True).stdout.decode()
    names = sorted({n for n in out.split("\0") if n})
    return [n for n in names if not n.startswith((".venv/", "venv/")) and (root / n).is_file()]


def copy_repo(root: Path, scratch: Path) -> Path:
    """Copy the repository to scratch/<its folder name>; a sibling shared/ (test data) is linked."""
    dest = scratch / root.name
    for name in git_files(root):
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, target, follow_symlinks=False)
    if (root.parent / "shared").is_dir():
        (scratch / "shared").symlink_to(root.parent / "shared")
    return dest


def check_applies(root: Path, mutants: list[Mutant]) -> list[str]:
    """Problems that make a mutant meaningless: file missing, snippet absent or ambiguous."""
    problems = []
    for m in mutants:
        path = root / m.file
        if not path.is_file():
            problems.append(f"{m.name}: {m.file} does not exist")
            continue
        count = path.read_text(encoding="utf-8").count(m.original)
        if count != 1:
            problems.append(f"{m.name}: original snippet found {count} times in {m.file} (need exactly 1): "
                            f"{m.original!r}")
    return problems


def missing_tests(root: Path, mutants: list[Mutant]) -> list[str]:
    return sorted({f"{m.name}: {t}" for m in mutants for t in m.tests if not (root / t.split("::")[0]).is_file()})


def pytest_env(copy: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale .pyc of a same-size mutant within one second
    return env


def run_pytest(copy: Path, tests: list[str], timeout: float, stop_first: bool = True):
    """(pytest exit code or None on timeout, seconds, output)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", *(["-x"] if stop_first else []),
               *tests]
    began = time.time()
    try:
        done = subprocess.run(command, cwd=copy, env=pytest_env(copy), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, time.time() - began, out
    return done.returncode, time.time() - began, done.stdout + done.stderr


def failed_nodes(output: str) -> list[str]:
    return re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.MULTILINE)


def covers(test: str, node: str) -> bool:
    """Whether a test spec (path or node id) selects a failing node id."""
    return node == test or node.startswith(test + "::") or node.startswith(test + "[")


def check_imports_from_copy(copy: Path) -> None:
    code = "import lmn_export, models, runtime; print(lmn_export.__file__, models.__file__, runtime.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=copy, env=pytest_env(copy), capture_output=True, text=True)
    if out.returncode != 0 or any(not Path(p).resolve().is_relative_to(copy.resolve()) for p in out.stdout.split()):
        sys.exit(f"the scratch copy's packages are not the ones imported ({out.stdout.strip()} {out.stderr[-500:]})")


def select(names: list[str] | None) -> list[Mutant]:
    if not names:
        return list(MUTANTS)
    chosen = [m for m in MUTANTS if any(fnmatch.fnmatchcase(m.name, n) for n in names)]
    unknown = [n for n in names if not any(fnmatch.fnmatchcase(m.name, n) for m in MUTANTS)]
    if unknown:
        print(f"unknown mutant(s) {unknown}; --list shows them", file=sys.stderr)
        sys.exit(2)
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--list", action="store_true", help="list the mutants and whether each applies; run nothing")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these mutants (names or patterns)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per pytest run (default 900)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy and print its path")
    parser.add_argument("--show", action="store_true", help="print the tail of each mutant's pytest output")
    args = parser.parse_args(argv)
    mutants = select(args.only)

    problems = check_applies(REPO, mutants)
    if args.list:
        for m in mutants:
            state = "MISSING" if any(p.startswith(m.name + ":") for p in problems) else "ok"
            print(f"{m.name:34} [{state}] {m.file}\n    {m.why}\n    tests: {' '.join(m.tests)}"
                  + (f"\n    note: {m.note}" if m.note else ""))
        for p in problems:
            print(f"MISSING {p}", file=sys.stderr)
        for t in missing_tests(REPO, mutants):
            print(f"NO TEST FILE {t}", file=sys.stderr)
        return 2 if problems else 0
    if problems:
        print("mutants that no longer apply to the code (update tests/mutants.py):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 2
    absent = missing_tests(REPO, mutants)
    if absent:
        print("tests named by mutants do not exist:", file=sys.stderr)
        for t in absent:
            print(f"  {t}", file=sys.stderr)
        return 2

    scratch = Path(tempfile.mkdtemp(prefix="lmn-mutants-"))
    try:
        copy = copy_repo(REPO, scratch)
        check_imports_from_copy(copy)
        print(f"scratch copy: {copy}", flush=True)
        broken: list[str] = []
        if not args.no_baseline:
            tests = sorted({t for m in mutants for t in m.tests})
            code, seconds, output = run_pytest(copy, tests, args.timeout * 2, stop_first=False)
            print(f"baseline (unmutated): pytest exit {code} in {seconds:.0f}s over {len(tests)} test selections",
                  flush=True)
            if code not in (0, 5):
                broken = failed_nodes(output) or ["<no failure list: see output>"]
                print(output[-3000:], file=sys.stderr)
        results = []
        for m in mutants:
            if any(covers(t, node) for t in m.tests for node in broken) or broken == ["<no failure list: see output>"]:
                results.append((m, "BASELINE-FAILS", 0.0, ""))
                print(f"{'BASELINE-FAILS':15} {m.name} (its tests fail without the mutant)", flush=True)
                continue
            path = copy / m.file
            source = path.read_text(encoding="utf-8")
            path.write_text(source.replace(m.original, m.replacement, 1), encoding="utf-8")
            try:
                code, seconds, output = run_pytest(copy, list(m.tests), args.timeout)
            finally:
                path.write_text(source, encoding="utf-8")
            if code is None:
                verdict = "KILLED(timeout)"
            elif code in (1, 2):  # 1: a test failed; 2: collection failed (the mutated code does not import)
                verdict = "KILLED"
            elif code == 0:
                verdict = "SURVIVED"
            else:  # 3 internal error, 4 usage error (e.g. no such test), 5 no tests collected
                verdict = f"ERROR(pytest {code})"
            killer = (failed_nodes(output) or [""])[0]
            results.append((m, verdict, seconds, killer))
            print(f"{verdict:15} {m.name} ({seconds:.0f}s){' by ' + killer if killer else ''}", flush=True)
            if verdict.startswith("ERROR") or args.show:
                print(output[-2000:], file=sys.stderr if verdict.startswith("ERROR") else sys.stdout, flush=True)
        survived = [m.name for m, v, _, _ in results if v == "SURVIVED"]
        errors = [m.name for m, v, _, _ in results if v.startswith(("ERROR", "BASELINE"))]
        killed = [m.name for m, v, _, _ in results if v.startswith("KILLED")]
        print(f"\n{len(killed)} killed, {len(survived)} survived, {len(errors)} not judged, of {len(results)} mutants"
              f" in {sum(s for _, _, s, _ in results):.0f}s of test runs")
        for name in survived:
            m = next(x for x in MUTANTS if x.name == name)
            print(f"  SURVIVED {name}: {m.file}: {m.why}" + (f" ({m.note})" if m.note else ""))
        for name in errors:
            print(f"  NOT JUDGED {name}")
        if args.keep:
            print(f"kept {copy}")
        return 1 if survived else (2 if errors else 0)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
