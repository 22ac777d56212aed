"""``python -m benchmarks``: every scenario in a fresh subprocess, a table, JSON.

Options: ``--quick`` (small N, few repetitions), ``--backend asyncio|trio|both``,
``--only NAME`` (scenario name substring), ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ._harness import (
    DISCLAIMER,
    EVENTS,
    EVENTS_N,
    REPEATS,
    events_available,
    format_disk,
    format_figures,
    format_results,
    machine,
    scenarios,
    versions,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"
# A child that runs this long is stuck, not slow: the longest child takes well under a minute.
CHILD_TIMEOUT = 600.0


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="Benchmark the actor engine against the raw anyio limit.",
    )
    parser.add_argument("--quick", action="store_true", help="small N and few repetitions")
    parser.add_argument("--backend", choices=("asyncio", "trio", "both"), default="both")
    parser.add_argument("--only", metavar="NAME", help="run scenarios whose name contains NAME")
    parser.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    # For the test suite: a tiny N that checks the plumbing, not the speed.
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _run_child(name: str, backend: str, n: int, repeats: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks._harness",
        "run-one",
        name,
        backend,
        str(n),
        str(repeats),
    ]
    try:
        done = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return {"scenario": name, "backend": backend, "error": f"timed out after {CHILD_TIMEOUT} s"}
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        last = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode}"]
        return {"scenario": name, "backend": backend, "error": last[0][:120]}
    # The record is the last line: a scenario module may print on its own.
    lines = done.stdout.strip().splitlines()
    try:
        result: dict[str, Any] = json.loads(lines[-1])
    except (IndexError, ValueError):
        return {"scenario": name, "backend": backend, "error": "no JSON record on stdout"}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    registry = scenarios()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats = REPEATS[mode]
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    only: str | None = args.only
    names = [name for name in registry if only is None or only in name]
    with_events = only is None or only in EVENTS
    if with_events and not events_available():
        with_events = False
        if only is not None:
            print("scenario 'events' is not available (no benchmarks/scenario_events.py)")
    if not names and not with_events:
        print(f"no scenario matches {only!r}; known: {', '.join([*registry, EVENTS])}")
        return 2

    info = {"machine": machine(), "versions": versions()}
    print(DISCLAIMER)
    print()
    for key, value in info["machine"].items():
        print(f"{key:>10}: {value}")
    print(f"  versions: {', '.join(f'{k} {v}' for k, v in info['versions'].items())}")
    print(f"      mode: {mode}, {repeats} alternating repetitions each (medians)")
    print()

    results: list[dict[str, Any]] = []
    for name in names:
        n = registry[name].n[mode]
        for backend in backends:
            print(f"running {name} on {backend} (N={n:,})...", file=sys.stderr, flush=True)
            results.append(_run_child(name, backend, n, repeats))
    figures: list[dict[str, Any]] = []
    if with_events:
        # The events scenario measures validation and encoding, which do not
        # touch the event loop: one run serves both backends.
        print(f"running {EVENTS}...", file=sys.stderr, flush=True)
        figures.append(_run_child(EVENTS, "n/a", EVENTS_N[mode], 1))

    if results:
        print(format_results(results))
        disk = format_disk(results)
        if disk is not None:
            # The durable figures are only as fast as this disk: print it beside them.
            print()
            print("Disk under each durable scenario's temp directory (os.write + os.fsync):")
            print(disk)
    if figures:
        if results:
            print()
        print("Figures without a raw comparison (medians):")
        print(format_figures(figures))

    path: Path = args.json
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**info, "mode": mode, "results": results, "figures": figures}
    path.write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"\nwrote {path}")
    failed = [entry for entry in [*results, *figures] if "error" in entry]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
