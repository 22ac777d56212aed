"""What the scenarios share: result types, statistics, timing, and the turns adapters take.

Every ``scenario_*`` module imports from here (and from the engine and the
peers), never from the harness or another scenario; the harness finds the
scenario modules by name and reads their ``SCENARIOS`` and ``ORDER``. This
module imports nothing else from the package, so the package has no import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from engine import Actor, ActorRef
from engine._redis_server import MISSING, RedisServer, find_redis_server
from engine.events import Event

_T = TypeVar("_T")
_A = TypeVar("_A")

# ------------------------------------------------------------------ results


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


def by_name(*scenarios: Scenario) -> dict[str, Scenario]:
    """A module's ``SCENARIOS``: each scenario under its name, in the order given."""
    table: dict[str, Scenario] = {}
    for scenario in scenarios:
        if scenario.name in table:
            raise ValueError(f"scenario names must be unique, got {scenario.name!r} twice")
        table[scenario.name] = scenario
    return table


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


def compare(
    ours: Sequence[float], limit: Sequence[float], extra: dict[str, Any] | None = None
) -> Measurement:
    """The medians of per-repetition figures, and the ratio of each pair of repetitions."""
    return Measurement(
        ours=median(ours),
        limit=median(limit),
        pair_ratios=[o / lim for o, lim in zip(ours, limit, strict=True)],
        extra={} if extra is None else extra,
    )


def throughput(n: int, raw_seconds: list[float], ours_seconds: list[float]) -> Measurement:
    """Rates of ``n`` items per repetition; ``extra`` keeps every repetition's rate."""
    raw_rates = [n / seconds for seconds in raw_seconds]
    ours_rates = [n / seconds for seconds in ours_seconds]
    return compare(ours_rates, raw_rates, {"ours_rates": ours_rates, "limit_rates": raw_rates})


def row(label: str, measured: Measurement, unit: str, **fields: Any) -> dict[str, Any]:
    """One figure behind a headline (``extra.rows``); ``fields`` follow the label."""
    return {
        "label": label,
        **fields,
        "unit": unit,
        "ours": measured.ours,
        "limit": measured.limit,
        "pair_ratio_min": min(measured.pair_ratios),
        "pair_ratio_max": max(measured.pair_ratios),
    }


def with_target(
    figures: dict[str, Any], target: float | None, *, higher_is_better: bool
) -> dict[str, Any]:
    """``figures`` (a ``row``) with the target on its ours / limit and whether it is met."""
    ratio = figures["ours"] / figures["limit"]
    return {
        **figures,
        "target": target_text(target, higher_is_better=higher_is_better),
        "met": meets(ratio, target, higher_is_better=higher_is_better),
    }


# --------------------------------------------------------------- statistics


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: always one of the observed values."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


# ------------------------------------------------------------------- timing

# perf_counter, not anyio.current_time(): we want wall time at the finest
# resolution, and no backend's clock is involved in what is measured.
now = time.perf_counter

SETTLE_LIMIT = 0.25
"""Seconds ``settle_durable`` waits for every task to block before it goes on anyway."""


async def settle() -> None:
    """Let every task reach its wait, so each repetition starts from idle consumers."""
    # A few plain checkpoints first: on asyncio wait_all_tasks_blocked sleeps
    # 0.1 s whenever it finds a runnable task, which would only waste time here.
    for _ in range(3):
        await anyio.lowlevel.checkpoint()
    await anyio.wait_all_tasks_blocked()


async def settle_durable() -> None:
    """``settle``, bounded: an engine with a database never quite settles on asyncio.

    Its housekeeping task wakes every 0.1 s, and anyio's ``wait_all_tasks_blocked``
    on asyncio polls every 0.1 s for a task that is not waiting: the two fall into
    step (each poll finds the housekeeping's timer just fired) and the wait never
    returns. Without this bound about one asyncio run in four hung here.
    """
    with anyio.move_on_after(SETTLE_LIMIT):
        await settle()


def on_asyncio() -> bool:
    """Whether the running backend is asyncio (some peers run only there)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


# -------------------------------------------------------------------- turns


async def take_turns(
    adapters: dict[str, Callable[[], Awaitable[_T]]],
    repeats: int,
    *,
    settle: Callable[[], Awaitable[None]] = settle,
    warm_up: bool = True,
) -> dict[str, list[_T]]:
    """Each adapter's result per repetition; the order is reversed every other repetition.

    ``settle`` runs before each timed repetition. ``warm_up=False`` skips the
    untimed first round, for adapters that warm up outside what they time.
    """
    # One untimed round first: lazy imports, first-call caches and heap growth
    # would otherwise land on whichever adapter runs first.
    if warm_up:
        for adapter in adapters.values():
            await adapter()
    names = list(adapters)
    results: dict[str, list[_T]] = {name: [] for name in names}
    for i in range(repeats):
        for name in names if i % 2 == 0 else reversed(names):
            # Collect now so a cycle left by the previous repetition is not
            # collected inside this one's timed section.
            gc.collect()
            await settle()
            results[name].append(await adapters[name]())
    return results


async def alternate(
    raw: Callable[[], Awaitable[_T]],
    ours: Callable[[], Awaitable[_T]],
    repeats: int,
    *,
    settle: Callable[[], Awaitable[None]] = settle,
) -> tuple[list[_T], list[_T]]:
    """``take_turns`` of raw and ours (raw-ours, ours-raw, ...): raw's results, ours'."""
    results = await take_turns({"raw": raw, "ours": ours}, repeats, settle=settle)
    return results["raw"], results["ours"]


BLOCK = 500
"""Calls per timed block of ``take_turns_in_blocks``."""

BlockAdapter = Callable[[int], Awaitable[float]]
"""``adapter(count)``: make ``count`` calls, return the seconds they took."""


async def take_turns_in_blocks(
    adapters: dict[str, BlockAdapter], n: int, repeats: int
) -> dict[str, list[float]]:
    """Nanoseconds per call of each adapter, one figure per repetition of about n calls.

    A repetition runs the adapters in blocks of ``BLOCK`` calls, one block of
    each in turn (reversed every other turn), so drift within a repetition hits
    them alike; its figure is the median block, so a block that took a
    collection of the old generations or an interrupt does not move it. Between
    blocks, untimed, the loop gets a turn: a cancel scope with a deadline leaves
    a timer entry that asyncio and trio prune only when their loop runs, and a
    tight loop that never yields would time a heap growing by one entry a call.
    """
    # One untimed round first: first-call caches and lazy imports land nowhere.
    for adapter in adapters.values():
        await adapter(BLOCK)
    names = list(adapters)
    per_call: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(repeats):
        gc.collect()
        await settle()
        blocks: dict[str, list[float]] = {name: [] for name in names}
        for block in range(max(1, n // BLOCK)):
            for name in names if block % 2 == 0 else reversed(names):
                blocks[name].append(await adapters[name](BLOCK))
                await anyio.lowlevel.checkpoint()
        for name in names:
            per_call[name].append(median(blocks[name]) / BLOCK * 1e9)
    return per_call


def timed_awaits(call: Callable[[_A], Awaitable[object]], argument: _A) -> BlockAdapter:
    """A ``take_turns_in_blocks`` adapter timing ``count`` of ``await call(argument)``."""

    async def adapter(count: int) -> float:
        # Locals, as a hand-written loop would have them: no closure look-ups timed.
        run, value = call, argument
        start = now()
        for _ in range(count):
            await run(value)
        return now() - start

    return adapter


# ------------------------------------------------------------ actor workloads

STREAM_CAPACITY = 1000
"""Mailbox capacity (and raw stream buffer) of the awaited-tell stream."""


class Probe:
    """Counts handled messages and signals the last one; shared by both adapters' sinks."""

    __slots__ = ("count", "done", "target")

    def __init__(self) -> None:
        self.arm(0)

    def arm(self, target: int) -> None:
        self.count = 0
        self.target = target
        self.done = anyio.Event()


class Sink(Actor):
    """Counts what it receives on its probe."""

    def __init__(self, probe: Probe) -> None:
        self._probe = probe

    async def receive(self, message: object) -> None:
        probe = self._probe
        probe.count += 1
        if probe.count == probe.target:
            probe.done.set()


class Echo(Actor):
    """Answers every ask with the message itself."""

    async def receive(self, message: object) -> object:
        return message


async def timed_tells(ref: ActorRef[Any], probe: Probe, n: int) -> float:
    """A producer task awaiting ``ref.tell`` n times: seconds until the sink handled the n-th."""
    probe.arm(n)

    async def produce() -> None:
        tell = ref.tell
        for i in range(n):
            await tell(i)

    async with anyio.create_task_group() as tg:
        start = now()
        tg.start_soon(produce)
        await probe.done.wait()
        elapsed = now() - start
    return elapsed


async def timed_hand_off(
    put: Callable[[int], Awaitable[object]], get: Callable[[], Awaitable[object]], n: int
) -> float:
    """Seconds from a producer task's first ``await put(i)`` until the consumer has the n-th.

    The consumer task, started and left waiting before the clock starts, awaits
    ``get()`` n times: a stream of awaited tells without actors.
    """
    done = anyio.Event()

    async def consume(*, task_status: TaskStatus[None]) -> None:
        task_status.started()
        receive = get
        for _ in range(n):
            await receive()
        done.set()

    async def produce() -> None:
        send = put
        for i in range(n):
            await send(i)

    async with anyio.create_task_group() as tg:
        await tg.start(consume)
        await settle()
        start = now()
        tg.start_soon(produce)
        await done.wait()
        elapsed = now() - start
    return elapsed


async def timed_asks(ref: ActorRef[Any], n: int) -> list[float]:
    """N sequential ``ref.ask`` round trips: seconds each."""
    ask = ref.ask
    latencies: list[float] = []
    record = latencies.append
    for i in range(n):
        start = now()
        await ask(i)
        record(now() - start)
    return latencies


# ------------------------------------------------------------------ durable


WRITTEN_TAG = "bench.written"


class Written(Event, tag=WRITTEN_TAG):
    """The durable benchmarks' event: the envelope plus one integer (its index)."""

    n: int


FSYNC_SAMPLES = 200
"""At most this many fsyncs measure a durable scenario's disk (at least 20)."""


def fsync_latency(directory: str, n: int) -> dict[str, Any]:
    """os.write of 64 bytes + os.fsync on a file in ``directory``: median and p99 in ms.

    ``n`` (the scenario's N) fsyncs, between 20 and ``FSYNC_SAMPLES``.
    """
    samples = min(FSYNC_SAMPLES, max(20, n))
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    timings: list[float] = []
    try:
        block = b"x" * 64
        for _ in range(samples):
            start = now()
            os.write(fd, block)
            os.fsync(fd)
            timings.append((now() - start) * 1e3)
    finally:
        os.close(fd)
        os.unlink(path)
    return {
        "fsync_ms": median(timings),
        "fsync_p99_ms": percentile(timings, 99),
        "fsync_samples": samples,
        "temp_dir": directory,
    }


THREAD_SAMPLES = 2_000
"""At most this many bare thread round trips are timed per scenario (at least 200)."""


def _nothing() -> None:
    return None


async def thread_round_trips(samples: int) -> list[float]:
    """``samples`` awaits of ``anyio.to_thread.run_sync`` of a no-op: µs each.

    A few untimed calls first start the worker thread, which later calls reuse.
    """
    run_sync = anyio.to_thread.run_sync
    for _ in range(10):
        await run_sync(_nothing)
    timings: list[float] = []
    record = timings.append
    for _ in range(samples):
        start = now()
        await run_sync(_nothing)
        record((now() - start) * 1e6)
    return timings


async def thread_round_trip(n: int) -> dict[str, Any]:
    """What one hop into a worker thread and back costs here: median and p90 in µs.

    ``n`` (the scenario's N) round trips, between 200 and ``THREAD_SAMPLES``: a
    durable write from the event loop pays one at least, as much as a fast fsync.
    """
    samples = min(THREAD_SAMPLES, max(200, n))
    timings = await thread_round_trips(samples)
    return {
        "thread_roundtrip_us": median(timings),
        "thread_roundtrip_p90_us": percentile(timings, 90),
        "thread_roundtrip_samples": samples,
    }


async def paced(count: int, send: Callable[[int], Coroutine[Any, Any, None]], rate: float) -> float:
    """Start ``send(i)`` at ``start + i / rate``, each in its own task; returns the rate achieved.

    A slow call delays only its own item: the schedule does not drift, so a stall
    shows in the latencies instead of being hidden by a slower rate.
    """
    interval = 1.0 / rate
    async with anyio.create_task_group() as tg:
        start = now()
        last = start
        for i in range(count):
            delay = start + i * interval - now()
            if delay > 0:
                await anyio.sleep(delay)
            last = now()
            tg.start_soon(send, i)
    return (count - 1) / (last - start) if count > 1 and last > start else rate


# -------------------------------------------------------------------- redis


class RedisServerMissing(RuntimeError):
    """The cluster scenarios need ``redis-server``, and it is not installed."""


def redis_server_binary() -> str:
    """The path of ``redis-server``; ``RedisServerMissing`` names the package when it is absent."""
    binary = find_redis_server()
    if binary is None:
        raise RedisServerMissing(f"the cluster scenarios need {MISSING}")
    return binary


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port, without persistence: its URL
    (the one the tests and the pytest plugin run, ``engine._redis_server``)."""
    with RedisServer(redis_server_binary()) as server:
        yield server.url
