"""``--plot DIR``: PNG charts of a results document (the JSON ``python -m benchmarks`` writes).

Each chart is drawn only when the document holds its data: a run with
``--only`` draws the charts of the scenarios it ran. Matplotlib renders with
the Agg backend (no display needed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure


def _ok(results: Sequence[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    return [r for r in results if r["scenario"].startswith(prefix) and "error" not in r]


def _save(figure: Figure, directory: Path, name: str) -> Path:
    path = directory / name
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _bars(axes: Axes, groups: dict[str, dict[str, float]], unit: str) -> None:
    """Grouped bars: one group per key of ``groups``, one bar per series within it."""
    series = list(dict.fromkeys(name for group in groups.values() for name in group))
    width = 0.8 / max(1, len(series))
    for i, name in enumerate(series):
        xs = [g + i * width for g, group in enumerate(groups.values()) if name in group]
        ys = [group[name] for group in groups.values() if name in group]
        axes.bar(xs, ys, width, label=name)
    axes.set_xticks(
        [g + width * (len(series) - 1) / 2 for g in range(len(groups))], list(groups), fontsize=8
    )
    axes.set_ylabel(unit)
    axes.legend(fontsize=8)


def _scale(
    runs: Sequence[dict[str, Any]],
    directory: Path,
    *,
    count: str,
    xlabel: str,
    unit: str,
    title: str,
    name: str,
) -> Path | None:
    """Ours and raw of each run's rows against the row's ``count`` (log x)."""
    if not runs:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        rows = run["extra"]["rows"]
        counts = [row[count] for row in rows]
        backend = run["backend"]
        axes.plot(counts, [row["ours"] for row in rows], "o-", label=f"ours ({backend})")
        axes.plot(counts, [row["limit"] for row in rows], "s--", label=f"raw anyio ({backend})")
    axes.set_xscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(unit)
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.legend(fontsize=8)
    return _save(figure, directory, name)


def fanout_scale(results: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """Deliveries/s against the number of subscriptions (fanout_scale), ours and raw."""
    return _scale(
        _ok(results, "fanout_scale"),
        directory,
        count="subscriptions",
        xlabel="subscriptions",
        unit="deliveries/s",
        title="Fan-out throughput vs subscriptions",
        name="fanout_scale.png",
    )


def actors_scale(results: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """Aggregate msgs/s against the number of actors (actors_scale), ours and raw."""
    return _scale(
        _ok(results, "actors_scale"),
        directory,
        count="actors",
        xlabel="actors (raw: streams and consumer tasks)",
        unit="msgs/s",
        title="Aggregate throughput vs number of actors",
        name="actors_scale.png",
    )


def ask_latency(results: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """Ask round trip p50 and p99 (µs): ask_roundtrip (ours, raw) and peers_ask (the peers)."""
    groups: dict[str, dict[str, float]] = {}
    for run in _ok(results, "ask_roundtrip"):
        extra, backend = run["extra"], run["backend"]
        groups[f"p50 {backend}"] = {"ours": run["ours"], "raw anyio": run["limit"]}
        groups[f"p99 {backend}"] = {"ours": extra["ours_p99"], "raw anyio": extra["limit_p99"]}
    for run in _ok(results, "peers_ask"):
        extra, backend = run["extra"], run["backend"]
        for p in ("p50", "p99"):
            group = groups.setdefault(f"{p} {backend}", {})
            for name, value in extra[f"{p}_us"].items():
                group.setdefault(name, value)
    if not groups:
        return None
    figure, axes = plt.subplots(figsize=(8, 4.5))
    _bars(axes, groups, "µs per round trip")
    axes.set_title("ask round trip latency (lower is better)")
    return _save(figure, directory, "ask_latency.png")


def commit_to_handler(results: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """commit_to_handler p50 and p99 (ms), ours and raw, per durability and backend."""
    groups: dict[str, dict[str, float]] = {}
    for run in _ok(results, "durable_commit_to_handler"):
        extra = run["extra"]
        where = f"{extra['durability']} {run['backend']}"
        for p in ("p50", "p99"):
            groups[f"{p} {where}"] = {
                "ours": extra[f"{p}_ours"],
                "raw sqlite3": extra[f"{p}_limit"],
            }
    if not groups:
        return None
    figure, axes = plt.subplots(figsize=(9, 4.5))
    _bars(axes, groups, "ms")
    axes.set_title("commit to durable handler latency (lower is better)")
    return _save(figure, directory, "commit_to_handler_latency.png")


def durable_writers(results: Sequence[dict[str, Any]], directory: Path) -> Path | None:
    """Durable events/s at 1 and 100 concurrent writers, ours and raw (and eventsourcing at 1)."""
    runs = _ok(results, "durable_transact")
    peers = _ok(results, "peers_durable_1")
    if not runs and not peers:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for run in runs:
        single, group = run["extra"]["rows"][-2:]  # the batch-1 and batch-100 rows
        where = f"{run['extra']['durability']}, {run['backend']}"
        writers = [1, run["extra"]["writers"]]
        axes.plot(writers, [single["ours"], group["ours"]], "o-", label=f"ours ({where})")
        axes.plot(writers, [single["limit"], group["limit"]], "s--", label=f"raw sqlite3 ({where})")
    for run in peers:
        axes.plot([1], [run["limit"]], "^", label=f"eventsourcing (full, {run['backend']})")
        axes.plot([1], [run["ours"]], "v", label=f"ours, event only (full, {run['backend']})")
    axes.set_xscale("log")
    axes.set_xlabel("concurrent writers")
    axes.set_ylabel("events/s")
    axes.set_ylim(bottom=0)
    axes.set_title("Durable throughput vs concurrent writers")
    axes.legend(fontsize=7)
    return _save(figure, directory, "durable_writers.png")


def plot(document: dict[str, Any], directory: Path) -> list[Path]:
    """Every chart the document has data for, as PNGs in ``directory``; their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = document.get("results", [])
    written = []
    for chart in (fanout_scale, actors_scale, ask_latency, commit_to_handler, durable_writers):
        path = chart(results, directory)
        if path is not None:
            written.append(path)
    return written
