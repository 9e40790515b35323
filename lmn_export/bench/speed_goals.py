"""The decode-speed section's headline figures (`summary.speed`) and the goals they are held to."""

from __future__ import annotations

from dataclasses import dataclass

FIELDS = ("p50_us", "mean_us", "weight_bytes", "floor_us", "vs_floor", "no_memory_mean_us",
          "ratio_vs_no_memory_mean", "file_bytes")


@dataclass(frozen=True)
class Goal:
    """`value(speed)` <= `limit`, where `speed` is summary.speed; None: not measured in this run."""

    text: str
    limit: float
    value: object  # (speed) -> float | None


def _get(speed: dict, preset: str, precision: str, field: str) -> float | None:
    return speed.get(preset, {}).get(precision, {}).get(field)


def _ratio(speed: dict, preset: str, field: str, top: str, bottom: str) -> float | None:
    a, b = _get(speed, preset, top, field), _get(speed, preset, bottom, field)
    return a / b if a is not None and b else None


GOALS = (
    Goal("logmem-512: int4 mean / fp32 mean", 0.35, lambda s: _ratio(s, "logmem-512", "mean_us", "int4", "fp32")),
    Goal("logmem-512: fp32 mean / its floor", 1.5, lambda s: _get(s, "logmem-512", "fp32", "vs_floor")),
    Goal("logmem-512: int4 mean / its floor", 1.5, lambda s: _get(s, "logmem-512", "int4", "vs_floor")),
    Goal("logmem-128: int4 mean / fp32 mean", 0.6, lambda s: _ratio(s, "logmem-128", "mean_us", "int4", "fp32")),
    *(Goal(f"{preset}: memory cost, {precision} (mean / memory-free mean)", 1.5,
           lambda s, preset=preset, precision=precision: _get(s, preset, precision, "ratio_vs_no_memory_mean"))
      for preset in ("logmem-128", "logmem-512") for precision in ("fp32", "int4")),
    *(Goal(f"{preset}: int4 files / fp32 files", 0.2,
           lambda s, preset=preset: _ratio(s, preset, "file_bytes", "int4", "fp32"))
      for preset in ("logmem-32", "logmem-128", "logmem-512")),
)


def speed_summary(rows: list[dict]) -> dict:
    """summary.speed: {preset: {precision: {FIELDS...}}} from the decode-speed rows."""
    return {row["preset"]: {p: {k: figures[k] for k in (*FIELDS, "read_bytes_per_s")} for p, figures in row["precisions"].items()}
            for row in rows}


def goal_results(speed: dict) -> list[dict]:
    """Every goal this run measured: {goal, value, limit, met}."""
    out = []
    for goal in GOALS:
        value = goal.value(speed)
        if value is not None:
            out.append({"goal": goal.text, "value": value, "limit": goal.limit, "met": bool(value <= goal.limit)})
    return out
