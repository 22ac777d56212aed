"""Cluster mode beside the fastest raw way to do the same with Redis, in the same run.

Each scenario starts its own ``redis-server`` on a free loopback port (no
persistence). Nodes other than this process are worker processes
(``python -m benchmarks.scenario_cluster worker BACKEND``) on the same
backend, driven by one line of JSON per command on stdin and stdout; a worker
opens its engine only when told to, so its start-up (imports) is never timed.
Times that cross processes are read on ``time.monotonic`` (CLOCK_MONOTONIC, one
clock for every process of the machine). Every namespace has 16 partitions.

- **cluster_forward** (events/s): N events committed in one transaction. Ours
  is the forwarder taking them from the outbox to the streams (read from
  SQLite and decoded, then one Lua call per batch of ``FORWARD_BATCH`` that
  XADDs each and moves the producer's high-water mark in the same step: dedup
  included), timed from the commit's return until
  ``metrics().cluster.forwarding_lag`` is 0. Raw: the same encoded payloads,
  in the same batches to the same number of streams, each batch one EVALSHA of
  a script that only XADDs (no mark), prepared before the clock starts.
  Target: ours / raw >= 0.5.
- **cluster_commit_to_handler** (ms): node A (this process) commits one event
  per ``transact`` at 1,000 events/s; node B (a worker) handles them in a
  cluster-scope subscription. Latency runs from just before ``transact`` to
  the handler's entry on B. Raw: the same path without the engine: sqlite3
  commits with the engine's pragmas (WAL, synchronous FULL), one EVALSHA XADD
  per event, and in the worker one XREAD BLOCK loop over the 16 streams.
  Target: ours' p99 < 50 ms.
- **cluster_scaling** (events/s): N events already in the streams (N / 16 per
  partition), one cluster-scope subscription whose handler spends 0.5 ms of
  CPU per event, handled by 1, 2 and 4 worker processes. Each count runs in a
  fresh namespace; the handlers wait at a gate until every partition has its
  final owner, the gates open at one moment, and the clock runs from there to
  the last event handled. No raw side: the figures are ours against ours.
  Targets: 2 processes / 1 >= 1.7; 4 processes / 2 >= 1 (4 not below 2).
- **cluster_takeover** (s): two workers share a subscription while events
  trickle into every partition; one of them is killed with SIGKILL, and the
  figure is the time until the other handles the first event of a partition
  the dead one held. The headline is the worst of the kills; the "limit" is
  the lease TTL, the soonest a lease can move. Target: < lease_ttl + 1 s.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import coredis
import msgspec
from anyio.abc import Process, TaskGroup, TaskStatus
from anyio.streams.buffered import BufferedByteReceiveStream

from engine import Engine, Transaction
from engine._cluster import FORWARD_BATCH
from engine._routing import stable_hash
from engine.cluster import RedisStreams
from engine.events import Event, encode

from ._common import (
    Measurement,
    Scenario,
    alternate,
    by_name,
    compare,
    median,
    now,
    on_asyncio,
    paced,
    percentile,
    redis_server,
    row,
    settle_durable,
    take_turns,
    with_target,
)

ORDER = 70
"""The harness runs scenario modules by ascending ORDER."""

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 16
SUBSCRIPTION = "bench-cluster"

FORWARD_TARGET = 0.5
"""Ours' forwarding rate / the raw batch XADD's."""
POLL = 0.002
"""Seconds between two reads of the forwarding lag."""

RATE = 1000.0
"""Events per second node A commits in the latency scenario."""
P99_TARGET_MS = 50.0
LATENCY_TTL = 10.0
"""The default lease TTL: the latency scenario's leases never move."""

HANDLER_CPU = 0.0005
"""CPU seconds the scaling scenario's handler spends per event."""
PROCESSES = (1, 2, 4)
SCALING_TARGET = 1.7
"""Events/s with 2 worker processes / with 1."""
OVERSUBSCRIBED_TARGET = 1.0
"""Events/s with 4 worker processes / with 2: more processes than cores cost nothing."""
SCALING_TTL = 2.0
"""Beats every 0.5 s, and a node counts as live for 2 s: handlers that hold the loop
for 0.5 ms at a time never make a beat late enough to look dead."""

TAKEOVER_TTL = 1.0
TAKEOVER_SLACK = 1.0
"""The target: a dead node's partitions are handled again within lease_ttl + this."""

GO_DELAY = 0.05
"""Seconds from sending "go" to the moment every worker opens its handlers' gate."""
SETTLE_TIMEOUT = 20.0
"""Seconds nodes may take to share the partitions (the contract: within 2 lease TTLs)."""
REPLY_TIMEOUT = 60.0
"""Seconds a worker may take to answer one command."""
MAX_REPLY = 64 * 1024 * 1024
WORKER_POLL = 0.02
"""Seconds between two questions to the workers while waiting for them."""
READ_COUNT = 64
BLOCK_MS = 200

clock = time.monotonic
"""CLOCK_MONOTONIC: the same clock in every process, so a worker's times compare with ours."""


# ------------------------------------------------------------------ events


def _partition_keys(partitions: int) -> tuple[str, ...]:
    """A key per partition that picks it (``stable_hash(key) % partitions``)."""
    keys: dict[int, str] = {}
    for i in itertools.count():
        keys.setdefault(stable_hash(f"k{i}") % partitions, f"k{i}")
        if len(keys) == partitions:
            return tuple(keys[p] for p in range(partitions))
    raise AssertionError("unreachable")


PARTITION_KEYS = _partition_keys(PARTITIONS)


class Placed(Event, tag="bench.cluster.placed"):
    """The cluster scenarios' event: its index and the partition it goes to."""

    n: int
    partition: int

    def partition_key(self) -> str:
        return PARTITION_KEYS[self.partition]


def placed_events(count: int) -> list[Placed]:
    """``count`` fresh events spread evenly over the partitions."""
    return [Placed(n=i, partition=i % PARTITIONS) for i in range(count)]


def publish_all(events: Sequence[Placed], tx: Transaction) -> None:
    for event in events:
        tx.publish(event)


# --------------------------------------------------------------- raw redis

RAW_PRODUCER = "raw"
# The forwarder's script without the high-water mark: no HGET, no check, no HSET.
# KEYS: the streams of this batch. ARGV: producer, then (seq, index of its stream
# in KEYS, payload)..., the forwarder's layout, so both send the same bytes.
_RAW_XADD = """
for i = 2, #ARGV, 3 do
  redis.call('XADD', KEYS[tonumber(ARGV[i + 1])], '*', 'p', ARGV[1], 's', ARGV[i], 'e', ARGV[i + 2])
end
return #ARGV
"""

Batch = tuple[list[str], list[Any]]


def raw_batches(
    cluster: RedisStreams, events: Sequence[Placed], first_seq: int, size: int
) -> list[Batch]:
    """``events`` as raw EVALSHA batches of ``size``, entries as the forwarder writes them."""
    batches: list[Batch] = []
    for start in range(0, len(events), size):
        keys: list[str] = []
        slots: dict[int, int] = {}
        args: list[Any] = [RAW_PRODUCER]
        for offset, event in enumerate(events[start : start + size]):
            slot = slots.get(event.partition)
            if slot is None:
                keys.append(cluster.stream(event.partition))
                slot = slots[event.partition] = len(keys)
            args.extend((first_seq + start + offset, slot, encode(event)))
        batches.append((keys, args))
    return batches


@contextlib.asynccontextmanager
async def raw_client(url: str) -> AsyncIterator[Any]:
    """A coredis client and the raw XADD script registered on it."""
    client: Any = coredis.Redis.from_url(url)
    async with client:
        yield client.register_script(_RAW_XADD)


async def _redis_cpu(script: Any) -> float:
    """CPU seconds redis-server spent so far (user + system), from ``INFO cpu``."""
    info = await script.registered_client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def _software(script: Any) -> dict[str, str]:
    """The versions of redis-server and coredis, reported beside the figures."""
    info = await script.registered_client.info("server")
    return {"redis_server": str(info["redis_version"]), "coredis": coredis.__version__}


async def write_batches(script: Any, batches: Sequence[Batch]) -> None:
    """One EVALSHA per batch, each awaited before the next, as the forwarder calls its own."""
    for keys, args in batches:
        await script(keys=keys, args=args)


# ----------------------------------------------------------------- workers


class WorkerFailed(RuntimeError):
    """A worker process refused a command, or exited (its traceback is on stderr)."""


class Worker:
    """One worker process, driven one command at a time."""

    def __init__(self, process: Process) -> None:
        assert process.stdin is not None
        assert process.stdout is not None
        self.process = process
        self._stdin = process.stdin
        self._stdout = BufferedByteReceiveStream(process.stdout)

    async def send(self, op: str, **fields: Any) -> None:
        await self._stdin.send(json.dumps({"op": op, **fields}).encode() + b"\n")

    async def reply(self, op: str) -> dict[str, Any]:
        try:
            with anyio.fail_after(REPLY_TIMEOUT):
                line = await self._stdout.receive_until(b"\n", MAX_REPLY)
        except (anyio.IncompleteRead, anyio.EndOfStream) as exc:
            raise WorkerFailed(
                f"worker {self.process.pid} exited during {op!r} (its traceback is on stderr)"
            ) from exc
        except TimeoutError as exc:
            raise WorkerFailed(
                f"worker {self.process.pid} did not answer {op!r} within {REPLY_TIMEOUT:g} s"
            ) from exc
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise WorkerFailed(f"worker {self.process.pid} refused {op!r}: {answer['error']}")
        return answer

    async def ask(self, op: str, **fields: Any) -> dict[str, Any]:
        await self.send(op, **fields)
        return await self.reply(op)

    async def close(self) -> None:
        """End the process: stdin closed lets it leave its engine; killed if it lingers."""
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            await self._stdin.aclose()
        with anyio.move_on_after(REPLY_TIMEOUT):
            await self.process.wait()
            return
        self.process.kill()
        await self.process.wait()


async def _broadcast(workers: Sequence[Worker], op: str, **fields: Any) -> list[dict[str, Any]]:
    """``op`` sent to every worker before any reply is read: they act at nearly one time."""
    for worker in workers:
        await worker.send(op, **fields)
    return [await worker.reply(op) for worker in workers]


def _backend() -> str:
    return "asyncio" if on_asyncio() else "trio"


async def _spawn() -> Worker:
    process = await anyio.open_process(
        [sys.executable, "-m", "benchmarks.scenario_cluster", "worker", _backend()],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        cwd=ROOT,
    )
    worker = Worker(process)
    try:
        await worker.reply("start-up")
    except BaseException:
        with anyio.CancelScope(shield=True):
            await worker.close()
        raise
    return worker


async def _spawn_into(workers: list[Worker]) -> None:
    workers.append(await _spawn())


@contextlib.asynccontextmanager
async def worker_processes(count: int) -> AsyncIterator[list[Worker]]:
    """``count`` worker processes, started together (their imports overlap) and ended after."""
    started: list[Worker] = []
    try:
        async with anyio.create_task_group() as tg:
            for _ in range(count):
                tg.start_soon(_spawn_into, started)
        yield started
    finally:
        with anyio.CancelScope(shield=True):
            for worker in started:
                await worker.close()


async def _until(
    check: Callable[[], Awaitable[bool]], what: Callable[[], str], within: float
) -> None:
    """Ask ``check`` every WORKER_POLL s until it holds; ``TimeoutError`` naming ``what()``."""
    with anyio.move_on_after(within):
        # Polled: the state is in other processes, which only answer when asked.
        while not await check():  # noqa: ASYNC110
            await anyio.sleep(WORKER_POLL)
        return
    raise TimeoutError(f"{what()} (waited {within:g} s)")


async def _start_nodes(
    workers: Sequence[Worker], names: Sequence[str], directory: str, **config: Any
) -> None:
    """Each worker opens its node ``names[i]`` on a database of its own in ``directory``
    (all at once: their engines start side by side)."""
    for worker, name in zip(workers, names, strict=True):
        database = os.path.join(directory, f"{config['namespace']}-{name}.db")
        await worker.send("start", node=name, database=database, **config)
    for worker in workers:
        await worker.reply("start")


async def _until_shared(workers: Sequence[Worker]) -> list[list[int]]:
    """Wait until the workers hold even shares that cover every partition; each one's."""
    share = PARTITIONS // len(workers)
    held: list[list[int]] = []
    lives: list[list[str]] = []

    async def shared() -> bool:
        states = [await worker.ask("state") for worker in workers]
        held[:] = [sorted(state["owned"]) for state in states]
        lives[:] = [state["live_nodes"] for state in states]
        return all(len(owned) == share for owned in held) and sorted(
            partition for owned in held for partition in owned
        ) == list(range(PARTITIONS))

    def what() -> str:
        return (
            f"the nodes did not settle on {share} of the {PARTITIONS} partitions each: "
            f"they hold {held} of {SUBSCRIPTION!r} (live nodes {lives})"
        )

    await _until(shared, what, SETTLE_TIMEOUT)
    return held


# ------------------------------------------------------------ (1) forwarding


def _forwarding_lag(engine: Engine) -> int:
    cluster = engine.metrics().cluster
    assert cluster is not None
    return cluster.forwarding_lag


async def cluster_forward(n: int, repeats: int) -> Measurement:
    """The forwarder against raw batches of XADDs without the mark: events/s."""
    with (
        redis_server() as url,
        tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory,
    ):
        ours_cluster = RedisStreams(url, namespace="forward", partitions=PARTITIONS)
        raw_cluster = RedisStreams(url, namespace="forward-raw", partitions=PARTITIONS)
        behind: list[int] = []
        async with (
            Engine(os.path.join(directory, "forward.db"), cluster=ours_cluster) as engine,
            raw_client(url) as script,
        ):
            software = await _software(script)
            seqs = itertools.count(1, n)

            async def ours() -> float:
                events = placed_events(n)
                await engine.transact(functools.partial(publish_all, events))
                start = now()
                # The forwarder may have begun before this task resumed: rate what was left.
                left = _forwarding_lag(engine)
                # Polled: the engine tells no one when its forwarder caught up.
                while _forwarding_lag(engine):  # noqa: ASYNC110
                    await anyio.sleep(POLL)
                elapsed = now() - start
                behind.append(left)
                return left / elapsed

            async def raw() -> float:
                batches = raw_batches(raw_cluster, placed_events(n), next(seqs), FORWARD_BATCH)
                start = now()
                await write_batches(script, batches)
                return n / (now() - start)

            raw_rates, ours_rates = await alternate(raw, ours, repeats, settle=settle_durable)
    return compare(
        ours_rates,
        raw_rates,
        {
            "label": f"cluster_forward vs raw Lua XADD batch {FORWARD_BATCH}",
            "batch": FORWARD_BATCH,
            "partitions": PARTITIONS,
            "ours_rates": ours_rates,
            "limit_rates": raw_rates,
            # Of the N events, how many were still to forward when the clock started.
            "forwarded_after_start": behind[1:],
            **software,
        },
    )


# ---------------------------------------------------- (2) commit to handler


class _RawOutbox:
    """sqlite3 alone with the engine's pragmas: one committed outbox row per event."""

    def __init__(self, path: str) -> None:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS outbox (seq INTEGER PRIMARY KEY AUTOINCREMENT, "
            "id TEXT NOT NULL UNIQUE, type TEXT NOT NULL, tenant_id TEXT, "
            "payload BLOB NOT NULL, created_at REAL NOT NULL)"
        )
        self.conn = conn

    def commit(self, event: Placed, payload: bytes) -> None:
        execute = self.conn.execute
        execute("BEGIN IMMEDIATE")
        execute(
            "INSERT INTO outbox (id, type, tenant_id, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            (str(event.id), "bench.cluster.placed", None, payload, time.time()),
        )
        execute("COMMIT")

    def close(self) -> None:
        self.conn.close()


@dataclass(frozen=True)
class _Run:
    latencies: list[float]
    """Seconds from just before the commit to the handler's entry on the other node."""
    acknowledged: list[float]
    """Seconds from just before the commit until the writer had it back (raw: and the XADD)."""
    rate: float
    """Events per second the writer actually started."""


async def _handled(
    node: Worker, sent: Sequence[float], acknowledged: list[float], rate: float
) -> _Run:
    """Once ``node`` handled every event sent: the latency of each."""
    count = len(sent)
    progress: dict[str, Any] = {}

    async def done() -> bool:
        progress.update(await node.ask("progress"))
        return int(progress["count"]) >= count

    await _until(done, lambda: f"node b handled {progress.get('count')} of {count}", REPLY_TIMEOUT)
    records = (await node.ask("records"))["records"]
    return _Run([at - sent[n] for n, at in records], acknowledged, rate)


def _ms(runs: Sequence[_Run], p: float, *, acknowledged: bool = False) -> float:
    return percentile(
        [s * 1e3 for run in runs for s in (run.acknowledged if acknowledged else run.latencies)],
        p,
    )


async def cluster_commit_to_handler(n: int, repeats: int) -> Measurement:
    """Commit on node A, handled on node B, at RATE events/s: latency in ms."""
    with (
        redis_server() as url,
        tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory,
    ):
        namespace = "latency"
        cluster = RedisStreams(
            url, namespace=namespace, partitions=PARTITIONS, node="a", lease_ttl=LATENCY_TTL
        )
        raw_db = _RawOutbox(os.path.join(directory, "raw.db"))
        try:
            async with (
                worker_processes(1) as (b,),
                raw_client(url) as script,
                Engine(os.path.join(directory, "a.db"), cluster=cluster) as a,
            ):
                await b.ask(
                    "start",
                    node="b",
                    url=url,
                    namespace=namespace,
                    lease_ttl=LATENCY_TTL,
                    database=os.path.join(directory, "b.db"),
                    subscribe=True,
                )
                software = await _software(script)
                # Node A runs no subscription: B owns every partition.
                await _until_shared([b])
                writer = anyio.CapacityLimiter(1)  # the raw writer's one connection
                raw_runs = itertools.count()

                async def ours() -> _Run:
                    events = placed_events(n)
                    sent = [0.0] * n
                    acknowledged: list[float] = []
                    await b.ask("expect", record=True)

                    async def send(i: int) -> None:
                        sent[i] = clock()
                        await a.transact(functools.partial(publish_all, (events[i],)))
                        acknowledged.append(clock() - sent[i])

                    rate = await paced(n, send, RATE)
                    return await _handled(b, sent, acknowledged, rate)

                async def raw() -> _Run:
                    raw_cluster = RedisStreams(
                        url, namespace=f"latency-raw-{next(raw_runs)}", partitions=PARTITIONS
                    )
                    events = placed_events(n)
                    sent = [0.0] * n
                    acknowledged: list[float] = []
                    await b.ask("expect", record=True)
                    await b.ask("raw_start", url=url, namespace=raw_cluster.namespace)

                    async def send(i: int) -> None:
                        event = events[i]
                        ((keys, args),) = raw_batches(raw_cluster, (event,), i + 1, 1)
                        sent[i] = clock()
                        await anyio.to_thread.run_sync(
                            raw_db.commit, event, args[3], limiter=writer
                        )
                        await script(keys=keys, args=args)
                        acknowledged.append(clock() - sent[i])

                    rate = await paced(n, send, RATE)
                    run = await _handled(b, sent, acknowledged, rate)
                    await b.ask("raw_stop")
                    return run

                raw_runs_done, ours_runs = await alternate(
                    raw, ours, repeats, settle=settle_durable
                )
        finally:
            raw_db.close()
    pairs = list(zip(ours_runs, raw_runs_done, strict=True))
    p50_pairs = [_ms([o], 50) / _ms([r], 50) for o, r in pairs]
    return Measurement(
        ours=_ms(ours_runs, 99),
        limit=_ms(raw_runs_done, 99),
        pair_ratios=[_ms([o], 99) / _ms([r], 99) for o, r in pairs],
        extra={
            "label": "cluster_commit_to_handler p99 (node A -> node B)",
            "rows": [
                {
                    "label": "cluster_commit_to_handler p50 (node A -> node B)",
                    "unit": "ms",
                    "ours": _ms(ours_runs, 50),
                    "limit": _ms(raw_runs_done, 50),
                    "pair_ratio_min": min(p50_pairs),
                    "pair_ratio_max": max(p50_pairs),
                }
            ],
            "p50_ours": _ms(ours_runs, 50),
            "p50_limit": _ms(raw_runs_done, 50),
            "p99_ours": _ms(ours_runs, 99),
            "p99_limit": _ms(raw_runs_done, 99),
            "max_ours": _ms(ours_runs, 100),
            "max_limit": _ms(raw_runs_done, 100),
            # Until the writer had its commit back: the rest is the way to node B.
            "commit_p50_ours": _ms(ours_runs, 50, acknowledged=True),
            "commit_p99_ours": _ms(ours_runs, 99, acknowledged=True),
            "commit_p50_limit": _ms(raw_runs_done, 50, acknowledged=True),
            "commit_p99_limit": _ms(raw_runs_done, 99, acknowledged=True),
            "rate": RATE,
            "rates_ours": [run.rate for run in ours_runs],
            "rates_limit": [run.rate for run in raw_runs_done],
            "samples": sum(len(run.latencies) for run in ours_runs),
            "lease_ttl": LATENCY_TTL,
            **software,
        },
    )


# ------------------------------------------------------------- (3) scaling


@dataclass(frozen=True)
class _Scaled:
    rate: float
    """Events per second, from "go" to the last event handled."""
    twice: int
    """Events handled twice: the entry a node held when its partition moved on before "go"."""
    cpu: float
    """CPU seconds the workers spent (all threads) from "go" to their last event, per event."""
    redis: float
    """CPU seconds redis-server spent from just before "go" until all was handled, per event."""


async def _scaling_run(
    workers: Sequence[Worker],
    n: int,
    url: str,
    directory: str,
    script: Any,
    namespace: str,
) -> _Scaled:
    """N events in a fresh namespace, handled by ``workers``."""
    cluster = RedisStreams(url, namespace=namespace, partitions=PARTITIONS)
    await write_batches(script, raw_batches(cluster, placed_events(n), 1, FORWARD_BATCH))
    names = [f"w{i}" for i in range(len(workers))]
    await _start_nodes(
        workers,
        names,
        directory,
        url=url,
        namespace=namespace,
        lease_ttl=SCALING_TTL,
        subscribe=True,
        burn=HANDLER_CPU,
        gated=True,
    )
    try:
        # The handlers wait for "go" until the shares settled (the first node to beat
        # takes every partition, then hands the others' shares on).
        await _until_shared(workers)
        # A partition is done once its last event (the highest n) was handled.
        await _broadcast(workers, "expect", record=False, final=n - PARTITIONS)
        progress: list[dict[str, Any]] = []
        redis_before = await _redis_cpu(script)
        await _broadcast(workers, "go", at=clock() + GO_DELAY)

        async def done() -> bool:
            progress[:] = [await worker.ask("progress") for worker in workers]
            finished = {partition for p in progress for partition in p["finished"]}
            return len(finished) == PARTITIONS

        def what() -> str:
            finished = sorted(partition for p in progress for partition in p["finished"])
            return f"{len(workers)} workers finished partitions {finished} only"

        await _until(done, what, REPLY_TIMEOUT)
        start = min(float(p["go"]) for p in progress)
        end = max(float(p["last"]) for p in progress if p["last"] is not None)
        cpu = sum(float(p["cpu"]) for p in progress) / n
        redis = (await _redis_cpu(script) - redis_before) / n
        scaled = _Scaled(n / (end - start), sum(int(p["count"]) for p in progress) - n, cpu, redis)
    except BaseException:
        # What went wrong first is the error to see, not a node that then failed to leave.
        with anyio.CancelScope(shield=True), contextlib.suppress(WorkerFailed):
            await _broadcast(workers, "stop")
        raise
    await _broadcast(workers, "stop")
    return scaled


async def cluster_scaling(n: int, repeats: int) -> Measurement:
    """1, 2 and 4 worker processes on a backlog of CPU-bound events: events/s."""
    if n % PARTITIONS:
        raise ValueError(f"N must be a multiple of {PARTITIONS} (as many per partition), got {n}")
    with (
        redis_server() as url,
        tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory,
    ):
        async with worker_processes(max(PROCESSES)) as workers, raw_client(url) as script:
            software = await _software(script)
            runs = itertools.count()

            def adapter(count: int) -> Callable[[], Awaitable[_Scaled]]:
                async def run() -> _Scaled:
                    namespace = f"scaling-{next(runs)}-{count}"
                    return await _scaling_run(workers[:count], n, url, directory, script, namespace)

                return run

            # No untimed round: what is cold in a worker (its engine, the scripts)
            # warms up before "go", and the clock starts there.
            results = await take_turns(
                {str(count): adapter(count) for count in PROCESSES},
                repeats,
                settle=settle_durable,
                warm_up=False,
            )
    rates = {count: [result.rate for result in runs] for count, runs in results.items()}
    one, two, four = (rates[str(count)] for count in PROCESSES)
    unit = "events/s"
    return compare(
        two,
        one,
        {
            "label": "cluster_scaling 2 vs 1 processes",
            "rows": [
                row("cluster_scaling 4 vs 1 processes", compare(four, one), unit),
                with_target(
                    row("cluster_scaling 4 vs 2 processes", compare(four, two), unit),
                    OVERSUBSCRIBED_TARGET,
                    higher_is_better=True,
                ),
            ],
            "rates": {count: median(values) for count, values in rates.items()},
            "all_rates": rates,
            "handled_twice": {
                count: [result.twice for result in runs] for count, runs in results.items()
            },
            # The workers' CPU per event (handler, engine, client): the 0.5 ms is the handler's.
            "worker_cpu_ms_per_event": {
                count: median([result.cpu * 1e3 for result in runs])
                for count, runs in results.items()
            },
            "redis_cpu_ms_per_event": {
                count: median([result.redis * 1e3 for result in runs])
                for count, runs in results.items()
            },
            "handler_cpu_ms": HANDLER_CPU * 1e3,
            "cpu_count": os.cpu_count(),
            "partitions": PARTITIONS,
            "lease_ttl": SCALING_TTL,
            **software,
        },
    )


# ------------------------------------------------------------ (4) takeover


async def _trickle(script: Any, cluster: RedisStreams, rate: float) -> None:
    """One event per partition every ``PARTITIONS / rate`` s, until cancelled."""
    interval = PARTITIONS / rate
    for batch in itertools.count():
        events = [Placed(n=batch * PARTITIONS + p, partition=p) for p in range(PARTITIONS)]
        await write_batches(
            script, raw_batches(cluster, events, batch * PARTITIONS + 1, PARTITIONS)
        )
        await anyio.sleep(interval)


async def _takeover(survivor: Worker, victim: Worker, name: str, config: dict[str, Any]) -> float:
    """Seconds from SIGKILL of ``victim`` to ``survivor`` handling one of its partitions."""
    await victim.ask("start", node=name, **config)
    _, victim_owned = await _until_shared([survivor, victim])
    await survivor.ask("watch", partitions=victim_owned)
    progress: dict[str, Any] = {}
    killed = clock()
    victim.process.kill()

    async def taken() -> bool:
        progress.update(await survivor.ask("progress"))
        return progress["taken"] is not None

    def what() -> str:
        return f"node b handled no event of partitions {victim_owned} after the kill"

    await _until(taken, what, 10 * TAKEOVER_TTL + 10)
    return float(progress["taken"]) - killed


async def cluster_takeover(n: int, repeats: int) -> Measurement:
    """Kill one of two nodes: seconds until the other handles its partitions' events."""
    with (
        redis_server() as url,
        tempfile.TemporaryDirectory(prefix="actorbus-bench-") as directory,
    ):
        namespace = "takeover"
        cluster = RedisStreams(url, namespace=namespace, partitions=PARTITIONS)

        def config(name: str) -> dict[str, Any]:
            return {
                "url": url,
                "namespace": namespace,
                "lease_ttl": TAKEOVER_TTL,
                "subscribe": True,
                "database": os.path.join(directory, f"{name}.db"),
            }

        seconds: list[float] = []
        async with (
            worker_processes(2) as (survivor, victim),
            raw_client(url) as script,
            anyio.create_task_group() as tg,
        ):
            software = await _software(script)
            await survivor.ask("start", node="b", **config("b"))
            tg.start_soon(_trickle, script, cluster, float(n))
            for kill in range(repeats):
                name = f"a{kill}"
                standby: list[Worker] = []
                try:
                    async with anyio.create_task_group() as spawning:
                        if kill + 1 < repeats:  # the next victim imports while this one dies
                            spawning.start_soon(_spawn_into, standby)
                        seconds.append(await _takeover(survivor, victim, name, config(name)))
                finally:
                    with anyio.CancelScope(shield=True):
                        await victim.close()
                        # Spawned, then cut short by a failure: never left running.
                        if len(seconds) <= kill:
                            for worker in standby:
                                await worker.close()
                if standby:
                    victim = standby[0]
            tg.cancel_scope.cancel()
    return Measurement(
        ours=max(seconds),
        limit=TAKEOVER_TTL,
        pair_ratios=[s / TAKEOVER_TTL for s in seconds],
        extra={
            "label": f"cluster_takeover, worst of {len(seconds)} kills",
            "rows": [
                {
                    "label": "cluster_takeover, median",
                    "unit": "s",
                    "ours": median(seconds),
                    "limit": TAKEOVER_TTL,
                    "pair_ratio_min": min(seconds) / TAKEOVER_TTL,
                    "pair_ratio_max": max(seconds) / TAKEOVER_TTL,
                }
            ],
            "seconds": seconds,
            "lease_ttl": TAKEOVER_TTL,
            "trickle_rate": n,
            **software,
        },
    )


# ------------------------------------------------------------ the worker


def _spend_cpu(seconds: float) -> None:
    """Spend ``seconds`` of this thread's CPU time (a preempted handler still does its share)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class _Node:
    """A worker's node: its engine while it runs, and what its handler saw."""

    def __init__(self, burn: float, gated: bool) -> None:
        self.engine: Engine | None = None
        self.leave = anyio.Event()
        self.left = anyio.Event()
        self.gate = anyio.Event()
        if not gated:
            self.gate.set()
        self.burn = burn
        self.go: float | None = None
        self.cpu_go = 0.0
        self.record = False
        self.final: int | None = None
        self.watch: frozenset[int] = frozenset()
        self.reset()

    def reset(self) -> None:
        self.count = 0
        self.last: float | None = None
        self.taken: float | None = None
        self.records: list[tuple[int, float]] = []
        self.finished: set[int] = set()
        self.cpu_last = self.cpu_go

    def note(self, n: int, partition: int) -> None:
        """One event handled (by the engine's subscription or the raw reader)."""
        at = clock()
        self.count += 1
        self.last = at
        self.cpu_last = time.process_time()
        if self.record:
            self.records.append((n, at))
        if self.taken is None and partition in self.watch:
            self.taken = at
        if self.final is not None and n >= self.final:
            self.finished.add(partition)

    async def handle(self, event: Placed) -> None:
        if not self.gate.is_set():
            await self.gate.wait()
        if self.burn:
            _spend_cpu(self.burn)
        self.note(event.n, event.partition)


class _Server:
    """The worker's side of the protocol: one JSON command per line, one reply each."""

    def __init__(self, tg: TaskGroup) -> None:
        self.tg = tg
        self.node: _Node | None = None
        self.raw: anyio.CancelScope | None = None

    def _node(self) -> _Node:
        if self.node is None:
            raise RuntimeError("no node: send 'start' first")
        return self.node

    def _engine(self) -> Engine:
        engine = self._node().engine
        if engine is None:
            raise RuntimeError("the node has left")
        return engine

    async def start(
        self,
        *,
        node: str,
        url: str,
        namespace: str,
        lease_ttl: float,
        database: str,
        subscribe: bool,
        burn: float = 0.0,
        gated: bool = False,
    ) -> dict[str, Any]:
        if self.node is not None and not self.node.left.is_set():
            raise RuntimeError(f"node {node!r}: a node runs here already")
        state = self.node = _Node(burn, gated)
        cluster = RedisStreams(
            url, namespace=namespace, partitions=PARTITIONS, node=node, lease_ttl=lease_ttl
        )

        async def run(*, task_status: TaskStatus[None]) -> None:
            engine = Engine(database, cluster=cluster)
            if subscribe:
                engine.subscribe(Placed, handler=state.handle, name=SUBSCRIPTION)
            async with engine:
                state.engine = engine
                task_status.started()
                await state.leave.wait()
            state.engine = None
            state.left.set()

        await self.tg.start(run)
        return {}

    async def state(self) -> dict[str, Any]:
        cluster = self._engine().metrics().cluster
        assert cluster is not None
        return {"live_nodes": cluster.live_nodes, "owned": cluster.owned.get(SUBSCRIPTION, [])}

    async def expect(self, *, record: bool, final: int | None = None) -> dict[str, Any]:
        node = self._node()
        node.reset()
        node.record = record
        node.final = final
        return {}

    async def go(self, *, at: float) -> dict[str, Any]:
        """Open the gate at ``at`` (on ``clock``): every worker starts at one moment."""
        node = self._node()

        async def open_gate() -> None:
            await anyio.sleep(at - clock())
            node.go = clock()
            node.cpu_go = time.process_time()
            node.gate.set()

        self.tg.start_soon(open_gate)
        return {}

    async def progress(self) -> dict[str, Any]:
        node = self._node()
        return {
            "count": node.count,
            "go": node.go,
            "last": node.last,
            "taken": node.taken,
            "finished": sorted(node.finished),
            "cpu": node.cpu_last - node.cpu_go,
        }

    async def records(self) -> dict[str, Any]:
        return {"records": self._node().records}

    async def watch(self, *, partitions: list[int]) -> dict[str, Any]:
        node = self._node()
        node.watch = frozenset(partitions)
        node.taken = None
        return {}

    async def stop(self) -> dict[str, Any]:
        node = self._node()
        node.gate.set()  # a gated handler would hold the drain
        node.leave.set()
        await node.left.wait()
        return {}

    async def raw_start(self, *, url: str, namespace: str) -> dict[str, Any]:
        node = self._node()
        cluster = RedisStreams(url, namespace=namespace, partitions=PARTITIONS)
        scope = self.raw = anyio.CancelScope()

        async def read(*, task_status: TaskStatus[None]) -> None:
            with scope:
                await _read_raw(url, cluster, node, task_status)

        await self.tg.start(read)
        return {}

    async def raw_stop(self) -> dict[str, Any]:
        if self.raw is not None:
            self.raw.cancel()
            self.raw = None
        return {}


async def _read_raw(
    url: str, cluster: RedisStreams, node: _Node, task_status: TaskStatus[None]
) -> None:
    """The raw reader: one XREAD BLOCK over every partition's stream, from its start."""
    client: Any = coredis.Redis.from_url(url)
    positions = {cluster.stream(p): "0-0" for p in range(PARTITIONS)}
    decode = msgspec.json.Decoder().decode  # raw: a dict, no event class, no validation
    async with client:
        task_status.started()
        while True:
            found = await client.xread(positions, count=READ_COUNT, block=BLOCK_MS)
            for stream, entries in (found or {}).items():
                for entry in entries:
                    body = decode(entry.field_values[b"e"])
                    node.note(body["n"], body["partition"])
                    positions[stream.decode()] = entry.identifier.decode()


def _answer(reply: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


async def _serve() -> None:
    async with anyio.create_task_group() as tg:
        server = _Server(tg)
        commands: dict[str, Callable[..., Awaitable[dict[str, Any]]]] = {
            "start": server.start,
            "state": server.state,
            "expect": server.expect,
            "go": server.go,
            "progress": server.progress,
            "records": server.records,
            "watch": server.watch,
            "stop": server.stop,
            "raw_start": server.raw_start,
            "raw_stop": server.raw_stop,
        }
        _answer({"ready": True})
        while line := await anyio.to_thread.run_sync(sys.stdin.readline):
            try:
                command = json.loads(line)
                op = command.pop("op")
                if op not in commands:
                    raise ValueError(f"unknown command {op!r}; known: {', '.join(commands)}")
                reply = await commands[op](**command)
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            _answer(reply)
        # stdin closed: the parent is done; the node leaves and the group joins it.
        await server.raw_stop()
        if server.node is not None:
            server.node.gate.set()
            server.node.leave.set()


def worker_main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "worker" or argv[1] not in ("asyncio", "trio"):
        print("usage: python -m benchmarks.scenario_cluster worker asyncio|trio", file=sys.stderr)
        return 2
    anyio.run(_serve, backend=argv[1])
    return 0


# --------------------------------------------------------------- scenarios


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


def _first_error(
    run: Callable[[int, int], Awaitable[Measurement]],
) -> Callable[[int, int], Awaitable[Measurement]]:
    """``run``, raising the first error out of the task groups it passed through: the
    harness shows a failed scenario's last line of stderr, which must say what failed."""

    @functools.wraps(run)
    async def first(n: int, repeats: int) -> Measurement:
        try:
            return await run(n, repeats)
        except BaseExceptionGroup as group:
            raise _leaves(group)[0] from group

    return first


SCENARIOS = by_name(
    Scenario(
        name="cluster_forward",
        run=_first_error(cluster_forward),
        unit="events/s",
        higher_is_better=True,
        target=FORWARD_TARGET,
        n={"full": 20_000, "quick": 10_000, "smoke": 512},
    ),
    Scenario(
        name="cluster_commit_to_handler",
        run=_first_error(cluster_commit_to_handler),
        unit="ms",
        higher_is_better=False,
        target=P99_TARGET_MS,
        # Events per repetition, committed at RATE per second.
        n={"full": 1_000, "quick": 400, "smoke": 20},
        absolute=True,
    ),
    Scenario(
        name="cluster_scaling",
        run=_first_error(cluster_scaling),
        unit="events/s",
        higher_is_better=True,
        target=SCALING_TARGET,
        # Events in the streams per repetition (a multiple of PARTITIONS).
        n={"full": 2_048, "quick": 512, "smoke": 64},
    ),
    Scenario(
        name="cluster_takeover",
        run=_first_error(cluster_takeover),
        unit="s",
        higher_is_better=False,
        target=TAKEOVER_TTL + TAKEOVER_SLACK,
        # Events per second trickling into the streams while nodes are killed.
        n={"full": 1_600, "quick": 1_600, "smoke": 800},
        absolute=True,
    ),
)


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1:]))
