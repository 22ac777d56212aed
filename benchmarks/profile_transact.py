"""Where one ``engine.transact`` spends its time: a per-stage timer, engine code untouched.

``python -m benchmarks.profile_transact [--backend asyncio|trio] [--n N] [--cprofile]``

One writer awaits ``engine.transact(fn)`` N times in a row on ``Engine(path,
durability="full")`` in a temporary directory (``TMPDIR`` picks the disk); ``fn``
is the durable scenario's (one domain row and one event), so every call is a
batch of one. Clock readings (``time.perf_counter_ns``) at the stage boundaries
come from wrappers this script puts on the engine's objects for the timed pass
only: the Store's ``submit``, ``_write_batch`` and ``_finish`` (instance
attributes shadowing the methods), its writer connection (a proxy timing
``execute``: BEGIN, the outbox INSERT, COMMIT), ``anyio.to_thread.run_sync``
(the writer task's hand-off to its thread) and ``fn`` itself. The wrappers cost
a little per call: the same loop without them is timed first and printed
beside. ``--cprofile`` adds cProfile's top 25 by cumulative time of the event
loop's thread and of the writer thread, each from a pass of its own.

Nothing here is a scenario of the harness: it prints a table and exits.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import gc
import io
import os
import platform
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import anyio
import anyio.to_thread

from engine import Engine, Transaction
from engine._store import Request, Store

from ._common import Written, fsync_latency, median, percentile, thread_round_trip
from .scenario_durable import _INSERT_DOMAIN, _open, _store, _write

WARM_UP = 20
"""Untimed calls before each pass: first-call caches and the worker thread's start."""
DEFAULT_N = 2_000

ns = time.perf_counter_ns


class _Marks:
    """``perf_counter_ns`` at each stage boundary of one call (0: not reached)."""

    __slots__ = (
        "begin_end",
        "begin_start",
        "call",
        "commit_end",
        "commit_start",
        "domain_end",
        "domain_start",
        "finished",
        "handoff",
        "outbox_end",
        "outbox_start",
        "publish_end",
        "queued",
        "resumed",
        "returned",
        "thread_end",
        "thread_start",
    )

    begin_end: int
    begin_start: int
    call: int
    commit_end: int
    commit_start: int
    domain_end: int
    domain_start: int
    finished: int
    handoff: int
    outbox_end: int
    outbox_start: int
    publish_end: int
    queued: int
    resumed: int
    returned: int
    thread_end: int
    thread_start: int

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def complete(self) -> bool:
        return all(getattr(self, name) for name in self.__slots__)


Stage = tuple[str, str, Callable[[_Marks], int]]

STAGES: tuple[Stage, ...] = (
    (
        "transact -> queued",
        "on the loop: engine.transact's checks, the Request, Store.submit (with the "
        "writer idle, the caller's own way to its hand-off)",
        lambda m: m.queued - m.call,
    ),
    (
        "queued -> hand-off",
        "the writer task wakes on the loop and calls anyio.to_thread.run_sync (0 when "
        "the caller hands off itself)",
        lambda m: m.handoff - m.queued,
    ),
    (
        "hand-off -> thread starts",
        "anyio hands the batch to its worker thread (the hop there)",
        lambda m: m.thread_start - m.handoff,
    ),
    (
        "BEGIN IMMEDIATE",
        "sqlite3 execute in the writer thread",
        lambda m: m.begin_end - m.begin_start,
    ),
    (
        "fn: domain INSERT",
        "the user's statement through tx.conn (guarded connection)",
        lambda m: m.domain_end - m.domain_start,
    ),
    (
        "fn: publish (validate, encode)",
        "tx.publish minus its INSERT: validate, tag, encode, the tx's list",
        lambda m: (m.outbox_start - m.domain_end) + (m.publish_end - m.outbox_end),
    ),
    (
        "fn: outbox INSERT",
        "sqlite3 execute of the outbox row",
        lambda m: m.outbox_end - m.outbox_start,
    ),
    (
        "COMMIT (fsync)",
        "sqlite3 execute of COMMIT: the WAL write and its fsync",
        lambda m: m.commit_end - m.commit_start,
    ),
    (
        "other writer-thread work",
        "_write_batch/_attempt around the statements: Transaction, guard, bookkeeping",
        lambda m: (
            (m.begin_start - m.thread_start)
            + (m.domain_start - m.begin_end)
            + (m.commit_start - m.publish_end)
            + (m.thread_end - m.commit_end)
        ),
    ),
    (
        "thread done -> writer task resumes",
        "the hop back: anyio reports the result to the loop, the writer task (or the caller) runs",
        lambda m: m.resumed - m.thread_end,
    ),
    (
        "finish (on_commit, waiter.set)",
        "Store._finish on the loop: relay wake-up, the caller's event set",
        lambda m: m.finished - m.resumed,
    ),
    (
        "waiter set -> transact returns",
        "the caller's wake-up on the loop (the relay may run first)",
        lambda m: m.returned - m.finished,
    ),
)
TOTAL: Stage = ("total", "engine.transact called -> returned", lambda m: m.returned - m.call)
SPANS: tuple[Stage, ...] = (
    (
        "span: transact -> thread starts batch",
        "the first three stages: from the call to the writer thread's start",
        lambda m: m.thread_start - m.call,
    ),
    (
        "span: in the writer thread",
        "_write_batch from entry to return",
        lambda m: m.thread_end - m.thread_start,
    ),
    (
        "span: COMMIT returns -> transact returns",
        "the end of _attempt, the hop back, finish, the caller's wake-up",
        lambda m: m.returned - m.commit_end,
    ),
)


class _State:
    """The call being timed: its marks and its transact function."""

    def __init__(self) -> None:
        self.marks = _Marks()
        self.fn: object = None


def _ours(state: _State, requests: Sequence[Request]) -> bool:
    """Whether ``requests`` is the batch of one holding the timed call."""
    return len(requests) == 1 and requests[0].fn is state.fn


def _timed_write(marks: _Marks, event: Written, tx: Transaction) -> None:
    """``scenario_durable._write`` with clock readings around its two parts."""
    parameters = (event.n, 100 + event.n % 7, time.time())
    marks.domain_start = ns()
    tx.conn.execute(_INSERT_DOMAIN, parameters)
    marks.domain_end = ns()
    tx.publish(event)
    marks.publish_end = ns()


class _TimedConnection:
    """The writer connection with ``execute`` timed for BEGIN, the outbox INSERT and COMMIT.

    Everything else goes to the real connection (its authorizer stays on it).
    """

    def __init__(self, raw: sqlite3.Connection, state: _State) -> None:
        self._raw = raw
        self._state = state

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        start = ns()
        cursor = self._raw.execute(sql, parameters)
        end = ns()
        marks = self._state.marks
        if sql.startswith("BEGIN"):
            marks.begin_start, marks.begin_end = start, end
        elif sql.startswith("COMMIT"):
            marks.commit_start, marks.commit_end = start, end
        elif sql.startswith("INSERT INTO outbox"):
            marks.outbox_start, marks.outbox_end = start, end
        return cursor

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


def _shadow(target: object, name: str, value: object) -> None:
    """An instance attribute over ``target``'s ``name`` (the class is not touched)."""
    setattr(target, name, value)


class _Instruments:
    """The wrappers of one timed pass, put on a running engine's store and taken off again."""

    def __init__(self, store: Store, state: _State) -> None:
        self.store = store
        self.state = state
        self.run_sync = anyio.to_thread.run_sync

    def install(self) -> None:
        store, state, run_sync = self.store, self.state, self.run_sync
        submit, write_batch, finish = store.submit, store._write_batch, store._finish
        writer = store._writer
        assert writer is not None

        def timed_submit(request: Request, *, bounded: bool = True) -> bool:
            taken = submit(request, bounded=bounded)
            if request.fn is state.fn:
                state.marks.queued = ns()
            return taken

        def timed_write_batch(requests: list[Request]) -> BaseException | None:
            ours = _ours(state, requests)
            if ours:
                state.marks.thread_start = ns()
            try:
                return write_batch(requests)
            finally:
                if ours:
                    state.marks.thread_end = ns()

        def timed_finish(requests: list[Request]) -> None:
            finish(requests)
            if _ours(state, requests):
                state.marks.finished = ns()

        async def timed_run_sync(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
            ours = func is timed_write_batch and _ours(state, args[0])
            if ours:
                marks = state.marks
                marks.handoff = ns()
                if not marks.queued:  # the caller hands off itself: never queued
                    marks.queued = marks.handoff
            result = await run_sync(func, *args, **kwargs)
            if ours:
                state.marks.resumed = ns()
            return result

        _shadow(store, "submit", timed_submit)
        _shadow(store, "_write_batch", timed_write_batch)
        _shadow(store, "_finish", timed_finish)
        _shadow(store, "_writer", _TimedConnection(writer, state))
        _shadow(anyio.to_thread, "run_sync", timed_run_sync)

    def remove(self) -> None:
        _shadow(anyio.to_thread, "run_sync", self.run_sync)
        proxy = self.store._writer
        assert isinstance(proxy, _TimedConnection)
        _shadow(self.store, "_writer", proxy._raw)
        for name in ("submit", "_write_batch", "_finish"):
            delattr(self.store, name)


# ------------------------------------------------------------------- passes


async def _plain_pass(engine: Engine, n: int) -> list[float]:
    """µs of each of ``n`` sequential transacts, nothing wrapped (the scenario's own fn)."""
    transact = engine.transact
    events = [Written(n=i) for i in range(n)]
    timings: list[float] = []
    gc.collect()
    for event in events:
        start = ns()
        await transact(functools.partial(_write, event))
        timings.append((ns() - start) / 1e3)
    return timings


async def _timed_pass(engine: Engine, n: int) -> tuple[list[_Marks], int]:
    """The marks of each of ``n`` sequential transacts, and how many were incomplete."""
    state = _State()
    instruments = _Instruments(_store(engine), state)
    transact = engine.transact
    events = [Written(n=i) for i in range(n)]
    records: list[_Marks] = []
    incomplete = 0
    instruments.install()
    try:
        gc.collect()
        for event in events:
            marks = state.marks = _Marks()
            fn = state.fn = functools.partial(_timed_write, marks, event)
            marks.call = ns()
            await transact(fn)
            marks.returned = ns()
            if marks.complete():
                records.append(marks)
            else:
                incomplete += 1
    finally:
        instruments.remove()
    return records, incomplete


async def _cprofile_loop(engine: Engine, n: int) -> str:
    """cProfile of the event loop's thread over ``n`` transacts: top 25 by cumulative time."""
    transact = engine.transact
    events = [Written(n=i) for i in range(n)]
    profile = cProfile.Profile()
    profile.enable()
    for event in events:
        await transact(functools.partial(_write, event))
    profile.disable()
    return _top(profile)


async def _cprofile_writer(engine: Engine, n: int) -> str:
    """cProfile of the writer thread's batches over ``n`` transacts: top 25 by cumulative time."""
    store = _store(engine)
    write_batch = store._write_batch
    profile = cProfile.Profile()

    def profiled(requests: list[Request]) -> BaseException | None:
        # Enabled in the worker thread itself: a profiler sees the thread it is enabled in.
        profile.enable()
        try:
            return write_batch(requests)
        finally:
            profile.disable()

    _shadow(store, "_write_batch", profiled)
    try:
        transact = engine.transact
        for event in [Written(n=i) for i in range(n)]:
            await transact(functools.partial(_write, event))
    finally:
        delattr(store, "_write_batch")
    return _top(profile)


def _top(profile: cProfile.Profile) -> str:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).strip_dirs().sort_stats("cumulative").print_stats(25)
    return out.getvalue().strip()


# ------------------------------------------------------------------- report


def _render(header: Sequence[str], rows: Sequence[Sequence[str]], right: int) -> str:
    """A plain table; columns from ``right`` on are right-aligned (figures)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            cell.rjust(width) if i >= right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def stage_table(records: Sequence[_Marks]) -> str:
    """Stage, median and p90 µs, mean µs, and share of the summed time of all calls."""
    total_sum = sum(TOTAL[2](m) for m in records)
    rows = []
    for name, _, stage in (*STAGES, TOTAL, *SPANS):
        values = [stage(m) / 1e3 for m in records]
        share = sum(values) * 1e3 / total_sum if total_sum else 0.0
        rows.append(
            (
                name,
                f"{median(values):.1f}",
                f"{percentile(values, 90):.1f}",
                f"{sum(values) / len(values):.1f}",
                f"{share:.1%}",
            )
        )
    return _render(("stage", "median µs", "p90 µs", "mean µs", "share"), rows, right=1)


async def profile(n: int, *, with_cprofile: bool) -> str:
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="actorbus-profile-") as directory:
        disk = fsync_latency(directory, n)
        hop = await thread_round_trip(n)
        async with Engine(os.path.join(directory, "profile.db"), durability="full") as engine:
            await _open(engine)
            await _plain_pass(engine, WARM_UP)
            plain = await _plain_pass(engine, n)
            await _timed_pass(engine, WARM_UP)
            records, incomplete = await _timed_pass(engine, n)
            loop_profile = writer_profile = ""
            if with_cprofile:
                loop_profile = await _cprofile_loop(engine, n)
                writer_profile = await _cprofile_writer(engine, n)
    if not records:
        raise RuntimeError(f"no call of {n} had every stage timed ({incomplete} incomplete)")
    lines.append(stage_table(records))
    lines.append("")
    stages = (*STAGES, TOTAL, *SPANS)
    width = max(len(name) for name, _, _ in stages)
    lines.extend(f"{name:<{width}}  {what}" for name, what, _ in stages)
    lines.append("")
    lines.append(
        f"calls timed: {len(records)} of {n}"
        + (f" ({incomplete} without every stage left out)" if incomplete else "")
    )
    lines.append(
        f"transact without the wrappers: median {median(plain):.1f} µs, "
        f"p90 {percentile(plain, 90):.1f} µs ({len(plain)} calls, "
        f"{len(plain) / (sum(plain) / 1e6):,.0f} events/s)"
    )
    lines.append(
        f"thread round trip (anyio.to_thread.run_sync no-op): median "
        f"{hop['thread_roundtrip_us']:.1f} µs, p90 {hop['thread_roundtrip_p90_us']:.1f} µs "
        f"({hop['thread_roundtrip_samples']} calls)"
    )
    lines.append(
        f"fsync (os.write 64 B + os.fsync): median {disk['fsync_ms'] * 1e3:.1f} µs, "
        f"p99 {disk['fsync_p99_ms'] * 1e3:.1f} µs ({disk['fsync_samples']} calls, "
        f"{disk['temp_dir']})"
    )
    if with_cprofile:
        lines += ["", "cProfile, event loop thread (top 25 by cumulative time):", loop_profile]
        lines += ["", "cProfile, writer thread (top 25 by cumulative time):", writer_profile]
    return "\n".join(lines)


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_transact",
        description="Time the stages of one engine.transact (durability full, one writer).",
    )
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help="sequential transacts timed")
    parser.add_argument(
        "--cprofile", action="store_true", help="add cProfile's top 25 of each thread"
    )
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error(f"--n must be >= 1, got {args.n}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    run: Callable[[], Awaitable[str]] = functools.partial(
        profile, args.n, with_cprofile=args.cprofile
    )
    report = anyio.run(run, backend=args.backend)
    print(
        f"engine.transact, durability full, 1 writer, N={args.n:,}, backend {args.backend}; "
        f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"
    )
    print(
        f"machine: {os.cpu_count()} CPUs, {platform.platform()}, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    print()
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
