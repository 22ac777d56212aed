"""``python -m benchmarks``: every scenario in a fresh subprocess, a table, JSON.

Options: ``--quick`` (small N, few repetitions), ``--backend asyncio|trio|both``,
``--only NAME`` (scenario name substring), ``--skip NAME`` (leave those out),
``--json PATH``, ``--plot DIR`` (PNG charts).
A rich progress bar shows on a terminal (one task per scenario); the output is plain
when stdout is not a TTY or with ``--smoke``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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
        "--skip",
        metavar="NAME",
        action="append",
        default=[],
        help="leave out scenarios whose name contains NAME (repeatable)",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        type=Path,
        default=DEFAULT_JSON,
        help="where to write the results (default: benchmarks/results/latest.json)",
    )
    parser.add_argument(
        "--plot",
        metavar="DIR",
        type=Path,
        help="draw PNG charts (throughput, latency percentiles, durable writers) into DIR",
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


Step = Callable[[str, str], None]
"""``step(task, message)``: a child is about to run (``message`` says which)."""


@contextmanager
def _progress(tasks: dict[str, int], fancy: bool) -> Iterator[tuple[Step, Callable[[str], None]]]:
    """``(start, done)`` callbacks: a rich progress bar (one task per scenario) or plain lines."""
    if not fancy:

        def plain_start(task: str, message: str) -> None:
            print(message, file=sys.stderr, flush=True)

        yield plain_start, lambda task: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(file=sys.stderr),
    ) as progress:
        ids = {name: progress.add_task(name, total=total) for name, total in tasks.items()}

        def start(task: str, message: str) -> None:
            progress.update(ids[task], description=message.removesuffix("..."))

        def done(task: str) -> None:
            progress.update(ids[task], advance=1, description=task)

        yield start, done


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    registry = scenarios()
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    repeats = REPEATS[mode]
    backends = ("asyncio", "trio") if args.backend == "both" else (args.backend,)
    only: str | None = args.only
    skip: list[str] = args.skip

    def chosen(name: str) -> bool:
        return (only is None or only in name) and not any(part in name for part in skip)

    names = [name for name in registry if chosen(name)]
    with_events = chosen(EVENTS)
    if with_events and not events_available():
        with_events = False
        if only is not None:
            print("scenario 'events' is not available (no benchmarks/scenario_events.py)")
    if not names and not with_events:
        asked = f"{only!r}" + "".join(f" without {part!r}" for part in skip)
        print(f"no scenario matches {asked}; known: {', '.join([*registry, EVENTS])}")
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
    figures: list[dict[str, Any]] = []
    tasks = {name: len(backends) for name in names}
    if with_events:
        tasks[EVENTS] = 1
    fancy = sys.stdout.isatty() and not args.smoke
    with _progress(tasks, fancy) as (start, done):
        for name in names:
            n = registry[name].n[mode]
            for backend in backends:
                start(name, f"running {name} on {backend} (N={n:,})...")
                results.append(_run_child(name, backend, n, repeats))
                done(name)
        if with_events:
            # The events scenario measures validation and encoding, which do not
            # touch the event loop: one run serves both backends.
            start(EVENTS, f"running {EVENTS}...")
            figures.append(_run_child(EVENTS, "n/a", EVENTS_N[mode], 1))
            done(EVENTS)

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
    if args.plot is not None:
        from ._plot import plot

        charts = plot(document, args.plot)
        for chart in charts:
            print(f"wrote {chart}")
        if not charts:
            print(f"no chart: none of the scenarios run has data to plot (--plot {args.plot})")
    failed = [entry for entry in [*results, *figures] if "error" in entry]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
