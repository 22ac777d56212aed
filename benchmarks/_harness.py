"""What every scenario shares: the result record, statistics, the machine, the table.

The parent (``python -m benchmarks``) starts one subprocess per scenario and
backend with ``python -m benchmarks._harness run-one SCENARIO BACKEND N REPEATS``;
the child prints one JSON object on stdout. A fresh interpreter per scenario
keeps one scenario's garbage, caches and heap growth out of the next one's figures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

DISCLAIMER = """\
Read these numbers with care. They come from one machine at one moment, and
timings of operations that take microseconds move by 10-20% from one run to
the next: CPU frequency scaling, other processes, memory layout and the garbage
collector all play a part. Our engine and the raw anyio limit run in the same
process, alternating repetition by repetition, so drift hits both alike:
compare the ratios rather than the absolute figures, look at the spread of the
per-pair ratios, and rerun before trusting a small difference."""

EVENTS = "events"
"""Scenario name of benchmarks/scenario_events.py (optional; no raw comparison)."""
EVENTS_MODULE = "benchmarks.scenario_events"
EVENTS_N = {"full": 10_000, "quick": 1_000, "smoke": 200}


@dataclass(frozen=True)
class Measurement:
    """What a scenario measured: medians of ours and of the raw limit, in ``unit``."""

    ours: float
    limit: float
    pair_ratios: list[float]
    """ours / limit of each alternating pair of repetitions: their spread shows the noise."""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    name: str
    run: Callable[[int, int], Awaitable[Measurement]]
    """``run(n, repeats)``: backend-independent, started with ``anyio.run``."""
    unit: str
    higher_is_better: bool
    target: float | None
    """The issue's target for ours / limit; None where the issue sets none."""
    n: dict[str, int]
    """N per repetition for each mode: full, quick, smoke."""
    absolute: bool = False
    """The target is on ours itself, in ``unit`` (like "p99 < 10 ms"), not on ours / limit."""

    @property
    def target_text(self) -> str:
        return target_text(
            self.target,
            higher_is_better=self.higher_is_better,
            unit=self.unit if self.absolute else None,
        )

    def met(self, ratio: float, ours: float | None = None) -> bool | None:
        """Whether the result meets the target; None when there is no target.

        ``ratio`` is ours / limit; an absolute target judges ``ours`` instead.
        """
        if self.absolute:
            if ours is None:
                raise ValueError(f"{self.name}: an absolute target judges ours, pass it")
            return meets(ours, self.target, higher_is_better=self.higher_is_better, absolute=True)
        return meets(ratio, self.target, higher_is_better=self.higher_is_better)


def target_text(target: float | None, *, higher_is_better: bool, unit: str | None = None) -> str:
    """``">= 0.6"`` for a target on ours / limit, ``"< 10 ms"`` for one on ours in ``unit``."""
    if target is None:
        return "-"
    if unit is not None:
        return f"{'>=' if higher_is_better else '<'} {target:g} {unit}"
    return f"{'>=' if higher_is_better else '<='} {target:g}"


def meets(
    value: float, target: float | None, *, higher_is_better: bool, absolute: bool = False
) -> bool | None:
    """Whether ``value`` meets ``target`` (None without one); an absolute upper bound is strict."""
    if target is None:
        return None
    if higher_is_better:
        return value >= target
    return value < target if absolute else value <= target


REPEATS = {"full": 9, "quick": 3, "smoke": 2}


def scenarios() -> dict[str, Scenario]:
    """Every scenario with a raw comparison, in the order they run."""
    from .scenario_actors import SCENARIOS as actors
    from .scenario_breakers import SCENARIOS as breakers
    from .scenario_dispatch import SCENARIOS as dispatch
    from .scenario_durable import SCENARIOS as durable
    from .scenario_peers import SCENARIOS as peers
    from .scenario_resolver import SCENARIOS as resolver

    return {**actors, **dispatch, **durable, **breakers, **resolver, **peers}


# ---------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: always one of the observed values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# ------------------------------------------------------------------- context


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> dict[str, str]:
    found: dict[str, str] = {}
    # aiobreaker, pybreaker and tornado: the breaker scenario's peers (tornado decides
    # whether pybreaker is measured async or sync); pykka, thespian and eventsourcing: the
    # peers scenarios'.
    for package in (
        "actorbus",
        "anyio",
        "trio",
        "msgspec",
        "aiobreaker",
        "pybreaker",
        "tornado",
        "pykka",
        "thespian",
        "eventsourcing",
    ):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def events_available() -> bool:
    return importlib.util.find_spec(EVENTS_MODULE) is not None


# ------------------------------------------------------------------ children


def run_one(name: str, backend: str, n: int, repeats: int) -> dict[str, Any]:
    """Run one scenario in this process and return its result record."""
    if name == EVENTS:
        module = importlib.import_module(EVENTS_MODULE)
        figures = module.run(n)
        return {
            "scenario": EVENTS,
            "backend": backend,
            "unit": "µs",
            "n": n,
            "figures": {str(key): float(value) for key, value in figures.items()},
        }

    import functools

    import anyio

    scenario = scenarios()[name]
    measured = anyio.run(functools.partial(scenario.run, n, repeats), backend=backend)
    ratio = measured.ours / measured.limit
    return {
        "scenario": name,
        "backend": backend,
        "unit": scenario.unit,
        "n": n,
        "repeats": repeats,
        "ours": measured.ours,
        "limit": measured.limit,
        "ratio": ratio,
        "target": scenario.target_text,
        "met": scenario.met(ratio, measured.ours),
        "extra": {
            "pair_ratio_min": min(measured.pair_ratios),
            "pair_ratio_max": max(measured.pair_ratios),
            **measured.extra,
        },
    }


# --------------------------------------------------------------------- table


def _number(value: float, unit: str) -> str:
    return f"{value:,.0f}" if unit.endswith("/s") else f"{value:,.1f}"


def _met(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


def _render(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def format_results(results: Sequence[dict[str, Any]]) -> str:
    header = (
        "scenario",
        "backend",
        "ours",
        "raw limit",
        "unit",
        "ours/limit",
        "pair range",
        "target",
        "met",
    )
    rows: list[tuple[str, ...]] = []
    for result in results:
        name, backend, unit = result["scenario"], result["backend"], result.get("unit", "")
        if "error" in result:
            rows.append((name, backend, "error", "", unit, "", "", "", result["error"]))
            continue
        extra = result["extra"]
        # Figures behind the headline (one row each, no target) come before it.
        for row in extra.get("rows", ()):
            rows.append(
                (
                    row["label"],
                    backend,
                    _number(row["ours"], row["unit"]),
                    _number(row["limit"], row["unit"]),
                    row["unit"],
                    f"{row['ours'] / row['limit']:.2f}",
                    f"{row['pair_ratio_min']:.2f}-{row['pair_ratio_max']:.2f}",
                    # A row may carry a target of its own (the durable scenarios' rows do).
                    row.get("target", "-"),
                    _met(row.get("met")),
                )
            )
        label = extra.get("label", f"{name} (p50)" if "ours_p99" in extra else name)
        rows.append(
            (
                label,
                backend,
                _number(result["ours"], unit),
                _number(result["limit"], unit),
                unit,
                f"{result['ratio']:.2f}",
                f"{extra['pair_ratio_min']:.2f}-{extra['pair_ratio_max']:.2f}",
                result["target"],
                _met(result["met"]),
            )
        )
        if "ours_p99" in extra:
            p99_ratio = extra["ours_p99"] / extra["limit_p99"]
            rows.append(
                (
                    f"{name} (p99)",
                    backend,
                    _number(extra["ours_p99"], unit),
                    _number(extra["limit_p99"], unit),
                    unit,
                    f"{p99_ratio:.2f}",
                    "",
                    "-",
                    "-",
                )
            )
    return _render(header, rows)


def format_disk(results: Sequence[dict[str, Any]]) -> str | None:
    """The fsync latency each durable scenario measured on its temp directory; None if none did."""
    rows: list[tuple[str, ...]] = []
    for result in results:
        extra = result.get("extra", {})
        if "fsync_ms" not in extra:
            continue
        rows.append(
            (
                result["scenario"],
                result["backend"],
                f"{extra['fsync_ms']:.3f} ms",
                f"{extra['fsync_p99_ms']:.3f} ms",
                str(extra["fsync_samples"]),
                extra["temp_dir"],
            )
        )
    if not rows:
        return None
    return _render(
        ("scenario", "backend", "fsync median", "fsync p99", "samples", "directory"), rows
    )


def format_figures(figures: Sequence[dict[str, Any]]) -> str:
    rows: list[tuple[str, ...]] = []
    for entry in figures:
        if "error" in entry:
            rows.append((entry["scenario"], "error", entry["error"]))
            continue
        for key, value in entry["figures"].items():
            rows.append((entry["scenario"], key, f"{value:,.2f} {entry['unit']}"))
    return _render(("scenario", "measure", "median"), rows)


# ---------------------------------------------------------------------- main


def main(argv: Sequence[str]) -> int:
    if len(argv) != 5 or argv[0] != "run-one":
        print(
            "usage: python -m benchmarks._harness run-one SCENARIO BACKEND N REPEATS",
            file=sys.stderr,
        )
        return 2
    _, name, backend, n, repeats = argv
    print(json.dumps(run_one(name, backend, int(n), int(repeats))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
