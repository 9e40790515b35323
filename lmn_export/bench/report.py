"""What a run reports: the printed report, the results file's JSON text, and the charts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click
import numpy as np

from runtime.atomic import atomic_path

MATPLOTLIB_HINT = "--plot needs matplotlib: pip install 'lmn[bench]'"


def print_report(r: dict) -> None:
    m = r["machine"]
    click.echo(f"\nmachine: {m['cpu']} ({m['cores']} cores), {m['os']}; numpy {m['numpy']}, onnxruntime {m['onnxruntime']}")
    if "decode" in r:
        print_decode(r)
    if r.get("decode_speed"):
        print_speed(r)
    if "ttft" in r:
        click.echo("\ntime to first token (ms, median of 3):")
        for row in r["ttft"]:
            click.echo(f"  {row['variant']:<14} {row['prompt_tokens']:>5} tokens: {row['ms_median']:9.2f}")
    if r.get("prefill"):
        print_prefill(r["prefill"])
    if "lmn" in r:
        files = r["lmn"]["files"]
        click.echo("\nmodel files: " + ", ".join(f"{k} {v['bytes'] / 1024:.0f} KB" for k, v in files.items() if k.startswith("model.")))
    if r.get("quality"):
        click.echo("\nheld-out bits per character (val split):")
        for row in r["quality"]:
            click.echo(f"  {row['model']:<5} positions {row['context']:<18} {row['bpc']:.4f} bpc over {row['tokens']:,} chars")
    if r.get("footprint"):
        print_footprint(r["footprint"])
    if r.get("reach"):
        click.echo("\nreach: held-out bits per character by position, one stream from the start of the val split:")
        for row in r["reach"]:
            bins = "  ".join(f"{b['from']}-{b['to']}: {b['bpc']:.3f}" for b in row["bins"])
            click.echo(f"  {row['model']} ({Path(row['checkpoint']).name}, carry {row['carry']}): {bins}")
    if r.get("recall"):
        print_recall(r["recall"])
    if "train" in r:
        print_train(r)
    click.echo("\nsummary: " + json.dumps(r["summary"], indent=None))


def print_footprint(rows: list[dict]) -> None:
    """Per precision: graph files and resident memory against the weights, and the goals."""
    click.echo("\nfootprint per precision (weights: each distinct tensor of the step graph once; resident: what loading "
               "the model with every graph opened adds to a process running onnxruntime):")
    for row in rows:
        goals = row["goals"]
        click.echo(f"  {row['precision']:<13} {row['files']} files {row['file_bytes'] / 1e6:7.2f} MB, weights "
                   f"{row['weight_bytes'] / 1e6:6.2f} MB: files {row['files_vs_weights']:5.2f}x (goal <= "
                   f"{goals['files_vs_weights']['limit']}x: {'met' if goals['files_vs_weights']['met'] else 'missed'}); "
                   f"resident {row['rss_bytes'] / 1e6:6.1f} MB, {row['rss_vs_weights_and_state']:5.1f}x weights + state "
                   f"(goal <= {goals['rss_vs_weights_and_state']['limit']}x: "
                   f"{'met' if goals['rss_vs_weights_and_state']['met'] else 'missed'})")


def print_prefill(rows: list[dict]) -> None:
    """Prefill vs stepping per width: the break-even search, then the second turn against its goals."""
    for row in rows:
        even = row["break_even"]
        click.echo(f"\nprefill vs stepping, {row['model']} (width {row['n_embd']}), chunks fed at pointer "
                   f"{even['from_pointer']:,} (ms, median):")
        for e in even["rows"]:
            click.echo(f"  {e['tokens']:>5} tokens (prefill_{e['graph_size']}): prefill {e['prefill_ms']:8.2f}  "
                       f"stepping {e['stepping_ms']:8.2f}  ratio {e['ratio']:.2f}")
        click.echo(f"  break-even: {even['break_even_tokens'] or 'none in the lengths measured'} tokens")
        turn = row["second_turn"]
        click.echo(f"  a {turn['turn']:,}-token turn after {turn['history']:,} tokens (ms, median): "
                   + ", ".join(f"{name} {ms:.1f}" for name, ms in turn["ms_median"].items()))
        for name, goal in turn["goals"].items():
            click.echo(f"  {name.replace('_', ' ')}: {turn[name]:.2f}x (goal <= {goal['goal']}x: "
                       f"{'met' if goal['met'] else 'missed'})")


def print_speed(r: dict) -> None:
    """The decode-speed section: every variant's timing per preset, then per precision the floor,
    the memory-free twin and the files, then the goals."""
    for row in r["decode_speed"]:
        click.echo(f"\ndecode speed, {row['preset']} ({row['weights']} weights), us per token:")
        click.echo(f"  {'variant':<22} {'p50':>9} {'mean':>9} {'p99':>9}  per-round p50")
        for name, t in row["variants"].items():
            rounds = " ".join(f"{x:.0f}" for x in t["round_p50_us"])
            click.echo(f"  {name:<22} {t['p50_us']:>9.1f} {t['mean_us']:>9.1f} {t['p99_us']:>9.1f}  {rounds}")
        py = row["python"]
        if py:
            click.echo(f"  runtime stepper overhead {py['overhead_us']:.1f} us/token (bare run {py['bare_run_us']:.1f} us)")
        for precision, prof in row["profile_levels_0"].items():
            top = ", ".join(f"{o['op']} {o['share']:.0%} ({o['nodes']})" for o in prof["ops"][:6])
            click.echo(f"  profile, 0-level fast path {precision} ({prof['nodes_per_run']:.0f} nodes, "
                       f"{prof['kernel_us_per_run']:.0f} us in kernels): {top}")
    speed = r["summary"]["speed"]
    click.echo(f"\ndecode speed against the floor (fast paths, {r['settings']['threads']} thread(s); floor = weight bytes "
               "per token / this machine's read bandwidth on a buffer of that size, measured in this run):")
    click.echo(f"  {'preset':<11} {'precision':<13} {'p50 us':>9} {'mean us':>9} {'weight KB':>10} {'read GB/s':>9} "
               f"{'floor us':>9} {'vs floor':>8} {'no-mem us':>9} {'mem cost':>8} {'files KB':>9}")
    for preset, precisions in speed.items():
        for precision, f in precisions.items():
            click.echo(f"  {preset:<11} {precision:<13} {f['p50_us']:>9.1f} {f['mean_us']:>9.1f} {f['weight_bytes'] / 1e3:>10.0f} "
                       f"{f['read_bytes_per_s'] / 1e9:>9.1f} {f['floor_us']:>9.1f} {f['vs_floor']:>7.2f}x "
                       f"{f['no_memory_mean_us']:>9.1f} {f['ratio_vs_no_memory_mean']:>7.2f}x {f['file_bytes'] / 1e3:>9.0f}")
    goals = r["summary"]["speed_goals"]
    if goals:
        click.echo("goals:")
    for g in goals:
        click.echo(f"  {'met   ' if g['met'] else 'MISSED'} {g['goal']}: {g['value']:.2f} (goal <= {g['limit']})")


def print_decode(r: dict) -> None:
    click.echo(f"threads {r['settings']['threads']}, batch 1, {r['settings']['tokens']} tokens x {r['settings']['reps']} reps "
               f"after {r['settings']['warmup']} warm-up; text: {r['text']}\n")
    click.echo(f"{'model':<6} {'layout':<11} {'context':>9} {'p50 us':>9} {'p99 us':>9} {'tok/s':>9} "
               f"{'state bytes':>13} {'RSS MB':>8}  reached by")
    for row in r["decode"]:
        click.echo(f"{row['model']:<6} {row['layout']:<11} {row['n_ctx']:>9,} {row['p50_us']:>9.1f} {row['p99_us']:>9.1f} "
                   f"{row['tokens_per_s']:>9,.0f} {row['state_bytes']:>13,} {row['rss_bytes'] / 2**20:>8.1f}  {row['reached_by']}")
    nm = r["no_memory"]
    sequential = r.get("memory_overhead_ratio_sequential", r["memory_overhead_ratio"])
    click.echo(f"\nLMN without memory (same model and code, max_levels 1): p50 {nm['p50_us']:.1f} us; memory overhead "
               f"{sequential:.2f}x vs the LMN at the first context, timed apart (interleaved figure: decode speed below)")


def print_train(r: dict) -> None:
    t, rows = r["settings"]["train"], r["train"]
    device = rows[0]["device"] if rows else t["device"]
    threads = f", {r['settings']['threads']} torch thread(s)" if device == "cpu" else ""
    click.echo(f"\ntraining throughput (forward + backward + AdamW step, fp32, {device}{threads}; batch {t['batch']}; "
               f"tokens/s, median of {t['rounds']} interleaved rounds of {t['steps']} steps):")
    ratios = r["summary"].get("train_ratio", {})
    from models.config import preset

    for row in rows:
        cfg = preset(row["preset"])
        note = " (its position table)" if row["block"] < t["block"] else ""
        line = f"  {row['preset']:<11} block {row['block']:>5}{note:<21} {row['tokens_per_s']:>10,.0f} tokens/s"
        if row["preset"].startswith("gpt2") and str(cfg.n_embd) in ratios:
            line += f"   LMN / GPT-2 at width {cfg.n_embd}: {ratios[str(cfg.n_embd)]:.2f}"
        click.echo(line)


def finite_json(value, where: str = "") -> tuple[object, list[str]]:
    """`value` as standard JSON data: every NaN or infinite number becomes None (JSON null).

    Returns (the copy, where each replaced number was, e.g. "quality[0].bpc"): strict JSON readers
    reject NaN, and a null plus its place in the list says "not measured" without a fake number.
    """
    if isinstance(value, dict):
        pairs = [(k, finite_json(v, f"{where}.{k}" if where else str(k))) for k, v in value.items()]
        return {k: v for k, (v, _) in pairs}, [p for _, (_, bad) in pairs for p in bad]
    if isinstance(value, (list, tuple)):
        items = [finite_json(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [v for v, _ in items], [p for _, bad in items for p in bad]
    if isinstance(value, (bool, np.bool_)):
        return bool(value), []
    if isinstance(value, (int, np.integer)):
        return int(value), []
    if isinstance(value, (float, np.floating)):
        return (float(value), []) if math.isfinite(value) else (None, [where])
    return value, []


def results_json(r: dict) -> tuple[str, list[str]]:
    """The results file's text (standard JSON: non-finite numbers are null, their places listed
    under `non_finite`) and that list."""
    clean, replaced = finite_json(r)
    clean["non_finite"] = replaced
    return json.dumps(clean, indent=2, allow_nan=False) + "\n", replaced


def plot(r: dict, directory: Path) -> list[Path]:
    """The charts of the sections that ran: decode latency and state bytes by context, recall by distance."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise click.ClickException(MATPLOTLIB_HINT) from None
    charts = []  # (file name, x label, y label, log y, {series label: [(x, y)]})
    if r.get("decode"):
        for key, label, name in (("p50_us", "decode latency p50 (us/token)", "latency.png"),
                                 ("state_bytes", "state bytes per stream", "state.png")):
            series = {" ".join(s): [(row["n_ctx"], row[key]) for row in r["decode"] if (row["model"], row["layout"]) == s]
                      for s in sorted({(row["model"], row["layout"]) for row in r["decode"]})}
            charts.append((name, "context (tokens)", label, True, series))
    if r.get("recall"):
        series = {}
        for row in r["recall"]:
            name = f"{row['model']} ({Path(row['checkpoint']).name})"
            series[name] = [(e["distance"], 100 * e["accuracy"]) for e in row["by_distance"]]
            if row["by_distance"] and "accuracy_memory_zeroed" in row["by_distance"][0]:
                series[name + ", memory zeroed"] = [(e["distance"], 100 * e["accuracy_memory_zeroed"])
                                                    for e in row["by_distance"]]
        series["chance"] = [(e["distance"], 10.0) for e in r["recall"][0]["by_distance"]] if r["recall"] else []
        charts.append(("recall.png", "key-to-query distance (tokens)", "recall accuracy (%)", False, series))
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, xlabel, ylabel, log_y, series in charts:
        fig, ax = plt.subplots(figsize=(6, 4))
        for label, pts in series.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if label == "chance" else "-")
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        with atomic_path(directory / name) as tmp:  # the temp name has no .png suffix: say the format
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append(directory / name)
    return written


def print_recall(rows: list[dict]) -> None:
    """Recall accuracy by key-to-query distance (chance 10%); LMNs also with the memory zeroed."""
    click.echo("\nrecall: accuracy of the digit written `distance` characters before the query (chance 10%):")
    for row in rows:
        cells = "  ".join(f"{e['distance']:,}: {e['accuracy']:.0%}"
                          + (f" (zeroed {e['accuracy_memory_zeroed']:.0%})" if "accuracy_memory_zeroed" in e else "")
                          for e in row["by_distance"])
        click.echo(f"  {row['model']} ({Path(row['checkpoint']).name}, carry {row['carry']}): {cells}")
