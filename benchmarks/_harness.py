"""The harness: finds the scenarios, runs each in a child process, prints the table.

The scenarios are the ``scenario_*`` modules of this package; what they share
(result types, statistics, timing) is in ``_common``, which they import instead
of this module. The parent (``python -m benchmarks``) starts one subprocess per
scenario and backend with
``python -m benchmarks._harness run-one SCENARIO BACKEND N REPEATS``; the child
prints one JSON object on stdout. A fresh interpreter per scenario keeps one
scenario's garbage, caches and heap growth out of the next one's figures.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import pkgutil
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._common import Scenario

DISCLAIMER = """\
Read these numbers with care. They come from one machine at one moment, and
timings of operations that take microseconds move by 10-20% from one run to
the next: CPU frequency scaling, other processes, memory layout and the garbage
collector all play a part. Our engine and the raw anyio limit run in the same
process, alternating repetition by repetition, so drift hits both alike:
compare the ratios rather than the absolute figures, look at the spread of the
per-pair ratios, and rerun before trusting a small difference."""

PACKAGE = "benchmarks"
SCENARIO_PREFIX = "scenario_"
"""The harness runs every module of the package whose name starts with this."""
EVENTS = "events"
"""Scenario name of benchmarks/scenario_events.py (optional; no raw comparison)."""
EVENTS_MODULE = f"{PACKAGE}.{SCENARIO_PREFIX}{EVENTS}"
EVENTS_N = {"full": 10_000, "quick": 1_000, "smoke": 200}

REPEATS = {"full": 9, "quick": 3, "smoke": 2}


def scenario_modules() -> list[str]:
    """The ``scenario_*`` modules with a raw comparison: every one but the events module."""
    return sorted(
        f"{PACKAGE}.{info.name}"
        for info in pkgutil.iter_modules([str(Path(__file__).resolve().parent)])
        if info.name.startswith(SCENARIO_PREFIX) and f"{PACKAGE}.{info.name}" != EVENTS_MODULE
    )


def scenarios() -> dict[str, Scenario]:
    """Every scenario with a raw comparison, in the order they run.

    Each module of ``scenario_modules()`` defines ``SCENARIOS`` (name -> Scenario)
    and ``ORDER`` (an int: modules run by ascending ``ORDER``).
    """
    tables: list[tuple[int, str, dict[str, Scenario]]] = []
    for name in scenario_modules():
        module = importlib.import_module(name)
        order = getattr(module, "ORDER", None)
        table = getattr(module, "SCENARIOS", None)
        if isinstance(order, bool) or not isinstance(order, int):
            raise TypeError(f"{name}.ORDER must be an int, got {order!r}")
        if not isinstance(table, dict) or not all(
            isinstance(scenario, Scenario) and key == scenario.name
            for key, scenario in table.items()
        ):
            raise TypeError(
                f"{name}.SCENARIOS must map each Scenario's name to it, got {table!r:.200}"
            )
        tables.append((order, name, table))
    found: dict[str, Scenario] = {}
    origin: dict[str, str] = {}
    for _, module_name, table in sorted(tables, key=lambda entry: entry[:2]):
        for key, scenario in table.items():
            if key in found:
                raise ValueError(
                    f"scenario names must be unique, got {key!r} in {origin[key]} "
                    f"and in {module_name}"
                )
            found[key] = scenario
            origin[key] = module_name
    return found


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


THREAD_ROUND_TRIP = "thread round trip (anyio.to_thread.run_sync no-op)"


def format_disk(results: Sequence[dict[str, Any]]) -> str | None:
    """The fsync latency each durable scenario measured on its temp directory, then the
    bare thread round trip of those that measured one; None if none measured the disk."""
    rows: list[tuple[str, ...]] = []
    hops: list[str] = []
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
        if "thread_roundtrip_us" in extra:
            # A durable write from the event loop pays at least one: as much as a fast fsync.
            hops.append(
                f"{THREAD_ROUND_TRIP}: median {extra['thread_roundtrip_us']:.1f} µs, "
                f"p90 {extra['thread_roundtrip_p90_us']:.1f} µs "
                f"({result['scenario']}, {result['backend']}, "
                f"{extra['thread_roundtrip_samples']} calls)"
            )
    if not rows:
        return None
    table = _render(
        ("scenario", "backend", "fsync median", "fsync p99", "samples", "directory"), rows
    )
    return "\n".join([table, "", *hops]) if hops else table


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
