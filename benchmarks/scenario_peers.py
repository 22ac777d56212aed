"""Peers: the same tell, ask and durable-write workloads on other actor and event libraries.

Ours runs beside each peer in the same process and run, the adapters taking
turns repetition by repetition (the order reversed every other repetition),
so drift hits them alike. The peers:

- pykka 4 (``ThreadingActor``): ``ref.tell(msg)`` and ``ref.ask(msg)``, one
  thread per actor.
- thespian (``ActorSystem("simpleSystemBase")``): ``asys.tell`` and
  ``asys.ask``; that base runs every actor in the calling thread.
- a plain ``asyncio.Queue`` and one consumer task: the floor of a hand-written
  asyncio actor (asyncio only: on trio its rows are left out).
- eventsourcing 9 (``Application`` on ``eventsourcing.sqlite``): one aggregate
  event saved per command, against ours ``engine.transact`` with one event. Its
  save blocks, so an async app calls it through a worker thread, one
  ``anyio.to_thread.run_sync`` per command: that is the peer with the target.
  The same saves back to back in one thread call (no hop per save, as blocking
  the loop's own thread would cost) are reported beside it.

pykka and thespian are synchronous APIs: each of their repetitions runs whole
in a worker thread (``anyio.to_thread.run_sync``) and times itself there, so
the hop into the thread is not part of their figures.
"""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pykka
from anyio.abc import TaskStatus
from eventsourcing.application import Application
from eventsourcing.domain import Aggregate, event
from thespian.actors import (  # type: ignore[import-untyped]
    Actor as ThespianActor,
)
from thespian.actors import ActorSystem

from engine import Engine, Transaction

from ._common import (
    STREAM_CAPACITY,
    Echo,
    Measurement,
    Probe,
    Scenario,
    Sink,
    Written,
    by_name,
    compare,
    fsync_latency,
    median,
    now,
    on_asyncio,
    percentile,
    row,
    settle,
    settle_durable,
    take_turns,
    thread_round_trip,
    timed_asks,
    timed_hand_off,
    timed_tells,
)

ORDER = 60
"""The harness runs scenario modules by ascending ORDER."""

THREAD_TIMEOUT = 60.0
"""Seconds a threaded peer may wait for its last message before the repetition fails."""
ASK_TIMEOUT = 10.0
"""thespian's ask timeout, in seconds (a reply never takes near that long)."""
DURABLE_TARGET = 1.2
"""peers_durable_1: ours / eventsourcing with each save in a worker thread (issue 14)."""

_NAMES = {
    "pykka": "pykka ThreadingActor",
    "thespian": "thespian simpleSystemBase",
    "asyncio_queue": "asyncio.Queue + task",
    "eventsourcing": "eventsourcing sqlite Application, saves back to back in one thread call",
    "eventsourcing_thread": "eventsourcing sqlite Application, each save in a worker thread",
}


def _row(label: str, unit: str, ours: list[float], peer: list[float]) -> dict[str, Any]:
    return row(label, compare(ours, peer), unit)


# --------------------------------------------------------------- thread peers


class _ThreadProbe:
    """``Probe`` for a consumer in another thread: a ``threading.Event`` at the last message."""

    def __init__(self) -> None:
        self.arm(0)

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = threading.Event()


class _PykkaSink(pykka.ThreadingActor):
    def __init__(self, probe: _ThreadProbe) -> None:
        super().__init__()
        self._probe = probe

    def on_receive(self, message: Any) -> Any:
        probe = self._probe
        probe.count += 1
        if probe.count == probe.target:
            probe.done.set()
        return None


class _PykkaEcho(pykka.ThreadingActor):
    def on_receive(self, message: Any) -> Any:
        return message


class _ThespianSink(ThespianActor):  # type: ignore[misc]
    """Counts ints; answers ``"count"`` with the count so far and starts again from 0."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, int):
            self.count += 1
        elif message == "count":
            self.send(sender, self.count)
            self.count = 0


class _ThespianEcho(ThespianActor):  # type: ignore[misc]
    def receiveMessage(self, message: Any, sender: Any) -> None:
        if isinstance(message, int):
            self.send(sender, message)


class _Thespian:
    """One simpleSystemBase system, used from worker threads one call at a time."""

    def __init__(self) -> None:
        self.system: Any = None
        self.sink: Any = None
        self.echo: Any = None

    def start(self) -> None:
        self.system = ActorSystem("simpleSystemBase")
        self.sink = self.system.createActor(_ThespianSink)
        self.echo = self.system.createActor(_ThespianEcho)

    def stop(self) -> None:
        if self.system is not None:
            self.system.shutdown()
            self.system = None

    def tell_stream(self, n: int) -> float:
        """N tells, timed until the actor has handled them (its count, asked after the N-th)."""
        system, sink = self.system, self.sink
        tell = system.tell
        start = now()
        for i in range(n):
            tell(sink, i)
        count = system.ask(sink, "count", ASK_TIMEOUT)
        elapsed = now() - start
        if count != n:
            raise RuntimeError(f"thespian sink handled {count} of {n} messages")
        return elapsed

    def ask_roundtrip(self, n: int) -> list[float]:
        ask, echo = self.system.ask, self.echo
        latencies: list[float] = []
        record = latencies.append
        for i in range(n):
            start = now()
            reply = ask(echo, i, ASK_TIMEOUT)
            record(now() - start)
            if reply != i:
                raise RuntimeError(f"thespian echo answered {reply!r} to {i}")
        return latencies


def _pykka_tell_stream(ref: pykka.ActorRef[Any], probe: _ThreadProbe, n: int) -> float:
    probe.arm(n)
    tell = ref.tell
    start = now()
    for i in range(n):
        tell(i)
    if not probe.done.wait(THREAD_TIMEOUT):
        raise RuntimeError(f"pykka sink handled {probe.count} of {n} messages")
    return now() - start


def _pykka_ask_roundtrip(ref: pykka.ActorRef[Any], n: int) -> list[float]:
    ask = ref.ask
    latencies: list[float] = []
    record = latencies.append
    for i in range(n):
        start = now()
        ask(i)
        record(now() - start)
    return latencies


# ------------------------------------------------------------------ tell stream


async def peers_tell(n: int, repeats: int) -> Measurement:
    """scenario_actors' tell_stream: N awaited tells into one actor, on ours and each peer."""
    asyncio_loop = on_asyncio()
    thespian = _Thespian()
    thread_probe = _ThreadProbe()
    await anyio.to_thread.run_sync(thespian.start)
    pykka_ref = _PykkaSink.start(thread_probe)
    try:
        async with Engine() as engine:
            probe = Probe()
            ref = await engine.spawn(lambda: Sink(probe), name="sink", capacity=STREAM_CAPACITY)
            ours = functools.partial(timed_tells, ref, probe, n)

            async def pykka_peer() -> float:
                return await anyio.to_thread.run_sync(
                    _pykka_tell_stream, pykka_ref, thread_probe, n
                )

            async def thespian_peer() -> float:
                return await anyio.to_thread.run_sync(thespian.tell_stream, n)

            async def queue_peer() -> float:
                queue: asyncio.Queue[int] = asyncio.Queue(STREAM_CAPACITY)
                return await timed_hand_off(queue.put, queue.get, n)

            adapters: dict[str, Callable[[], Awaitable[float]]] = {
                "ours": ours,
                "pykka": pykka_peer,
                "thespian": thespian_peer,
            }
            if asyncio_loop:
                adapters["asyncio_queue"] = queue_peer
            seconds = await take_turns(adapters, repeats)
    finally:
        pykka_ref.stop()
        await anyio.to_thread.run_sync(thespian.stop)
    rates = {name: [n / s for s in runs] for name, runs in seconds.items()}
    unit = "msgs/s"
    rows = [_row("peers_tell vs thespian", unit, rates["ours"], rates["thespian"])]
    if asyncio_loop:
        queue = rates["asyncio_queue"]
        rows.append(_row("peers_tell vs asyncio.Queue", unit, rates["ours"], queue))
    return compare(
        rates["ours"],
        rates["pykka"],
        {
            "label": "peers_tell vs pykka",
            "rows": rows,
            "peers": {name: _NAMES[name] for name in rates if name != "ours"},
            "rates": {name: median(values) for name, values in rates.items()},
            "ratios": {
                name: median(rates["ours"]) / median(values)
                for name, values in rates.items()
                if name != "ours"
            },
        },
    )


# ------------------------------------------------------------------ ask round trip


async def peers_ask(n: int, repeats: int) -> Measurement:
    """scenario_actors' ask_roundtrip: N sequential asks to an echo actor, µs each."""
    asyncio_loop = on_asyncio()
    thespian = _Thespian()
    await anyio.to_thread.run_sync(thespian.start)
    pykka_ref = _PykkaEcho.start()
    try:
        async with Engine() as engine:
            echo = await engine.spawn(Echo, name="echo")
            ours = functools.partial(timed_asks, echo, n)

            async def pykka_peer() -> list[float]:
                return await anyio.to_thread.run_sync(_pykka_ask_roundtrip, pykka_ref, n)

            async def thespian_peer() -> list[float]:
                return await anyio.to_thread.run_sync(thespian.ask_roundtrip, n)

            async def queue_peer() -> list[float]:
                requests: asyncio.Queue[int] = asyncio.Queue(1)
                replies: asyncio.Queue[int] = asyncio.Queue(1)

                async def serve(*, task_status: TaskStatus[None]) -> None:
                    task_status.started()
                    while True:
                        await replies.put(await requests.get())

                latencies: list[float] = []
                record = latencies.append
                async with anyio.create_task_group() as tg:
                    await tg.start(serve)
                    await settle()
                    for i in range(n):
                        start = now()
                        await requests.put(i)
                        await replies.get()
                        record(now() - start)
                    tg.cancel_scope.cancel()
                return latencies

            adapters: dict[str, Callable[[], Awaitable[list[float]]]] = {
                "ours": ours,
                "pykka": pykka_peer,
                "thespian": thespian_peer,
            }
            if asyncio_loop:
                adapters["asyncio_queue"] = queue_peer
            runs = await take_turns(adapters, repeats)
    finally:
        pykka_ref.stop()
        await anyio.to_thread.run_sync(thespian.stop)

    def micros(name: str, p: float) -> list[float]:
        """The p-th percentile of each repetition, in µs."""
        return [percentile(run, p) * 1e6 for run in runs[name]]

    def overall(name: str, p: float) -> float:
        return percentile([s * 1e6 for run in runs[name] for s in run], p)

    unit = "µs"
    rows = []
    for name, label in (("thespian", "thespian"), ("asyncio_queue", "asyncio.Queue")):
        if name not in runs:
            continue
        figures = _row(f"peers_ask p50 vs {label}", unit, micros("ours", 50), micros(name, 50))
        figures["ours"], figures["limit"] = overall("ours", 50), overall(name, 50)
        rows.append(figures)
    return Measurement(
        ours=overall("ours", 50),
        limit=overall("pykka", 50),
        pair_ratios=[o / p for o, p in zip(micros("ours", 50), micros("pykka", 50), strict=True)],
        extra={
            "label": "peers_ask p50 vs pykka",
            "rows": rows,
            "ours_p99": overall("ours", 99),
            "limit_p99": overall("pykka", 99),
            "peers": {name: _NAMES[name] for name in runs if name != "ours"},
            "p50_us": {name: overall(name, 50) for name in runs},
            "p99_us": {name: overall(name, 99) for name in runs},
        },
    )


# --------------------------------------------------------------- durable writes


class _Counter(Aggregate):
    """eventsourcing's aggregate: each ``set`` triggers one event (its ``Set``)."""

    def __init__(self) -> None:
        self.n = 0

    @event("Set")
    def set(self, n: int) -> None:
        self.n = n


class _EventStore:
    """An eventsourcing Application on SQLite: one event saved per command, in a thread."""

    def __init__(self, path: str) -> None:
        self.app: Application[Any] = Application(
            env={"PERSISTENCE_MODULE": "eventsourcing.sqlite", "SQLITE_DBNAME": path}
        )
        self.counter = _Counter()
        self.app.save(self.counter)

    def writes(self, n: int) -> float:
        counter, save = self.counter, self.app.save
        start = now()
        for i in range(n):
            counter.set(i)
            save(counter)
        return now() - start

    def write(self, i: int) -> None:
        """One command and its save: what an async app hands to a worker thread."""
        counter = self.counter
        counter.set(i)
        self.app.save(counter)

    def close(self) -> None:
        self.app.close()


def _publish(written: Written, tx: Transaction) -> None:
    """Ours' command: one event in the outbox, nothing else (eventsourcing stores one event)."""
    tx.publish(written)


async def peers_durable_1(n: int, repeats: int) -> Measurement:
    """One writer, one event per commit (durability full): ours transact vs eventsourcing,
    each save in a worker thread (headline) and all saves in one thread call (a row)."""
    with tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory:
        disk = fsync_latency(directory, n)
        hop = await thread_round_trip(n)
        store = await anyio.to_thread.run_sync(_EventStore, os.path.join(directory, "es.db"))
        thread_store = await anyio.to_thread.run_sync(
            _EventStore, os.path.join(directory, "es-thread.db")
        )
        try:
            async with Engine(os.path.join(directory, "ours.db"), durability="full") as engine:
                transact = engine.transact

                async def ours() -> float:
                    events = [Written(n=i) for i in range(n)]
                    start = now()
                    for written in events:
                        await transact(functools.partial(_publish, written))
                    return now() - start

                async def peer() -> float:
                    return await anyio.to_thread.run_sync(store.writes, n)

                async def peer_thread() -> float:
                    write, run_sync = thread_store.write, anyio.to_thread.run_sync
                    start = now()
                    for i in range(n):
                        await run_sync(write, i)
                    return now() - start

                seconds = await take_turns(
                    {"ours": ours, "eventsourcing_thread": peer_thread, "eventsourcing": peer},
                    repeats,
                    settle=settle_durable,
                )
        finally:
            await anyio.to_thread.run_sync(store.close)
            await anyio.to_thread.run_sync(thread_store.close)
    rates = {name: [n / s for s in runs] for name, runs in seconds.items()}
    unit = "events/s"
    return compare(
        rates["ours"],
        rates["eventsourcing_thread"],
        {
            "label": "peers_durable_1 vs eventsourcing in a worker thread (full)",
            "rows": [
                _row(
                    "peers_durable_1 vs eventsourcing, no hop per save (full)",
                    unit,
                    rates["ours"],
                    rates["eventsourcing"],
                )
            ],
            "peers": {name: _NAMES[name] for name in rates if name != "ours"},
            "durability": "full",
            "writers": 1,
            "ours_rates": rates["ours"],
            "limit_rates": rates["eventsourcing_thread"],
            "eventsourcing_rates": rates["eventsourcing"],
            **disk,
            **hop,
        },
    )


SCENARIOS = by_name(
    Scenario(
        name="peers_tell",
        run=peers_tell,
        unit="msgs/s",
        higher_is_better=True,
        target=None,
        n={"full": 20_000, "quick": 5_000, "smoke": 100},
    ),
    Scenario(
        name="peers_ask",
        run=peers_ask,
        unit="µs",
        higher_is_better=False,
        target=0.6,  # issue 14: p50 against pykka's, in the same run
        n={"full": 5_000, "quick": 1_000, "smoke": 50},
    ),
    Scenario(
        name="peers_durable_1",
        run=peers_durable_1,
        unit="events/s",
        higher_is_better=True,
        target=DURABLE_TARGET,
        n={"full": 1_000, "quick": 300, "smoke": 20},
    ),
)
