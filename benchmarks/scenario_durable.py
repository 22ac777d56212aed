"""Durable writes against their raw limit: sqlite3 on its own, with the engine's pragmas.

Ours writes through ``await engine.transact(fn)``: ``fn`` inserts one row into a
domain table and ``tx.publish``-es one small event, in the engine's writer
thread; concurrent calls share one SQLite transaction (group commit, a
SAVEPOINT each), and each call returns once the COMMIT holding its work is
durable. Raw is what the same work costs sqlite3 alone: one connection with
the same pragmas (WAL, ``synchronous`` FULL or NORMAL) and the same table
shapes, in one plain thread loop of ``BEGIN IMMEDIATE``, B x (domain insert +
outbox insert of the encoded event), ``COMMIT``, at the batch size B our group
commit reached. Raw does not validate the event; ours does on every publish.

An engine inside an async app must not block its event loop on SQLite, so a
single writer's fair limit is the same SQL as one transaction per worker-thread
round trip: ``await anyio.to_thread.run_sync`` of BEGIN IMMEDIATE, the two
inserts and COMMIT, once per event, on one connection behind a limiter of one.
The cost of a bare round trip (a no-op through ``anyio.to_thread.run_sync``) is
measured beside it, as the fsync is.

Every adapter writes to a fresh SQLite file in a temporary directory (set
``TMPDIR`` to measure another disk); the fsync latency of that directory's
disk is measured first and reported with the figures, because the durable
figures and ratios depend on it.

The throughput scenarios have no subscription: the relay still hands every
committed event to the dispatcher, which is part of what ours costs. The
latency scenario adds one durable subscription with an async handler.
"""

from __future__ import annotations

import functools
import os
import sqlite3
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import msgspec
from anyio.abc import TaskStatus

from engine import Engine, Transaction
from engine._store import Store

from ._common import (
    WRITTEN_TAG,
    Measurement,
    Probe,
    Scenario,
    Written,
    alternate,
    by_name,
    compare,
    fsync_latency,
    median,
    now,
    percentile,
    row,
    settle_durable,
    take_turns,
    thread_round_trip,
    throughput,
    with_target,
)

ORDER = 30
"""The harness runs scenario modules by ascending ORDER."""

Durability = Literal["full", "normal"]

WRITERS = 100
"""Concurrent writer tasks of transact_100."""
TRANSACT_1_SHARE = 10
"""transact_1 writes N / 10 events per repetition: one writer is well over ten times slower."""
SCALING_TARGET: dict[Durability, float] = {"full": 8.0, "normal": 4.0}
"""transact_100 / transact_1, events/s: group commit must pay off (a fsync per batch)."""
VERSUS_RAW_TARGET = 0.6
"""transact_100 / raw sqlite3 at the same batch size."""
VERSUS_THREAD_TARGET: dict[Durability, float | None] = {"full": 0.95, "normal": None}
"""transact_1 / the same raw SQL through one thread round trip per transaction.

Issue 14 sets it for ``full``; with ``normal`` the row is reported without one.
"""
RATE = 1000.0
"""Events per second published by the latency scenario's writer."""
P99_TARGET_MS = 10.0
LATENCY_TIMEOUT = 60.0
"""Seconds a latency repetition may wait for its last delivery before it fails."""

_DOMAIN = (
    "CREATE TABLE IF NOT EXISTS orders (id INTEGER PRIMARY KEY AUTOINCREMENT, "
    "n INTEGER NOT NULL, amount INTEGER NOT NULL, created_at REAL NOT NULL)"
)
_INSERT_DOMAIN = "INSERT INTO orders (n, amount, created_at) VALUES (?, ?, ?)"
# The engine's outbox, column for column, with its index (see engine/_store.py).
_OUTBOX = (
    "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
    "id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, tenant_id TEXT, payload BLOB NOT NULL, "
    "created_at REAL NOT NULL)"
)
_OUTBOX_INDEX = "CREATE INDEX IF NOT EXISTS outbox_created_at ON outbox (created_at)"
_INSERT_OUTBOX = (
    "INSERT INTO outbox (id, type, tenant_id, payload, created_at) VALUES (?, ?, ?, ?, ?)"
)


def _events(count: int) -> list[Written]:
    """``count`` fresh events (every id is new: the outbox's ``id`` is UNIQUE)."""
    return [Written(n=i) for i in range(count)]


# --------------------------------------------------------------------- ours


def _write(event: Written, tx: Transaction) -> None:
    """The user's transact function: one domain row and one event, on ``tx.conn``."""
    tx.conn.execute(_INSERT_DOMAIN, (event.n, 100 + event.n % 7, time.time()))
    tx.publish(event)


def _store(engine: Engine) -> Store:
    outbox = engine._outbox  # the batch counts are the store's own
    assert outbox is not None
    return outbox.store


async def _open(engine: Engine) -> None:
    await engine.transact(lambda tx: tx.conn.execute(_DOMAIN))


# ---------------------------------------------------------------------- raw


class _Raw:
    """One sqlite3 connection with the engine's pragmas and table shapes, used from threads."""

    def __init__(self, path: str, durability: Durability) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if durability == 'full' else 'NORMAL'}")
        for statement in (_DOMAIN, _OUTBOX, _OUTBOX_INDEX):
            conn.execute(statement)
        self.conn = conn
        self.encode = msgspec.json.Encoder().encode

    def close(self) -> None:
        self.conn.close()

    def _insert(self, event: Written) -> None:
        execute = self.conn.execute
        execute(_INSERT_DOMAIN, (event.n, 100 + event.n % 7, time.time()))
        tenant = event.tenant_id
        execute(
            _INSERT_OUTBOX,
            (
                str(event.id),
                WRITTEN_TAG,
                None if tenant is None else str(tenant),
                self.encode(event),
                time.time(),
            ),
        )

    def batches(self, events: Sequence[Written], batch: int) -> None:
        """The plain thread loop: BEGIN IMMEDIATE, ``batch`` x (two inserts), COMMIT."""
        execute = self.conn.execute
        insert = self._insert
        for start in range(0, len(events), batch):
            execute("BEGIN IMMEDIATE")
            for event in events[start : start + batch]:
                insert(event)
            execute("COMMIT")

    def commit_one(self, event: Written) -> None:
        """One transaction of one event: BEGIN IMMEDIATE, the two inserts, COMMIT."""
        execute = self.conn.execute
        execute("BEGIN IMMEDIATE")
        self._insert(event)
        execute("COMMIT")


# ---------------------------------------------------------- (1, 2, 3) transact


@dataclass
class _Batching:
    """The average batch of ours' last transact_100 run: raw's next run uses it."""

    size: float = float(WRITERS)
    """Before ours has run once (raw's untimed round): the number of writers."""


async def _compare_1(
    directory: str, durability: Durability, n: int, repeats: int
) -> dict[str, list[float]]:
    """transact_1 against raw batches of 1 and raw through a thread round trip each: seconds.

    Keys ``raw`` (the plain thread loop, one call for all), ``raw_thread`` (one
    ``anyio.to_thread.run_sync`` per transaction, from the event loop) and ``ours``.
    """
    raw_db = _Raw(os.path.join(directory, "raw-1.db"), durability)
    thread_db = _Raw(os.path.join(directory, "raw-thread-1.db"), durability)
    # One connection: one thread at a time uses it, as the engine's writer does.
    thread_limiter = anyio.CapacityLimiter(1)

    async def raw() -> float:
        events = _events(n)
        start = now()
        await anyio.to_thread.run_sync(raw_db.batches, events, 1)
        return now() - start

    async def raw_thread() -> float:
        events = _events(n)
        commit, run_sync, limiter = thread_db.commit_one, anyio.to_thread.run_sync, thread_limiter
        start = now()
        for event in events:
            await run_sync(commit, event, limiter=limiter)
        return now() - start

    try:
        async with Engine(os.path.join(directory, "ours-1.db"), durability=durability) as engine:
            await _open(engine)
            transact = engine.transact

            async def ours() -> float:
                events = _events(n)
                start = now()
                for event in events:
                    await transact(functools.partial(_write, event))
                return now() - start

            # Taking turns, the order reversed every other repetition, as alternate does.
            return await take_turns(
                {"raw": raw, "raw_thread": raw_thread, "ours": ours},
                repeats,
                settle=settle_durable,
            )
    finally:
        raw_db.close()
        thread_db.close()


async def _compare_100(
    directory: str, durability: Durability, n: int, repeats: int
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """transact_100 against raw at ours' batch size: (seconds, batch size) of each run."""
    per_writer = n // WRITERS
    batching = _Batching()
    raw_db = _Raw(os.path.join(directory, "raw-100.db"), durability)

    async def raw() -> tuple[float, float]:
        events = _events(per_writer * WRITERS)
        batch = max(1, round(batching.size))
        start = now()
        await anyio.to_thread.run_sync(raw_db.batches, events, batch)
        return now() - start, float(batch)

    try:
        async with Engine(os.path.join(directory, "ours-100.db"), durability=durability) as engine:
            await _open(engine)
            store = _store(engine)
            transact = engine.transact

            async def writer(events: Sequence[Written]) -> None:
                for event in events:
                    await transact(functools.partial(_write, event))

            async def ours() -> tuple[float, float]:
                events = _events(per_writer * WRITERS)
                requests, batches = store.requests, store.batches
                start = now()
                async with anyio.create_task_group() as tg:
                    for i in range(WRITERS):
                        tg.start_soon(writer, events[i * per_writer : (i + 1) * per_writer])
                elapsed = now() - start
                batching.size = (store.requests - requests) / (store.batches - batches)
                return elapsed, batching.size

            return await alternate(raw, ours, repeats, settle=settle_durable)
    finally:
        raw_db.close()


async def durable_transact(durability: Durability, n: int, repeats: int) -> Measurement:
    """transact_1 (beside raw sqlite3 with and without a thread round trip per transaction),
    transact_100 (beside raw at its batch size); headline: 100 writers / 1 writer."""
    writes_1 = max(1, n // TRANSACT_1_SHARE)
    writes_100 = n // WRITERS * WRITERS
    if writes_100 < WRITERS:
        raise ValueError(f"N must be at least {WRITERS} (one event per writer), got {n}")
    with tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory:
        disk = fsync_latency(directory, n)
        hop = await thread_round_trip(n)
        seconds_1 = await _compare_1(directory, durability, writes_1, repeats)
        raw_100, ours_100 = await _compare_100(directory, durability, writes_100, repeats)
    ours_1 = seconds_1["ours"]
    single = throughput(writes_1, seconds_1["raw"], ours_1)
    single_thread = throughput(writes_1, seconds_1["raw_thread"], ours_1)
    group = throughput(writes_100, [s for s, _ in raw_100], [s for s, _ in ours_100])
    batch_sizes = [size for _, size in ours_100]
    batch = median(batch_sizes)
    ours_1_rates = [writes_1 / seconds for seconds in ours_1]
    ours_100_rates = [writes_100 / seconds for seconds, _ in ours_100]
    unit = "events/s"
    return compare(
        ours_100_rates,
        ours_1_rates,
        {
            "label": f"transact_100 / transact_1 ({durability})",
            "durability": durability,
            "rows": [
                with_target(
                    row(
                        f"transact_1 vs raw SQL + 1 thread round trip ({durability})",
                        single_thread,
                        unit,
                    ),
                    VERSUS_THREAD_TARGET[durability],
                    higher_is_better=True,
                ),
                with_target(
                    row(f"transact_1 vs raw batch 1 ({durability})", single, unit),
                    None,
                    higher_is_better=True,
                ),
                with_target(
                    row(f"transact_100 vs raw batch {round(batch)} ({durability})", group, unit),
                    VERSUS_RAW_TARGET,
                    higher_is_better=True,
                ),
            ],
            "events_1": writes_1,
            "events_100": writes_100,
            "writers": WRITERS,
            "batch_size": batch,
            "batch_sizes": batch_sizes,
            "raw_batch_sizes": [size for _, size in raw_100],
            "transact_1_rates": ours_1_rates,
            "raw_1_rates": single.extra["limit_rates"],
            "raw_thread_1_rates": single_thread.extra["limit_rates"],
            "transact_100_rates": ours_100_rates,
            "raw_100_rates": group.extra["limit_rates"],
            **disk,
            **hop,
        },
    )


# ------------------------------------------------------ (4) commit_to_handler


@dataclass
class _Clock:
    """One latency repetition: when each event was sent, and what was measured."""

    sent: list[float] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    """Seconds from just before the write to the handler's entry."""
    acknowledged: list[float] = field(default_factory=list)
    """Seconds from just before the write until the writer got its commit back."""

    def arm(self, count: int) -> None:
        self.sent = [0.0] * count
        self.latencies = []
        self.acknowledged = []


@dataclass(frozen=True)
class _Run:
    latencies: list[float]
    acknowledged: list[float]
    rate: float
    """Events per second the writer actually started."""


async def _paced(count: int, send: Callable[[int], Coroutine[Any, Any, None]]) -> float:
    """Start ``send(i)`` at ``start + i / RATE``; returns the rate achieved.

    Each write is its own task, started on schedule: a slow commit delays its
    own event, not the next ones (the schedule does not drift, and a stall
    shows up in the latencies instead of being hidden by a slower rate).
    """
    interval = 1.0 / RATE
    async with anyio.create_task_group() as tg:
        start = now()
        last = start
        for i in range(count):
            delay = start + i * interval - now()
            if delay > 0:
                await anyio.sleep(delay)
            last = now()
            tg.start_soon(send, i)
    return (count - 1) / (last - start) if count > 1 and last > start else RATE


def _handler(clock: _Clock, probe: Probe) -> Callable[[Written], Awaitable[None]]:
    """The user's handler, the same function on both sides: it notes when it was entered."""

    async def handle(event: Written) -> None:
        clock.latencies.append(now() - clock.sent[event.n])
        probe.count += 1
        if probe.count == probe.target:
            probe.done.set()

    return handle


async def _latency_runs(
    directory: str, durability: Durability, n: int, repeats: int
) -> tuple[list[_Run], list[_Run]]:
    clock = _Clock()
    probe = Probe()
    handle = _handler(clock, probe)
    raw_db = _Raw(os.path.join(directory, "raw-latency.db"), durability)
    # The raw writer's one connection: writes queue for it, one thread at a time.
    raw_limiter = anyio.CapacityLimiter(1)

    async def raw() -> _Run:
        events = _events(n)
        clock.arm(n)
        probe.arm(n)
        send_stream, receive_stream = anyio.create_memory_object_stream[Written](n)

        async def consume(*, task_status: TaskStatus[None]) -> None:
            task_status.started()
            with receive_stream:
                async for event in receive_stream:
                    await handle(event)

        async def send(i: int) -> None:
            event = events[i]
            clock.sent[i] = now()
            await anyio.to_thread.run_sync(raw_db.commit_one, event, limiter=raw_limiter)
            clock.acknowledged.append(now() - clock.sent[i])
            send_stream.send_nowait(event)

        with send_stream:
            async with anyio.create_task_group() as tg:
                await tg.start(consume)
                await settle_durable()
                rate = await _paced(n, send)
                with anyio.fail_after(LATENCY_TIMEOUT):
                    await probe.done.wait()
                send_stream.close()
        return _Run(clock.latencies, clock.acknowledged, rate)

    try:
        async with Engine(
            os.path.join(directory, "ours-latency.db"), durability=durability
        ) as engine:
            await _open(engine)
            engine.subscribe(Written, handler=handle, name="latency")
            transact = engine.transact

            async def ours() -> _Run:
                events = _events(n)
                clock.arm(n)
                probe.arm(n)

                async def send(i: int) -> None:
                    write = functools.partial(_write, events[i])
                    clock.sent[i] = now()
                    await transact(write)
                    clock.acknowledged.append(now() - clock.sent[i])

                rate = await _paced(n, send)
                with anyio.fail_after(LATENCY_TIMEOUT):
                    await probe.done.wait()
                return _Run(clock.latencies, clock.acknowledged, rate)

            return await alternate(raw, ours, repeats, settle=settle_durable)
    finally:
        raw_db.close()


def _ms(runs: Sequence[_Run], p: float, *, acknowledged: bool = False) -> float:
    return percentile(
        [s * 1e3 for run in runs for s in (run.acknowledged if acknowledged else run.latencies)],
        p,
    )


async def commit_to_handler(durability: Durability, n: int, repeats: int) -> Measurement:
    """A durable subscription's handler, events written at RATE/s: latency in ms."""
    with tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory:
        disk = fsync_latency(directory, n)
        raw_runs, ours_runs = await _latency_runs(directory, durability, n, repeats)
    pairs = list(zip(ours_runs, raw_runs, strict=True))
    p50_pairs = [_ms([o], 50) / _ms([r], 50) for o, r in pairs]
    unit = "ms"
    return Measurement(
        ours=_ms(ours_runs, 99),
        limit=_ms(raw_runs, 99),
        pair_ratios=[_ms([o], 99) / _ms([r], 99) for o, r in pairs],
        extra={
            "label": f"commit_to_handler p99 ({durability})",
            "durability": durability,
            "rows": [
                {
                    "label": f"commit_to_handler p50 ({durability})",
                    "unit": unit,
                    "ours": _ms(ours_runs, 50),
                    "limit": _ms(raw_runs, 50),
                    "pair_ratio_min": min(p50_pairs),
                    "pair_ratio_max": max(p50_pairs),
                }
            ],
            "p50_ours": _ms(ours_runs, 50),
            "p50_limit": _ms(raw_runs, 50),
            "p99_ours": _ms(ours_runs, 99),
            "p99_limit": _ms(raw_runs, 99),
            "max_ours": _ms(ours_runs, 100),
            "max_limit": _ms(raw_runs, 100),
            # Until the writer got its commit back: the rest is the way to the handler.
            "commit_p50_ours": _ms(ours_runs, 50, acknowledged=True),
            "commit_p99_ours": _ms(ours_runs, 99, acknowledged=True),
            "commit_p50_limit": _ms(raw_runs, 50, acknowledged=True),
            "commit_p99_limit": _ms(raw_runs, 99, acknowledged=True),
            "rate": RATE,
            "rates_ours": [run.rate for run in ours_runs],
            "rates_limit": [run.rate for run in raw_runs],
            "samples": sum(len(run.latencies) for run in ours_runs),
            **disk,
        },
    )


# ---------------------------------------------------------------- scenarios


def _transact(durability: Durability) -> Callable[[int, int], Awaitable[Measurement]]:
    async def run(n: int, repeats: int) -> Measurement:
        return await durable_transact(durability, n, repeats)

    return run


def _latency(durability: Durability) -> Callable[[int, int], Awaitable[Measurement]]:
    async def run(n: int, repeats: int) -> Measurement:
        return await commit_to_handler(durability, n, repeats)

    return run


_DURABILITIES: tuple[Durability, ...] = ("full", "normal")

SCENARIOS = by_name(
    *(
        Scenario(
            name=f"durable_transact_{durability}",
            run=_transact(durability),
            unit="events/s",
            higher_is_better=True,
            target=SCALING_TARGET[durability],
            # Events per repetition of transact_100 (transact_1 writes a tenth).
            n={"full": 10_000, "quick": 3_000, "smoke": 200},
        )
        for durability in _DURABILITIES
    ),
    *(
        Scenario(
            name=f"durable_commit_to_handler_{durability}",
            run=_latency(durability),
            unit="ms",
            higher_is_better=False,
            target=P99_TARGET_MS,
            # Events per repetition, written at RATE per second.
            n={"full": 1_000, "quick": 500, "smoke": 20},
            absolute=True,
        )
        for durability in _DURABILITIES
    ),
)
