"""Cluster mode (``Engine("node.db", cluster=RedisStreams(...))``) on a real ``redis-server``.

Every test starts its own ``redis-server`` on a free loopback port
(``tests/redis_server.py``; skipped when the binary is missing, failed instead
under ``CI``). Nodes are real engines on real SQLite files in ``tmp_path``: two or
three in this process, or child processes (``tests/cluster_node.py``) for what
needs a process to die (SIGKILL) or to stop answering (SIGSTOP).

Leases expire on Redis's clock, so these tests run in real time (no virtual
clock): lease TTLs are short and every wait is a bounded poll of a condition;
the bounds only turn a hang into a clear failure, except where the contract
itself bounds the time (a rebalance settles within ``2 * lease_ttl``). Redis is
read directly, over a raw socket, to check what is in the streams, who holds a
lease and what is pending.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import re
import select
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import anyio
import pytest

from engine import DeadLettered, Engine, EngineError, Event, PartitionsRebalanced, Transaction
from engine._routing import stable_hash
from engine.cluster import ClusterMetrics, RedisStreams
from engine.events import decode
from tests.cluster_node import JOBS, TALLY, Job, apply, setup
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio

T = TypeVar("T")

NS = "shop"
ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = Path(__file__).resolve().with_name("cluster_node.py")
# Bounds that only turn a hang into a failure: never reached when things work.
BOUND = 15.0
READY_BOUND = 20.0


class Note(Event, tag="cluster.note"):
    """Another event type: a node subscribed only to it does not run ``jobs``."""

    text: str


# ----------------------------------------------------------------- Redis, read raw


class RespError(Exception):
    """An error reply from Redis."""


class _Incomplete(Exception):
    pass


def _parse(buffer: bytes, at: int) -> tuple[Any, int]:
    """One RESP2 value of ``buffer`` from ``at``: (value, where the next begins)."""
    end = buffer.find(b"\r\n", at)
    if end < 0:
        raise _Incomplete
    kind, head, at = buffer[at : at + 1], buffer[at + 1 : end], end + 2
    if kind == b"+":
        return head.decode(), at
    if kind == b"-":
        return RespError(head.decode()), at
    if kind == b":":
        return int(head), at
    if kind == b"$":
        size = int(head)
        if size < 0:
            return None, at
        if len(buffer) < at + size + 2:
            raise _Incomplete
        return buffer[at : at + size], at + size + 2
    if kind == b"*":
        count = int(head)
        if count < 0:
            return None, at
        items = []
        for _ in range(count):
            item, at = _parse(buffer, at)
            items.append(item)
        return items, at
    raise RespError(f"unexpected reply {buffer[:100]!r}")


def redis(server: RedisServer, *args: str | bytes | int) -> Any:
    """One command to ``server``; its reply parsed (bulk strings as bytes)."""
    parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
    request = b"*%d\r\n" % len(parts) + b"".join(
        b"$%d\r\n%s\r\n" % (len(part), part) for part in parts
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5.0) as connection:
        connection.sendall(request)
        buffer = b""
        while True:
            chunk = connection.recv(1 << 16)
            if not chunk:
                raise RespError(f"connection closed after {buffer[:200]!r}")
            buffer += chunk
            try:
                reply, _ = _parse(buffer, 0)
            except _Incomplete:
                continue
            if isinstance(reply, RespError):
                raise reply
            return reply


def stream_entries(
    server: RedisServer, partitions: int, namespace: str = NS
) -> list[tuple[int, str, dict[bytes, bytes]]]:
    """Every entry of every partition's stream: (partition, entry id, fields)."""
    found = []
    for partition in range(partitions):
        for entry_id, flat in redis(server, "XRANGE", f"{namespace}:{partition}", "-", "+"):
            found.append(
                (partition, entry_id.decode(), dict(zip(flat[::2], flat[1::2], strict=True)))
            )
    return found


def streamed_ids(server: RedisServer, partitions: int) -> collections.Counter[str]:
    """How many times each event is in the streams."""
    return collections.Counter(
        str(decode(fields[b"e"]).id) for _, _, fields in stream_entries(server, partitions)
    )


def xlen(server: RedisServer, partition: int) -> int:
    return int(redis(server, "XLEN", f"{NS}:{partition}"))


def stream_length(server: RedisServer, partitions: int) -> int:
    """The entries in all ``partitions`` streams."""
    return sum(xlen(server, partition) for partition in range(partitions))


def lease_holders(server: RedisServer, subscription: str, partitions: int) -> dict[int, str]:
    """Partition -> the node whose lease on it Redis holds (free partitions left out)."""
    holders = {}
    for partition in range(partitions):
        value = redis(server, "GET", f"{NS}:lease:{subscription}:{partition}")
        if value is not None:
            holders[partition] = value.decode().split("/")[0]
    return holders


def pending(server: RedisServer, group: str, partition: int) -> int:
    """How many entries of ``partition`` the group ``group`` was given and not acknowledged."""
    return int(redis(server, "XPENDING", f"{NS}:{partition}", group)[0])


def pending_ids(server: RedisServer, group: str, partition: int) -> set[str]:
    """The ids of the entries of ``partition`` the group ``group`` was given and not
    acknowledged."""
    found = redis(server, "XPENDING", f"{NS}:{partition}", group, "-", "+", 1000)
    return {row[0].decode() for row in found}


def partition_of(key: str, partitions: int) -> int:
    return stable_hash(key) % partitions


def key_in(partition: int, partitions: int, prefix: str) -> str:
    """A job key whose partition is ``partition``."""
    return next(
        key
        for key in (f"{prefix}{i}" for i in range(10_000))
        if partition_of(key, partitions) == partition
    )


# ----------------------------------------------------------------- nodes here


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


def streams(
    server: RedisServer, node: str, *, partitions: int = 4, lease_ttl: float = 0.6, **options: Any
) -> RedisStreams:
    return RedisStreams(
        server.url,
        namespace=NS,
        partitions=partitions,
        node=node,
        lease_ttl=lease_ttl,
        **options,
    )


def node_engine(tmp_path: Path, server: RedisServer, node: str, **options: Any) -> Engine:
    return Engine(tmp_path / f"{node}.db", cluster=streams(server, node, **options))


def cluster_metrics(engine: Engine) -> ClusterMetrics:
    metrics = engine.metrics().cluster
    assert metrics is not None
    return metrics


def owned(engine: Engine, subscription: str = JOBS) -> list[int]:
    return cluster_metrics(engine).owned.get(subscription, [])


async def until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str | Callable[[], str],
    bound: float = BOUND,
) -> None:
    """Poll ``condition`` (real time) until it holds; fail naming ``what`` (a callable
    says what it saw when it gave up) after ``bound`` s."""
    deadline = anyio.current_time() + bound
    while True:
        outcome = condition()
        if not isinstance(outcome, bool):
            outcome = await outcome
        if outcome:
            return
        if anyio.current_time() > deadline:
            pytest.fail(f"{what() if callable(what) else what}: not within {bound} s")
        await anyio.sleep(0.02)


def balanced(engines: list[Engine], partitions: int) -> bool:
    """Every partition owned by exactly one of ``engines``, none above its share."""
    share = math.ceil(partitions / len(engines))
    shares = [owned(engine) for engine in engines]
    every = sorted(p for held in shares for p in held)
    return every == list(range(partitions)) and all(len(held) <= share for held in shares)


async def bounded(call: Awaitable[T]) -> T:
    """Await a call into an engine; a call that never returns (an engine whose task
    died can leave one waiting) fails the test instead of hanging the whole run."""
    with anyio.fail_after(BOUND):
        return await call


async def applied(engine: Engine) -> collections.Counter[str]:
    """How many times the ``tally`` projection applied each job in ``engine``'s database."""

    def read(tx: Transaction) -> list[str]:
        return [row[0] for row in tx.conn.execute("SELECT event_id FROM applied")]

    return collections.Counter(await bounded(engine.transact(read)))


async def outbox_ids(engine: Engine) -> set[str]:
    """The ids of the events in ``engine``'s outbox: what committed there."""

    def read(tx: Transaction) -> set[str]:
        return {row[0] for row in tx.conn.execute("SELECT id FROM outbox")}

    return await bounded(engine.transact(read))


async def commit(engine: Engine, *events: Event) -> None:
    def publish(tx: Transaction) -> None:
        for event in events:
            tx.publish(event)

    await bounded(engine.transact(publish))


class Handled:
    """What function handlers of this process were given: (node, event), in order."""

    def __init__(self) -> None:
        self.log: list[tuple[str, Event]] = []

    def handler(self, node: str, delay: float = 0.0) -> Callable[[Event], Awaitable[None]]:
        async def handle(event: Event) -> None:
            if delay:
                await anyio.sleep(delay)
            self.log.append((node, event))

        return handle

    def ids(self) -> collections.Counter[str]:
        return collections.Counter(str(event.id) for _, event in self.log)

    def by(self, node: str) -> list[Event]:
        return [event for name, event in self.log if name == node]


# ----------------------------------------------------------------- the arguments


def test_a_cluster_needs_a_database() -> None:
    cluster = RedisStreams("redis://127.0.0.1:1/0", namespace=NS)
    with pytest.raises(ValueError, match="a cluster needs a database"):
        Engine(None, cluster=cluster)
    with pytest.raises(ValueError, match="a cluster needs a database"):
        Engine(cluster=cluster)
    with pytest.raises(TypeError, match="cluster must be a RedisStreams, got str"):
        Engine("node.db", cluster="redis://127.0.0.1:1/0")  # type: ignore[arg-type]


def test_redis_streams_keeps_what_it_is_given() -> None:
    cluster = RedisStreams(
        "redis://:secret@10.0.0.5:6379/0",
        namespace="shop-1.eu_west",
        partitions=1024,
        node="web-1",
        lease_ttl=0.3,
        max_len=1,
    )
    assert (cluster.namespace, cluster.partitions, cluster.node) == (
        "shop-1.eu_west",
        1024,
        "web-1",
    )
    assert (cluster.lease_ttl, cluster.max_len) == (0.3, 1)
    assert cluster.stream(0) == "shop-1.eu_west:0"
    assert cluster.stream(1023) == "shop-1.eu_west:1023"
    assert "secret" not in repr(cluster)
    defaults = RedisStreams("unix:///run/redis.sock", namespace="n")
    assert (defaults.partitions, defaults.lease_ttl, defaults.max_len) == (16, 10.0, None)
    # The default node name is made of allowed characters, and differs per instance.
    assert re.fullmatch(r"[A-Za-z0-9_.\-]{1,100}", defaults.node)
    assert defaults.node != RedisStreams("redis://h/0", namespace="n").node


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"namespace": ""}, ValueError, "namespace must be .* got ''"),
        ({"namespace": "a b"}, ValueError, "namespace must be .* got 'a b'"),
        ({"namespace": "shop:eu"}, ValueError, "namespace must be .* got 'shop:eu'"),
        ({"namespace": "{shop}"}, ValueError, r"namespace must be .* got '\{shop\}'"),
        ({"namespace": "x" * 101}, ValueError, "namespace must be 1 to 100"),
        ({"namespace": "caf\u00e9"}, ValueError, "namespace must be .* got 'caf\u00e9'"),
        ({"namespace": 5}, TypeError, "namespace must be .* 5"),
        ({"node": ""}, ValueError, "node must be .* got ''"),
        ({"node": "web 1"}, ValueError, "node must be .* got 'web 1'"),
        ({"node": "web|1"}, ValueError, r"node must be .* got 'web\|1'"),
        ({"node": "web/1"}, ValueError, "node must be .* got 'web/1'"),
        ({"node": "n" * 101}, ValueError, "node must be 1 to 100"),
        ({"node": 7}, TypeError, "node must be .* 7"),
        ({"partitions": 0}, ValueError, "partitions must be between 1 and 1024, got 0"),
        ({"partitions": -3}, ValueError, "partitions must be between 1 and 1024, got -3"),
        ({"partitions": 1025}, ValueError, "partitions must be between 1 and 1024, got 1025"),
        ({"partitions": True}, TypeError, "partitions must be an int, got bool"),
        ({"partitions": 4.0}, TypeError, "partitions must be an int, got float"),
        ({"partitions": "4"}, TypeError, "partitions must be an int, got str"),
        ({"lease_ttl": 0.29}, ValueError, "lease_ttl must be .* >= 0.3, got 0.29"),
        ({"lease_ttl": 0}, ValueError, "lease_ttl must be .* >= 0.3, got 0"),
        ({"lease_ttl": -1.0}, ValueError, r"lease_ttl must be .* got -1\.0"),
        ({"lease_ttl": math.nan}, ValueError, "lease_ttl must be a finite number .* got nan"),
        ({"lease_ttl": math.inf}, ValueError, "lease_ttl must be a finite number .* got inf"),
        ({"lease_ttl": True}, TypeError, "lease_ttl must be .* True"),
        ({"lease_ttl": "10"}, TypeError, "lease_ttl must be .* '10'"),
        ({"max_len": 0}, ValueError, "max_len must be an int >= 1 or None, got 0"),
        ({"max_len": -5}, ValueError, "max_len must be an int >= 1 or None, got -5"),
        ({"max_len": True}, TypeError, "max_len must be an int .* True"),
        ({"max_len": 10.0}, TypeError, r"max_len must be an int .* 10\.0"),
    ],
)
def test_redis_streams_refuses_bad_arguments(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    # As everywhere in the engine: a value of the wrong type is a TypeError, a value
    # of the right type outside the rule a ValueError; both name the value.
    arguments: dict[str, Any] = {"namespace": NS, **options}
    with pytest.raises(error, match=message):
        RedisStreams("redis://127.0.0.1:6390/0", **arguments)


@pytest.mark.parametrize(
    ("url", "error", "message"),
    [
        ("http://127.0.0.1:6379/0", ValueError, "url must start with redis://"),
        ("127.0.0.1:6379", ValueError, "url must start with redis://"),
        ("redis://", ValueError, "url must name a host"),
        ("unix://", ValueError, "url must name a socket path"),
        (6379, TypeError, "url must be a str, got int"),
    ],
)
def test_redis_streams_refuses_bad_urls(url: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        RedisStreams(url, namespace=NS)  # type: ignore[arg-type]


def test_a_bad_url_is_shown_without_its_password() -> None:
    with pytest.raises(ValueError, match="url must start with redis://") as raised:
        RedisStreams("http://user:hunter2@example.com/0", namespace=NS)
    assert "hunter2" not in str(raised.value)


async def _noop(event: Event) -> None:
    pass


def test_scope_rules(tmp_path: Path) -> None:
    # Without a cluster there is no cluster scope, on a database or in memory.
    for engine in (Engine(tmp_path / "plain.db"), Engine()):
        with pytest.raises(ValueError, match="scope='cluster' needs a cluster"):
            engine.subscribe(Job, handler=_noop, name="jobs", scope="cluster")
        engine.subscribe(Job, handler=_noop, name="local", scope="node")
    clustered = Engine(
        tmp_path / "node.db", cluster=RedisStreams("redis://127.0.0.1:1/0", namespace=NS)
    )
    # Cluster scope (the default with a cluster) takes its partitions from the cluster
    # and its order from Event.partition_key(): partitions= and key= are refused.
    for scope in (None, "cluster"):
        with pytest.raises(ValueError, match="partitions= and key= are refused in cluster scope"):
            clustered.subscribe(Job, handler=_noop, name="p", partitions=2, scope=scope)
        with pytest.raises(ValueError, match="partitions= and key= are refused in cluster scope"):
            clustered.subscribe(Job, handler=_noop, name="k", key=lambda job: job.key, scope=scope)
    with pytest.raises(ValueError, match="scope must be 'cluster' or 'node', got 'everywhere'"):
        clustered.subscribe(Job, handler=_noop, name="s", scope="everywhere")  # type: ignore[arg-type]
    # Node scope keeps the local options; nothing refused above was registered.
    clustered.subscribe(
        Job, handler=_noop, name="p", partitions=2, key=lambda job: job.key, scope="node"
    )
    clustered.subscribe(Job, handler=_noop, name="k")
    clustered.subscribe(Job, handler=_noop, name="s", scope="cluster")


def test_metrics_have_no_cluster_without_one(tmp_path: Path) -> None:
    assert Engine(tmp_path / "plain.db").metrics().cluster is None


# ----------------------------------------------------------------- joining


async def test_a_node_with_another_partition_count_is_refused(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async with node_engine(tmp_path, redis_server, "a", partitions=4):
        with pytest.raises(EngineError, match="has 4 partitions; this node was started with 8"):
            async with node_engine(tmp_path, redis_server, "b", partitions=8):
                pytest.fail("a node with 8 partitions joined a namespace of 4")
    # The first node set the count: it holds after every node left.
    with pytest.raises(EngineError, match="has 4 partitions; this node was started with 2"):
        async with node_engine(tmp_path, redis_server, "c", partitions=2):
            pytest.fail("a node with 2 partitions joined a namespace of 4")
    async with node_engine(tmp_path, redis_server, "d", partitions=4) as engine:
        assert cluster_metrics(engine).node == "d"
    assert redis(redis_server, "GET", f"{NS}:partitions") == b"4"


# ----------------------------------------------------------------- sharing the work


async def test_two_nodes_share_a_subscription_and_each_projects_everything_once(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    handled = Handled()
    nodes = {name: node_engine(tmp_path, redis_server, name) for name in ("a", "b")}
    committed: list[Job] = []

    async def produce(name: str, engine: Engine) -> None:
        for n in range(30):
            job = Job(key=f"{name}-{n % 5}", n=n)
            await commit(engine, job)
            committed.append(job)

    async with nodes["a"] as a, nodes["b"] as b:
        for name, engine in nodes.items():
            await bounded(engine.transact(setup))
            engine.subscribe(Job, handler=handled.handler(name), name=JOBS)
            engine.project(Job, projector=apply, name=TALLY)
        await until(lambda: balanced([a, b], 4), "two nodes share the partitions", 2 * 0.6)
        async with anyio.create_task_group() as tg:
            for name, engine in nodes.items():
                tg.start_soon(produce, name, engine)
        ids = {str(job.id) for job in committed}

        async def projected() -> bool:
            return set(await applied(a)) == ids == set(await applied(b))

        await until(lambda: set(handled.ids()) == ids, "every job handled")
        await until(projected, "every job projected on both nodes")
        assert cluster_metrics(a).live_nodes == cluster_metrics(b).live_nodes == ["a", "b"]
        assert sorted(owned(a) + owned(b)) == [0, 1, 2, 3]
        tallies = [await applied(a), await applied(b)]
    # Each job handled once by one node, both nodes took a share.
    assert set(handled.ids().values()) == {1}
    assert handled.by("a")
    assert handled.by("b")
    # A key's jobs are in one partition, so on one node and in order.
    for key in {job.key for job in committed}:
        nodes_of_key = {
            name for name, event in handled.log if isinstance(event, Job) and event.key == key
        }
        assert len(nodes_of_key) == 1, key
        order = [event.n for _, event in handled.log if isinstance(event, Job) and event.key == key]
        assert order == sorted(order) == list(range(int(key[-1]), 30, 5)), key
    # Each node's projection applied every job of the cluster exactly once.
    for tally in tallies:
        assert set(tally) == ids
        assert set(tally.values()) == {1}


async def test_a_node_without_the_subscription_takes_no_share(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A node that does not run a cluster-scope subscription counts toward no share of
    it: the nodes that run it own every partition, so every event is handled."""
    handled = Handled()
    async with (
        node_engine(tmp_path, redis_server, "a") as a,
        node_engine(tmp_path, redis_server, "b") as b,
    ):
        b.subscribe(Note, handler=handled.handler("b"), name="notes")
        await until(lambda: cluster_metrics(a).live_nodes == ["a", "b"], "a sees both nodes")
        a.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        jobs = [Job(key=f"k{n}", n=n) for n in range(12)]
        await commit(b, *jobs)
        await until(
            lambda: set(handled.ids()) == {str(job.id) for job in jobs},
            lambda: f"every job handled (a owns partitions {owned(a)} of 4)",
            2 * 0.6 + 2.0,
        )
        assert owned(a) == [0, 1, 2, 3]


# ----------------------------------------------------------------- rebalancing


async def test_shares_rebalance_as_nodes_join_and_leave(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Within ``2 * lease_ttl`` of a join or a leave no node owns more than
    ``ceil(partitions / live nodes)`` and every partition is owned; jobs committed
    all along are all handled."""
    ttl = 0.9
    handled = Handled()
    committed: list[Job] = []
    engines = {
        name: node_engine(tmp_path, redis_server, name, partitions=6, lease_ttl=ttl)
        for name in ("a", "b", "c")
    }
    for name, engine in engines.items():
        engine.subscribe(Job, handler=handled.handler(name), name=JOBS)

    async def produce(engine: Engine) -> None:
        n = 0
        while True:
            job = Job(key=f"k{n % 7}", n=n)
            await commit(engine, job)
            committed.append(job)
            n += 1
            await anyio.sleep(0.01)

    async def settles(live: list[Engine]) -> None:
        names = sorted(cluster_metrics(engine).node for engine in live)

        def settled() -> bool:
            seen = [cluster_metrics(engine).live_nodes for engine in live]
            return balanced(live, 6) and all(nodes == names for nodes in seen)

        await until(settled, f"shares settle over {names}", 2 * ttl)

    a, b, c = engines.values()
    async with a, anyio.create_task_group() as tg:
        await settles([a])
        assert owned(a) == [0, 1, 2, 3, 4, 5]
        tg.start_soon(produce, a)
        async with b:
            await settles([a, b])
            async with c:
                await settles([a, b, c])
            await settles([a, b])
        await settles([a])
        tg.cancel_scope.cancel()
    # The writer stopped: a again, until what was committed is handled.
    again = node_engine(tmp_path, redis_server, "a", partitions=6, lease_ttl=ttl)
    again.subscribe(Job, handler=handled.handler("a"), name=JOBS)
    async with again:
        ids = {str(job.id) for job in committed}
        await until(lambda: set(handled.ids()) >= ids, "every job handled")
    # Within a node a key's jobs come in order (a job can come twice, at least once).
    for name in engines:
        for key in {job.key for job in committed}:
            order = [e.n for e in handled.by(name) if isinstance(e, Job) and e.key == key]
            assert order == sorted(order), (name, key)


async def test_a_normal_leave_releases_at_once(tmp_path: Path, redis_server: RedisServer) -> None:
    """A node that leaves deletes its leases and its heartbeat on the way out, so the
    other node takes over its partitions before those leases would have run out, and
    what it handled is not handled again."""
    ttl = 2.0
    handled = Handled()
    a = node_engine(tmp_path, redis_server, "a", lease_ttl=ttl)
    b = node_engine(tmp_path, redis_server, "b", lease_ttl=ttl)
    a.subscribe(Job, handler=handled.handler("a"), name=JOBS)
    b.subscribe(Job, handler=handled.handler("b"), name=JOBS)
    before = [Job(key=f"k{n}", n=n) for n in range(20)]
    async with b:
        async with a:
            await until(
                lambda: balanced([a, b], 4) and cluster_metrics(b).live_nodes == ["a", "b"],
                "a and b share the partitions",
            )
            await commit(a, *before)
            await until(lambda: len(handled.log) == 20, "the jobs handled")
            left_by_a, kept_by_b = owned(a), owned(b)
            # Marks in Redis that live exactly as long as a's leases still would.
            for partition in left_by_a:
                left = redis(redis_server, "PTTL", f"{NS}:lease:{JOBS}:{partition}")
                assert left > 0
                redis(redis_server, "SET", f"mark:{partition}", "1", "PX", left)
        assert lease_holders(redis_server, JOBS, 4) == dict.fromkeys(kept_by_b, "b")
        assert redis(redis_server, "ZRANGE", f"{NS}:nodes", 0, -1) == [b"b"]
        await until(lambda: owned(b) == [0, 1, 2, 3], "b takes every partition")
        assert lease_holders(redis_server, JOBS, 4) == dict.fromkeys(range(4), "b")
        marks = [redis(redis_server, "EXISTS", f"mark:{p}") for p in left_by_a]
        assert marks == [1] * len(left_by_a), "b took over only once a's leases had run out"
        after = [Job(key=f"k{n}", n=n) for n in range(20, 24)]
        await commit(b, *after)
        await until(lambda: len(handled.log) == 24, "b handles the later jobs")
    assert handled.ids() == collections.Counter(str(job.id) for job in before + after)
    assert {str(event.id) for event in handled.by("b")} >= {str(job.id) for job in after}


async def test_a_handover_finishes_the_entry_in_hand_first(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """When a node joins, a node above its share hands partitions on: the entry it is
    handling on such a partition is finished and acknowledged before the new owner
    reads the partition, so the partition's events stay in order on one node at a time."""
    ttl = 0.6
    log: list[tuple[str, str, int]] = []
    gate = anyio.Event()
    held = anyio.Event()

    def handler(node: str) -> Callable[[Job], Awaitable[None]]:
        async def handle(job: Job) -> None:
            log.append((node, "begin", job.n))
            if job.hold and node == "a":
                held.set()
                await gate.wait()
            log.append((node, "end", job.n))

        return handle

    # The held jobs are in partition 1, the one a hands on (its highest).
    key = key_in(1, 2, "held-")
    a = node_engine(tmp_path, redis_server, "a", partitions=2, lease_ttl=ttl)
    b = node_engine(tmp_path, redis_server, "b", partitions=2, lease_ttl=ttl)
    a.subscribe(Job, handler=handler("a"), name=JOBS)
    b.subscribe(Job, handler=handler("b"), name=JOBS)
    async with a:
        await until(lambda: owned(a) == [0, 1], "a holds both partitions")
        await commit(a, Job(key=key, n=0, hold=1.0), Job(key=key, n=1), Job(key=key, n=2))
        with anyio.fail_after(BOUND):
            await held.wait()
        async with b:
            await until(lambda: cluster_metrics(a).live_nodes == ["a", "b"], "a sees b")
            # Within the time a rebalance takes, b must not start on partition 1.
            with anyio.move_on_after(2 * ttl):
                await until(lambda: any(node == "b" for node, _, _ in log), "b begins a job")
            assert log == [("a", "begin", 0)], "b read partition 1 while a held its entry"
            gate.set()
            await until(lambda: balanced([a, b], 2), "a partition moves to b")
            await until(lambda: [n for _, step, n in log if step == "end"] == [0, 1, 2], "all")
        # b began nothing of the partition before a finished its job, and not that job.
        assert log[:2] == [("a", "begin", 0), ("a", "end", 0)]
        assert [entry for entry in log if entry[2] == 0] == log[:2]


# ----------------------------------------------------------------- failures


async def test_redis_stopped_while_transactions_commit_then_restarted_empty(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Transactions commit all along; the handlers are slower than the writers, so
    when Redis stops its streams hold jobs forwarded and not yet handled, and the
    Redis that comes back has none of them: the nodes forward again what their
    outboxes hold, so every job is handled, and each projection applies each once."""
    handled = Handled()
    committed: list[Job] = []
    engines = {name: node_engine(tmp_path, redis_server, name) for name in ("a", "b")}

    async def produce(name: str, engine: Engine) -> None:
        n = 0
        while True:
            job = Job(key=f"{name}-{n % 4}", n=n)
            await commit(engine, job)  # never fails because Redis is away
            committed.append(job)
            n += 1
            await anyio.sleep(0.005)

    async with engines["a"] as a, engines["b"] as b:
        async with anyio.create_task_group() as tg:
            for name, engine in engines.items():
                await bounded(engine.transact(setup))
                engine.subscribe(Job, handler=handled.handler(name, 0.02), name=JOBS)
                engine.project(Job, projector=apply, name=TALLY)
                tg.start_soon(produce, name, engine)
            await until(lambda: len(handled.log) >= 20, "jobs handled before Redis stops")
            backlog = set(streamed_ids(redis_server, 4)) - set(handled.ids())
            await anyio.to_thread.run_sync(redis_server.stop)
            assert backlog, "nothing forwarded and not handled when Redis stopped"
            stopped_at = len(committed)
            await until(lambda: len(committed) >= stopped_at + 40, "commits go on without Redis")
            await until(
                lambda: cluster_metrics(a).forwarding_lag > 0 and not cluster_metrics(a).connected,
                "a sees Redis gone",
            )
            await anyio.to_thread.run_sync(redis_server.start)  # same port, no data
            restarted_at = len(committed)
            await until(lambda: len(committed) >= restarted_at + 20, "commits after the restart")
            tg.cancel_scope.cancel()
        # What committed: the outboxes (a writer cut short may have committed too).
        ids = await outbox_ids(a) | await outbox_ids(b)
        assert ids >= {str(job.id) for job in committed}

        async def projected() -> bool:
            return set(await applied(a)) == ids == set(await applied(b))

        await until(lambda: set(handled.ids()) == ids, "every committed job handled")
        await until(projected, "every committed job projected on both nodes")
        await until(
            lambda: cluster_metrics(a).forwarding_lag == cluster_metrics(b).forwarding_lag == 0,
            "everything forwarded",
        )
        assert cluster_metrics(a).connected
        assert cluster_metrics(b).connected
        # Forwarded again after Redis lost its data, jobs may be handled twice (at least
        # once), but projections remember what they applied: exactly once.
        for tally in (await applied(a), await applied(b)):
            assert set(tally.values()) == {1}


async def test_redis_restarted_with_its_data_while_jobs_are_in_hand(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis goes away for a moment while jobs are being handled and comes back with
    its data (a restart that saved it), well within the lease TTL: the node keeps its
    leases, and every partition goes on, so every committed job is handled."""
    ttl = 3.0
    handled = Handled()
    record = handled.handler("a")
    committed: list[Job] = []

    async def slow(job: Job) -> None:
        await anyio.sleep(0.02)  # a job in hand on every busy partition, most of the time
        await record(job)

    async def produce(engine: Engine) -> None:
        for n in range(10_000):
            job = Job(key=f"k{n % 8}", n=n)
            await commit(engine, job)
            committed.append(job)
            await anyio.sleep(0.005)

    async with node_engine(tmp_path, redis_server, "a", lease_ttl=ttl) as a:
        a.subscribe(Job, handler=slow, name=JOBS)
        await until(lambda: owned(a) == [0, 1, 2, 3], "a holds every partition")
        async with anyio.create_task_group() as tg:
            tg.start_soon(produce, a)
            await until(lambda: len(handled.log) >= 20, "jobs handled before Redis stops")
            redis(redis_server, "CONFIG", "SET", "save", "3600 1")  # saved when it stops
            await anyio.to_thread.run_sync(redis_server.stop)
            await anyio.to_thread.run_sync(redis_server.start)  # same port, same data
            assert redis(redis_server, "GET", f"{NS}:partitions") == b"4"
            restarted_at = len(committed)
            await until(lambda: len(committed) >= restarted_at + 20, "commits after the restart")
            tg.cancel_scope.cancel()
        ids = await outbox_ids(a)
        await until(
            lambda: set(handled.ids()) == ids,
            "every committed job handled (a partition whose acknowledgement failed stalls?)",
        )
        assert owned(a) == [0, 1, 2, 3]


async def test_hostile_stream_entries_are_dead_lettered_and_the_partition_goes_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Entries no engine wrote (an unknown type, bytes that are not JSON, no event at
    all, wrong field types) become dead letters carrying their entry ids, for the
    cluster-scope subscription, the node-scope one and the projection alike, and the
    job after them is handled: a partition never stops on them."""
    handled = Handled()
    audited = Handled()
    async with node_engine(tmp_path, redis_server, "a", partitions=1) as a:
        await bounded(a.transact(setup))
        a.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        a.subscribe(Job, handler=audited.handler("a"), name="audit", scope="node")
        a.project(Job, projector=apply, name=TALLY)
        await until(lambda: owned(a) == [0], "a holds the partition")
        stream = f"{NS}:0"
        hostile: list[list[str | bytes]] = [
            ["p", "stranger", "s", "1", "e", '{"type":"cluster.unheard-of","key":"x","n":1}'],
            ["p", "stranger", "s", "2", "e", b"\xff\xfe\x00 not json at all"],
            ["p", "stranger", "s", "3"],  # no event at all
            ["p", "stranger", "s", "4", "e", '{"type":"cluster.job","key":7,"n":"seven"}'],
            ["p", "stranger", "s", "x", "e", "[]"],
        ]
        entries = [redis(redis_server, "XADD", stream, "*", *fields).decode() for fields in hostile]
        job = Job(key="after", n=1)
        await commit(a, job)

        async def projected() -> bool:
            return await applied(a) == {str(job.id): 1}

        await until(lambda: [e.id for _, e in handled.log] == [job.id], "the job handled")
        await until(lambda: [e.id for _, e in audited.log] == [job.id], "the job audited")
        await until(projected, "the job projected")
        await until(lambda: a.dead_letters.count() == 3 * len(hostile), "dead letters")
        letters = a.dead_letters.list()
        for name in (JOBS, "audit", TALLY):
            mine = [letter for letter in letters if letter.actor == name]
            assert sorted(letter.entry or "" for letter in mine) == sorted(entries), name
            assert {letter.reason for letter in mine} == {"failed"}
            assert all(letter.error for letter in mine)
        # Each acknowledged once dead-lettered (the job after them may still be in hand).
        assert not pending_ids(redis_server, JOBS, 0) & set(entries)


async def test_a_failing_event_is_dead_lettered_with_its_entry_and_replayed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """After ``max_attempts`` a job is dead-lettered on the node that handled it with
    its stream entry id and acknowledged, the next job of its key is handled, and
    ``replay`` delivers it there."""
    handled: list[Job] = []
    healed = False

    async def handle(job: Job) -> None:
        if job.n == 1 and not healed:
            raise ValueError(f"cannot digest job {job.n}")
        handled.append(job)

    async with node_engine(tmp_path, redis_server, "a", partitions=2) as a:
        a.subscribe(Job, handler=handle, name=JOBS, max_attempts=2)
        poison, after = Job(key="poison", n=1), Job(key="poison", n=2)
        await commit(a, poison, after)
        # The partition goes on past the dead letter.
        await until(lambda: [job.id for job in handled] == [after.id], "the next job handled")
        await until(lambda: a.dead_letters.count() == 1, "the failing job dead-lettered")
        (letter,) = a.dead_letters.list()
        assert (letter.actor, letter.reason, letter.attempts) == (JOBS, "failed", 2)
        assert letter.error == "ValueError: cannot digest job 1"
        assert isinstance(letter.message, Job)
        assert letter.message.id == poison.id
        partition = partition_of("poison", 2)
        streamed = {
            entry_id: str(decode(fields[b"e"]).id)
            for p, entry_id, fields in stream_entries(redis_server, 2)
            if p == partition
        }
        assert letter.entry is not None
        assert streamed[letter.entry] == str(poison.id)
        # Acknowledged once dead-lettered (the job after it may still be in hand).
        assert letter.entry not in pending_ids(redis_server, JOBS, partition)
        healed = True
        await bounded(a.dead_letters.replay(letter.id))
        await until(lambda: [job.id for job in handled] == [after.id, poison.id], "replayed")
        assert a.dead_letters.count() == 0


# ----------------------------------------------------------------- forwarding


async def test_each_committed_event_is_in_the_streams_once_across_restarts(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A node restarted three times on its database, once leaving before it forwarded
    everything: each committed event is in its partition's stream exactly once."""
    committed: list[Job] = []

    async def run(count: int, *, wait: bool) -> None:
        async with node_engine(tmp_path, redis_server, "a") as a:
            for n in range(count):
                job = Job(key=f"k{n}", n=len(committed))
                await commit(a, job)
                committed.append(job)
            if wait:
                await until(lambda: cluster_metrics(a).forwarding_lag == 0, "forwarded")

    await run(20, wait=True)
    await run(15, wait=False)  # leaves at once: what was not forwarded waits in the outbox
    await run(5, wait=True)
    counts = streamed_ids(redis_server, 4)
    assert counts == collections.Counter(str(job.id) for job in committed)
    # One producer, and its outbox seqs in order within each partition.
    entries = stream_entries(redis_server, 4)
    assert len({fields[b"p"] for _, _, fields in entries}) == 1
    for partition in range(4):
        seqs = [int(fields[b"s"]) for p, _, fields in entries if p == partition]
        assert seqs == sorted(seqs)
        # And each in the partition its key picks.
        jobs = [decode(fields[b"e"]) for p, _, fields in entries if p == partition]
        assert all(isinstance(job, Job) and partition_of(job.key, 4) == partition for job in jobs)


async def test_prune_keeps_what_is_not_forwarded(tmp_path: Path, redis_server: RedisServer) -> None:
    """With Redis down, ``prune(older_than=0)`` leaves the events not forwarded yet;
    Redis back (empty), they all reach the streams and the forwarding lag is 0."""
    async with node_engine(tmp_path, redis_server, "a") as a:
        first = [Job(key=f"first{n}", n=n) for n in range(5)]
        await commit(a, *first)
        await until(lambda: cluster_metrics(a).forwarding_lag == 0, "the first jobs forwarded")
        await anyio.to_thread.run_sync(redis_server.stop)
        later = [Job(key=f"later{n}", n=n) for n in range(5)]
        for job in later:
            await commit(a, job)
        assert cluster_metrics(a).forwarding_lag == 5
        deleted = await bounded(a.prune(older_than=0))
        assert deleted <= len(first)

        def kept(tx: Transaction) -> set[str]:
            return {row[0] for row in tx.conn.execute("SELECT id FROM outbox")}

        assert {str(job.id) for job in later} <= await bounded(a.transact(kept))
        await anyio.to_thread.run_sync(redis_server.start)  # same port, no data
        await until(lambda: cluster_metrics(a).forwarding_lag == 0, "forwarded after the restart")
        counts = streamed_ids(redis_server, 4)
        assert {str(job.id) for job in later} <= set(counts)
        assert set(counts.values()) == {1}
        assert set(counts) == await bounded(a.transact(kept))


async def test_retention_trims_what_every_reader_passed(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The streams are trimmed below what every group and every node-scope reader
    passed: a partition everyone read is emptied, while in the other one what a
    node-scope reader has not read yet stays; once it read everything, that goes too."""
    handled = Handled()
    audited = Handled()
    gate = anyio.Event()
    # Five jobs in each partition; b's node-scope reader stops at the third of partition 0.
    keys = [f"k{n}" for n in range(40)]
    jobs = [
        Job(key=key, n=n)
        for partition in (0, 1)
        for n, key in enumerate([key for key in keys if partition_of(key, 2) == partition][:5])
    ]
    stopper = jobs[2]
    ids = {str(job.id) for job in jobs}

    async def audit(job: Job) -> None:
        if job.id == stopper.id:
            await gate.wait()
        audited.log.append(("b", job))

    def metrics_trimmed() -> int:
        return cluster_metrics(a).trimmed + cluster_metrics(b).trimmed

    def entries_of(partition: int) -> set[str]:
        return {
            str(decode(fields[b"e"]).id)
            for p, _, fields in stream_entries(redis_server, 2)
            if p == partition
        }

    async with (
        node_engine(tmp_path, redis_server, "a", partitions=2) as a,
        node_engine(tmp_path, redis_server, "b", partitions=2) as b,
    ):
        a.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        b.subscribe(Job, handler=handled.handler("b"), name=JOBS)
        # One actor per stream partition, so the stopped one holds up partition 0 only.
        b.subscribe(
            Job,
            handler=audit,
            name="audit",
            scope="node",
            partitions=2,
            key=lambda job: partition_of(job.key, 2),
        )
        await until(lambda: balanced([a, b], 2), "the partitions shared")
        await commit(a, *jobs)
        await until(lambda: set(handled.ids()) == ids, "every job handled")
        await until(lambda: stream_length(redis_server, 2) < 10, "the leader trims")
        await until(lambda: xlen(redis_server, 1) == 0, "partition 1 is emptied")
        unread = {str(job.id) for job in jobs[2:5]}
        assert entries_of(0) >= unread, "trimmed what b's node-scope reader had not read"
        # The leader counts a trim once Redis answered the XTRIM, after the stream shrank.
        left = 10 - len(entries_of(0))
        await until(lambda: metrics_trimmed() == left, "the trimmed entries counted")
        gate.set()
        await until(lambda: set(audited.ids()) == ids, "b reads every job")
        await until(lambda: stream_length(redis_server, 2) == 0, "partition 0 is emptied")
        await until(lambda: metrics_trimmed() == 10, "the trimmed entries counted")


async def test_max_len_caps_the_streams(tmp_path: Path, redis_server: RedisServer) -> None:
    """``max_len`` caps a stream whatever was read, and what it trims is counted."""
    async with node_engine(tmp_path, redis_server, "a", partitions=1, max_len=3) as a:
        await commit(a, *[Job(key=f"k{n}", n=n) for n in range(10)])
        await until(lambda: cluster_metrics(a).forwarding_lag == 0, "the jobs forwarded")
        await until(lambda: cluster_metrics(a).trimmed == 7, "a counts what it trimmed")
        assert xlen(redis_server, 0) == 3


# ----------------------------------------------------------------- nodes in child processes


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


class NodeProcess:
    """A cluster node in a child process (``tests/cluster_node.py``); always reaped."""

    def __init__(
        self,
        workdir: Path,
        server: RedisServer,
        name: str,
        backend: str,
        *,
        partitions: int,
        lease_ttl: float,
    ) -> None:
        self.name = name
        self.workdir = workdir
        runs = len(list(workdir.glob(f"{name}.*.stderr")))
        self.stderr = workdir / f"{name}.{runs}.stderr"
        args = [
            sys.executable,
            "-W",
            "error",
            str(NODE_SCRIPT),
            *("--db", str(workdir / f"{name}.db"), "--url", server.url),
            *("--namespace", NS, "--node", name, "--workdir", str(workdir)),
            *("--backend", backend, "--partitions", str(partitions)),
            *("--lease-ttl", str(lease_ttl)),
        ]
        with self.stderr.open("wb") as stderr:
            # Unbuffered: select() on the pipe sees every line the child printed.
            self.proc = subprocess.Popen(
                args,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                env=child_env(),
                cwd=ROOT,
                bufsize=0,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def describe(self) -> str:
        return f"node {self.name} (pid {self.pid}): {self.stderr.read_text()[-3000:]}"

    def expect(self, expected: str, bound: float = READY_BOUND) -> None:
        """Block until the child prints ``expected`` (bounded; dying first is a failure)."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + bound
        line = b""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"printed no {expected!r} line in {bound} s: {self.describe()}")
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                continue
            byte = stdout.read(1)
            if not byte:
                self.proc.wait()
                pytest.fail(f"exited with {self.proc.returncode}: {self.describe()}")
            if byte != b"\n":
                line += byte
            elif line.decode().strip() == expected:
                return
            else:
                line = b""

    def send(self, command: str) -> None:
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(command.encode() + b"\n")
        stdin.flush()

    def quit(self) -> None:
        """Leave the engine normally and exit 0."""
        self.send("quit")
        self.expect("stopped", BOUND)
        assert self.proc.wait(timeout=BOUND) == 0, self.describe()

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=BOUND) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGCONT)
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()

    def records(self, kind: str) -> list[list[str]]:
        """The lines of the node's ``kind`` record file, split in words."""
        path = self.workdir / f"{self.name}.{kind}"
        if not path.exists():
            return []
        return [line.split() for line in path.read_text().splitlines()]


@contextlib.contextmanager
def node_process(
    workdir: Path,
    server: RedisServer,
    name: str,
    backend: str,
    *,
    partitions: int = 6,
    lease_ttl: float = 1.0,
) -> Iterator[NodeProcess]:
    node = NodeProcess(workdir, server, name, backend, partitions=partitions, lease_ttl=lease_ttl)
    try:
        yield node
    finally:
        node.close()


def wait_for(condition: Callable[[], bool], what: str, bound: float = BOUND) -> None:
    """``until`` for the tests that drive child processes (blocking, real time)."""
    deadline = time.monotonic() + bound
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {bound} s")
        time.sleep(0.02)


def database_ids(db: Path, query: str) -> collections.Counter[str]:
    """Read a node's database directly (it may be running: WAL lets a reader in)."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return collections.Counter(str(row[0]) for row in conn.execute(query))


def committed_ids(workdir: Path, names: list[str]) -> set[str]:
    """Every event that committed on these nodes: their outboxes, read directly."""
    return {
        event_id
        for name in names
        for event_id in database_ids(workdir / f"{name}.db", "SELECT id FROM outbox")
    }


def test_a_node_killed_mid_run(tmp_path: Path, redis_server: RedisServer) -> None:
    """Three nodes share ``jobs`` and each projects ``tally``; one is SIGKILLed while
    all three commit. Its partitions move to the survivors once its leases run out
    and nothing committed is lost; jobs are handled twice only where the dead node had
    one in hand, at most one per partition it held; each survivor keeps per-key
    order. Restarted, the dead node forwards what it had committed (each event is
    in the streams once) and its projection resumes: every node projected every
    job exactly once."""
    partitions, ttl = 6, 1.0
    names = ["n1", "n2", "n3"]
    victim = "n2"
    backends = {"n1": "asyncio", "n2": "trio", "n3": "trio"}
    with contextlib.ExitStack() as stack:
        nodes = {
            name: stack.enter_context(
                node_process(tmp_path, redis_server, name, backends[name], lease_ttl=ttl)
            )
            for name in names
        }
        for node in nodes.values():
            node.expect("ready")

        def spread() -> bool:
            holders = lease_holders(redis_server, JOBS, partitions)
            counts = collections.Counter(holders.values())
            return len(holders) == partitions and set(counts) == set(names)

        wait_for(spread, "the partitions spread over three nodes")
        wait_for(
            lambda: (
                max(collections.Counter(lease_holders(redis_server, JOBS, 6).values()).values())
                <= 2
            ),
            "each node holds its share",
        )
        for node in nodes.values():
            node.send("produce 120 0.005 4 0.01")
        wait_for(lambda: len(nodes[victim].records("handled")) >= 15, "the victim handles jobs")
        held = {
            p
            for p, holder in lease_holders(redis_server, JOBS, partitions).items()
            if holder == victim
        }
        nodes[victim].kill()
        handled_by_victim = {line[1] for line in nodes[victim].records("handled")}
        begun_by_victim = {line[1] for line in nodes[victim].records("begun")}
        survivors = [name for name in names if name != victim]
        wait_for(
            lambda: (
                set(lease_holders(redis_server, JOBS, partitions).values()) == set(survivors)
                and len(lease_holders(redis_server, JOBS, partitions)) == partitions
            ),
            "the survivors take the dead node's partitions",
        )
        for name in survivors:
            nodes[name].expect("produced", BOUND)

        def handled_everywhere() -> collections.Counter[str]:
            return collections.Counter(
                line[1] for name in names for line in nodes[name].records("handled")
            )

        # Before the dead node comes back: everything in the streams is handled.
        wait_for(
            lambda: set(streamed_ids(redis_server, partitions)) <= set(handled_everywhere()),
            "every streamed job handled",
        )
        # Handled again: only what the dead node had begun, at most one job in hand per
        # partition it held (it acknowledges a job before it begins the next).
        counts = handled_everywhere()
        twice = {event_id for event_id, count in counts.items() if count > 1}
        assert all(counts[event_id] == 2 for event_id in twice)
        assert twice <= handled_by_victim
        again = {
            line[1] for name in survivors for line in nodes[name].records("handled")
        } & begun_by_victim
        keys = {line[1]: line[2] for name in names for line in nodes[name].records("handled")}
        assert {partition_of(keys[event_id], partitions) for event_id in again} <= held
        assert len(again) <= len(held)
        for name in survivors:
            seen: dict[str, list[int]] = collections.defaultdict(list)
            for _, _, key, n in nodes[name].records("handled"):
                seen[key].append(int(n))
            for key, order in seen.items():
                assert order == sorted(set(order)), (name, key)

        # The dead node comes back on its database: it forwards what it committed and
        # had not forwarded, and its projection resumes where its database says.
        nodes[victim] = stack.enter_context(
            node_process(tmp_path, redis_server, victim, "asyncio", lease_ttl=ttl)
        )
        nodes[victim].expect("ready")
        committed = committed_ids(tmp_path, names)
        acked = {line[0] for name in names for line in nodes[name].records("acked")}
        assert acked <= committed

        def caught_up() -> bool:
            projected = [
                database_ids(tmp_path / f"{name}.db", "SELECT event_id FROM applied")
                for name in names
            ]
            return set(handled_everywhere()) >= committed and all(
                set(tally) == committed for tally in projected
            )

        wait_for(caught_up, "every committed job handled and projected on every node")
        for node in nodes.values():
            node.quit()
    for name in names:
        tally = database_ids(tmp_path / f"{name}.db", "SELECT event_id FROM applied")
        assert set(tally) == committed
        assert set(tally.values()) == {1}, f"{name} projected a job twice"
    # In the streams once each (retention may have trimmed what every reader passed).
    streamed = streamed_ids(redis_server, partitions)
    assert set(streamed) <= committed
    assert set(streamed.values()) <= {1}


async def test_a_paused_node_does_not_acknowledge(
    tmp_path: Path, redis_server: RedisServer, anyio_backend: str
) -> None:
    """A node stopped (SIGSTOP) with a job in hand loses its lease to another node;
    resumed, it finishes the job but neither acknowledges it (the new holder still
    has it pending) nor reads the partition any further."""
    ttl = 0.6
    child_backend = "trio" if anyio_backend == "asyncio" else "asyncio"
    log: list[tuple[str, int]] = []
    gate = anyio.Event()

    async def handle(job: Job) -> None:
        log.append(("q", job.n))
        if job.hold:
            await gate.wait()

    key = "held"
    with node_process(tmp_path, redis_server, "p", child_backend, partitions=1, lease_ttl=ttl) as p:
        await anyio.to_thread.run_sync(p.expect, "ready")
        await until(lambda: lease_holders(redis_server, JOBS, 1) == {0: "p"}, "p holds it")
        async with node_engine(tmp_path, redis_server, "q", partitions=1, lease_ttl=ttl) as q:
            q.subscribe(Job, handler=handle, name=JOBS)
            first, second = Job(key=key, n=0, hold=1.0), Job(key=key, n=1)
            await commit(q, first, second)
            await until(
                lambda: [str(first.id)] in [line[1:] for line in p.records("begun")], "p begins"
            )
            os.kill(p.pid, signal.SIGSTOP)
            await until(lambda: log == [("q", 0)], "q takes the partition and the held job")
            assert lease_holders(redis_server, JOBS, 1) == {0: "q"}
            os.kill(p.pid, signal.SIGCONT)
            await until(
                lambda: str(first.id) in [line[1] for line in p.records("handled")],
                "p finishes the job it held",
            )
            # Once p left, whatever it was going to do with the job is done.
            await anyio.to_thread.run_sync(p.quit)
            assert pending(redis_server, JOBS, 0) == 2, "p acknowledged a job after its lease"
            assert lease_holders(redis_server, JOBS, 1) == {0: "q"}
            gate.set()
            await until(lambda: log == [("q", 0), ("q", 1)], "q handles the rest")
            await until(lambda: pending(redis_server, JOBS, 0) == 0, "q acknowledges")
    assert [line[1] for line in p.records("handled")] == [str(first.id)]


# ---------------------------------------------------------------- engine.idle


async def test_idle_waits_until_what_committed_here_is_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a") as engine:
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope="node")
        await commit(engine, *(Job(key=f"k{n}", n=n) for n in range(5)))
        await bounded(engine.idle())
        assert cluster_metrics(engine).forwarding_lag == 0
        await anyio.to_thread.run_sync(redis_server.stop)
        await until(lambda: not cluster_metrics(engine).connected, "a sees Redis gone")
        await commit(engine, Job(key="k-late", n=5))
        with pytest.raises(TimeoutError, match="1 events committed here and not yet forwarded"):
            await engine.idle(timeout=0.3)
        await anyio.to_thread.run_sync(redis_server.start)
        await bounded(engine.idle())
        assert cluster_metrics(engine).forwarding_lag == 0


@pytest.mark.parametrize("reader", ["node-scope", "cluster-scope", "projection"])
async def test_idle_waits_until_this_nodes_readers_read_back_what_it_forwarded(
    tmp_path: Path, redis_server: RedisServer, reader: str
) -> None:
    """Once ``idle()`` returns, the reader on this node has handled what it committed:
    a node-scope subscription, a projection, or a cluster-scope subscription whose
    partitions it holds. Asserted at once, no polling; one reader per test, so no
    other reader's wait covers it."""
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a") as engine:
        await bounded(engine.transact(setup))
        if reader == "projection":
            engine.project(Job, projector=apply, name=TALLY)
        else:
            scope: Literal["node", "cluster"] = "node" if reader == "node-scope" else "cluster"
            engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope=scope)
        if reader == "cluster-scope":
            await until(lambda: owned(engine) == [0, 1, 2, 3], "a holds every partition")
        for round_ in range(3):
            jobs = [Job(key=f"k{n}", n=n) for n in range(round_ * 10, round_ * 10 + 10)]
            await commit(engine, *jobs)
            await bounded(engine.idle())
            seen = {str(event.id) for _, event in handled.log}
            if reader == "projection":
                seen = set(await applied(engine))
            assert {str(job.id) for job in jobs} <= seen


async def test_idle_right_after_subscribing_waits_for_the_partitions_to_be_taken(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A user's test: subscribe (cluster scope), commit, ``idle()``, assert. The node
    takes the subscription's partitions on its next beat: ``idle()`` waits for that
    and for the reading, whatever the order."""
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a", lease_ttl=1.5) as engine:
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        jobs = [Job(key=f"k{n}", n=n) for n in range(8)]
        await commit(engine, *jobs)
        await bounded(engine.idle())
        assert handled.ids() == collections.Counter(str(job.id) for job in jobs)


async def test_idle_is_not_held_by_entries_trimmed_before_a_reader_came(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """What this node forwarded and retention trimmed before a subscription was made
    cannot be read back: ``idle()`` returns once that reader found the stream's end."""
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a") as engine:
        engine.subscribe(Job, handler=handled.handler("a"), name="early", scope="node")
        await commit(engine, *(Job(key=f"k{n}", n=n) for n in range(8)))
        await bounded(engine.idle())
        for partition in range(4):
            redis(redis_server, "XTRIM", f"{NS}:{partition}", "MAXLEN", 0)
        engine.subscribe(Job, handler=handled.handler("late"), name="late", scope="node")
        await bounded(engine.idle())
    assert [node for node, _ in handled.log].count("late") == 0


@pytest.mark.parametrize("scope", ["node", "cluster"])
async def test_idle_names_a_reader_that_has_not_read_back(
    tmp_path: Path, redis_server: RedisServer, scope: Literal["node", "cluster"]
) -> None:
    """A subscription made while Redis is away cannot read back what was forwarded
    before: ``idle()`` waits, and its ``TimeoutError`` names the subscription. Redis
    comes back empty: with nothing new committed, the node forwards again what its
    outbox holds, and the reader catches up."""
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a", partitions=1) as engine:
        jobs = [Job(key="k", n=1), Job(key="k", n=2)]
        await commit(engine, *jobs)
        await bounded(engine.idle())
        await anyio.to_thread.run_sync(redis_server.stop)
        await until(lambda: not cluster_metrics(engine).connected, "a sees Redis gone")
        engine.subscribe(Job, handler=handled.handler("a"), name="late", scope=scope)
        unsettled = {
            "node": r"not yet read back: late:0$",
            "cluster": r"cluster-scope subscriptions not yet given partitions: late$",
        }
        with pytest.raises(TimeoutError, match=unsettled[scope]):
            await engine.idle(timeout=0.3)
        await anyio.to_thread.run_sync(redis_server.start)
        await bounded(engine.idle())
        assert {str(event.id) for _, event in handled.log} == {str(job.id) for job in jobs}


async def handled_then_closed(engine: Engine, handled: Handled, count: int) -> list[Job]:
    """``count`` jobs committed and handled by a node-scope subscription, then it closed."""
    ref = engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope="node")
    jobs = [Job(key=f"k{n}", n=n) for n in range(count)]
    await commit(engine, *jobs)
    await until(lambda: len(handled.log) == count, "the jobs handled")
    await bounded(ref.close())
    assert ref.closed
    return jobs


async def test_a_closed_node_scope_subscription_resumes_after_its_position(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a") as engine:
        first = await handled_then_closed(engine, handled, 6)
        later = [Job(key=f"k{n}", n=n) for n in range(6, 10)]
        await commit(engine, *later)
        await bounded(engine.idle())
        assert len(handled.log) == 6  # closed: nothing more reaches it
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope="node")
        await until(lambda: len(handled.log) == 10, "the later jobs handled after resuming")
    # It resumed after its position: the first jobs did not come again.
    assert handled.ids() == collections.Counter(str(job.id) for job in first + later)


async def test_a_closed_cluster_subscription_hands_its_partitions_on(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    handled = Handled()
    rebalanced: list[PartitionsRebalanced] = []

    async def watch(event: PartitionsRebalanced) -> None:
        rebalanced.append(event)

    async with (
        node_engine(tmp_path, redis_server, "a") as a,
        node_engine(tmp_path, redis_server, "b") as b,
    ):
        a.subscribe(PartitionsRebalanced, handler=watch, name="watch")
        ref = a.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        b.subscribe(Job, handler=handled.handler("b"), name=JOBS)
        await until(lambda: balanced([a, b], 4), "the partitions shared")
        await bounded(ref.close())
        assert owned(a) == []
        assert rebalanced[-1].owned == []
        await until(lambda: owned(b) == [0, 1, 2, 3], "b takes every partition")
        jobs = [Job(key=f"k{n}", n=n) for n in range(8)]
        await commit(a, *jobs)
        await until(lambda: len(handled.log) >= 8, "every job handled")
    assert set(handled.ids()) == {str(job.id) for job in jobs}
    assert handled.by("a") == []


# ------------------------------------------------------------- system events


async def test_a_node_announces_the_partitions_it_holds(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    seen: list[PartitionsRebalanced] = []

    async def watch(event: PartitionsRebalanced) -> None:
        seen.append(event)

    async with node_engine(tmp_path, redis_server, "a") as engine:
        # System events are the node's own: node scope by default, cluster scope refused.
        engine.subscribe(PartitionsRebalanced, handler=watch, name="watch")
        with pytest.raises(ValueError, match="scope='node'"):
            engine.subscribe(DeadLettered, handler=_noop, name="c", scope="cluster")
        engine.subscribe(Job, handler=_noop, name=JOBS)
        await until(lambda: owned(engine) == [0, 1, 2, 3], "a holds every partition")
        await until(lambda: bool(seen) and seen[-1].owned == [0, 1, 2, 3], "announced")
    assert {event.subscription for event in seen} == {JOBS}


async def test_forget_on_a_node_drops_its_stream_positions_and_their_retention(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    handled = Handled()
    # Retention keeps entries younger than two lease TTLs: 10 s, so the jobs stay.
    async with node_engine(tmp_path, redis_server, "a", lease_ttl=5.0) as engine:
        await handled_then_closed(engine, handled, 4)
        fields = redis(redis_server, "HKEYS", f"{NS}:positions")
        assert sorted(f for f in fields if f.startswith(b"a|jobs|")) == [
            f"a|jobs|{p}".encode() for p in range(4)
        ]
        assert await bounded(engine.forget(JOBS)) == 4
        fields = redis(redis_server, "HKEYS", f"{NS}:positions")
        assert [f for f in fields if f.startswith(b"a|jobs|")] == []
        with pytest.raises(KeyError, match="jobs"):
            await engine.forget(JOBS)
        # Subscribed again it starts over: what retention kept comes again, and idle()
        # waits for it.
        kept = streamed_ids(redis_server, 4)
        del handled.log[:]
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope="node")
        await bounded(engine.idle())
        assert handled.ids() == kept


async def test_idle_after_a_close_in_mid_entry_waits_for_the_new_readers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A node-scope subscription is closed while its reader has an entry in hand; the
    reader finishes it after the close began. Forgotten and subscribed again, the new
    readers read the stream from its start, and ``idle()`` waits for them: what the old
    reader finished late does not count for them."""
    gate, started = anyio.Event(), anyio.Event()
    handled = Handled()

    async def held(job: Job) -> None:
        started.set()
        await gate.wait()

    async with node_engine(tmp_path, redis_server, "a", partitions=1, lease_ttl=5.0) as engine:
        ref = engine.subscribe(Job, handler=held, name=JOBS, scope="node")
        job = Job(key="k", n=1)
        await commit(engine, job)
        with anyio.fail_after(BOUND):
            await started.wait()
        async with anyio.create_task_group() as tg:
            tg.start_soon(ref.close)
            await anyio.lowlevel.checkpoint()  # the close begins: the reader stops after this
            gate.set()
        assert await bounded(engine.forget(JOBS)) == 1
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS, scope="node")
        await bounded(engine.idle())
        assert handled.ids() == collections.Counter([str(job.id)])


def groups(server: RedisServer, name: str, partitions: int = 4) -> list[int]:
    """The partitions whose stream holds a consumer group ``name``."""
    found = []
    for partition in range(partitions):
        try:
            infos = redis(server, "XINFO", "GROUPS", f"{NS}:{partition}")
        except RespError:
            continue  # no stream
        if isinstance(infos, RespError):
            continue
        names = {dict(zip(info[::2], info[1::2], strict=True))[b"name"] for info in infos}
        if name.encode() in names:
            found.append(partition)
    return found


async def test_forget_drops_a_retired_cluster_scope_subscriptions_groups(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """A cluster-scope subscription no node runs any more: ``forget`` destroys its
    consumer group in every partition's stream (which held retention back) and its
    members set; subscribed again, it reads what the streams hold from their start."""
    handled = Handled()
    # Retention keeps entries younger than two lease TTLs: 10 s, so the jobs stay.
    async with node_engine(tmp_path, redis_server, "a", lease_ttl=5.0) as engine:
        ref = engine.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        await commit(engine, *(Job(key=f"k{n}", n=n) for n in range(6)))
        await bounded(engine.idle())
        assert len(handled.log) == 6
        await bounded(ref.close())
        assert groups(redis_server, JOBS) == [0, 1, 2, 3]
        assert await bounded(engine.forget(JOBS)) == 4
        assert groups(redis_server, JOBS) == []
        assert redis(redis_server, "EXISTS", f"{NS}:members:{JOBS}") == 0
        with pytest.raises(KeyError, match="jobs"):
            await engine.forget(JOBS)
        # What retention kept (the group had passed it all) comes again, from the start.
        kept = streamed_ids(redis_server, 4)
        del handled.log[:]
        engine.subscribe(Job, handler=handled.handler("a"), name=JOBS)
        await bounded(engine.idle())
    assert handled.ids() == kept


async def test_forget_refuses_a_cluster_scope_subscription_a_live_node_runs(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Node b runs ``jobs`` in cluster scope: ``forget`` on node a (which does not) is
    refused naming b, and nothing is dropped: its groups and a's positions stay."""
    handled = Handled()
    # A node is live while its last beat is younger than a lease TTL: 5 s, so that b
    # stays live on a loaded machine (with 0.6 s, a late beat made it dead, rightly).
    async with (
        node_engine(tmp_path, redis_server, "a", lease_ttl=5.0) as a,
        node_engine(tmp_path, redis_server, "b", lease_ttl=5.0) as b,
    ):
        await handled_then_closed(a, handled, 2)  # a's node-scope positions of jobs
        b.subscribe(Job, handler=handled.handler("b"), name=JOBS)
        await until(lambda: owned(b) == [0, 1, 2, 3], "b holds every partition")
        with pytest.raises(ValueError, match=r"'jobs' still runs in cluster scope on node\(s\) b:"):
            await a.forget(JOBS)
        assert groups(redis_server, JOBS) == [0, 1, 2, 3]
        fields = redis(redis_server, "HKEYS", f"{NS}:positions")
        assert len([f for f in fields if f.startswith(b"a|jobs|")]) == 4


async def test_forget_while_redis_is_away(tmp_path: Path, redis_server: RedisServer) -> None:
    """Redis away: the positions in this node's database are dropped all the same (the
    groups, if any, stay); with none here, the error says Redis did not answer rather
    than that nothing is tracked."""
    handled = Handled()
    async with node_engine(tmp_path, redis_server, "a") as engine:
        await handled_then_closed(engine, handled, 2)
        await anyio.to_thread.run_sync(redis_server.stop)
        await until(lambda: not cluster_metrics(engine).connected, "a sees Redis gone")
        assert await bounded(engine.forget(JOBS)) == 4
        with pytest.raises(EngineError, match=r"'jobs'.*does not answer"):
            await engine.forget(JOBS)
