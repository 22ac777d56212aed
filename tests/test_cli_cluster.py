"""``python -m engine cluster status``: what a cluster's Redis holds, read from Redis only.

A real ``redis-server`` per test (``tests/redis_server.py``), populated by a real
engine in cluster mode or, for what an engine never writes (hostile names, stale
nodes, wrong types), by raw commands.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path

import anyio
import msgspec
import pytest

from engine import Engine, Event
from engine._cli import ClusterStatus, main
from engine._routing import stable_hash
from engine.cluster import ClusterMetrics, RedisStreams
from tests.redis_server import RedisServer, redis_server_binary

ROOT = Path(__file__).resolve().parent.parent
PARTITIONS = 4
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x202E, 0x2028]}


class Billed(Event, tag="t13.cli.billed"):
    order: str

    def partition_key(self) -> str:
        return self.order


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def failed(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert (code, out) == (1, "")
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    return err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage:" in err
    return err


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


def keys_in(partition: int, n: int) -> list[str]:
    """``n`` order ids whose events go to ``partition``."""
    found: list[str] = []
    i = 0
    while len(found) < n:
        key = f"o-{i}"
        if stable_hash(key) % PARTITIONS == partition:
            found.append(key)
        i += 1
    return found


def producer_id(path: Path) -> str:
    with closing(sqlite3.connect(path)) as conn:
        return str(conn.execute("SELECT value FROM cluster WHERE key = 'producer'").fetchone()[0])


async def poll(condition: Callable[[], bool], what: str, *, within: float = 10.0) -> None:
    """Wait until ``condition()`` holds: metrics move with the engine's beat, which
    signals nothing to wait on."""
    try:
        with anyio.fail_after(within):
            while not condition():  # noqa: ASYNC110 - nothing to wait on but the beat
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within {within} s: {what}")


def view(engine: Engine) -> ClusterMetrics:
    cluster = engine.metrics().cluster
    assert cluster is not None
    return cluster


# ------------------------------------------------------------------ a live cluster


@pytest.mark.anyio
async def test_status_shows_nodes_leases_lag_pending_streams_and_marks(
    redis_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = redis_server.url
    cluster = RedisStreams(url, namespace="shop", partitions=PARTITIONS, node="n1", lease_ttl=0.6)
    database = tmp_path / "n1.db"
    busy = 3
    orders = keys_in(busy, 3)
    gate = anyio.Event()
    started = anyio.Event()
    handled: list[str] = []

    async def bill(event: Billed) -> None:
        started.set()
        await gate.wait()
        handled.append(event.order)

    cli = partial(anyio.to_thread.run_sync, main)
    async with Engine(database, cluster=cluster) as engine:
        engine.subscribe(Billed, handler=bill, name="billing")
        await poll(
            lambda: view(engine).owned == {"billing": [0, 1, 2, 3]},
            "n1 holds every partition",
        )
        for order in orders:
            await engine.publish(Billed(order=order))
        with anyio.fail_after(10):
            await started.wait()  # the first entry is pending with the holder
        await poll(lambda: view(engine).forwarding_lag == 0, "forwarded")

        code = await cli(["cluster", "status", url, "--namespace", "shop"])
        out, err = capsys.readouterr()
        assert (code, err) == (0, "")
        code = await cli(["cluster", "status", url, "--namespace", "shop", "--json"])
        raw, err = capsys.readouterr()
        assert (code, err) == (0, "")
        gate.set()
        await poll(lambda: len(handled) == 3, "the three orders billed")

    lines = out.splitlines()
    assert lines[:5] == [
        f"redis       {url}",
        "namespace   shop",
        "partitions  4",
        "nodes       1 live of 1",
        "streams     3 entries",
    ]
    table = rows(out)
    node = next(row for row in table if row[:1] == ["n1"])
    assert node[1:3] == ["yes", "in"]
    assert 0 < float(node[3]) <= 0.9  # a beat is good for 1.5 lease TTLs
    assert ["PARTITION", "STREAM", "LENGTH"] in table
    for p in range(PARTITIONS):
        assert [str(p), f"shop:{p}", "3" if p == busy else "0"] in table
    leased = {int(row[1]): row for row in table if row[:1] == ["billing"]}
    assert sorted(leased) == [0, 1, 2, 3]
    assert {row[2] for row in leased.values()} == {"n1"}
    assert len({row[3] for row in leased.values()}) == 4  # a fencing token each
    assert all(0 < float(row[4]) <= 0.6 and row[5] == "s" for row in leased.values())
    lag, pending = int(leased[busy][6]), int(leased[busy][7])
    assert pending >= 1
    assert lag + pending == 3
    assert all(row[6:] == ["0", "0"] for p, row in leased.items() if p != busy)
    assert [producer_id(database), "3"] in table

    status = msgspec.json.decode(raw, type=ClusterStatus)
    assert set(json.loads(raw)) == {
        "url",
        "namespace",
        "partitions",
        "nodes",
        "streams",
        "subscriptions",
        "producers",
    }
    assert (status.url, status.namespace, status.partitions) == (url, "shop", PARTITIONS)
    assert [(n.node, n.live) for n in status.nodes] == [("n1", True)]
    assert [s.length for s in status.streams] == [3 if p == busy else 0 for p in range(4)]
    [subscription] = status.subscriptions
    assert subscription.name == "billing"
    assert [p.holder for p in subscription.partitions] == ["n1"] * 4
    entry = subscription.partitions[busy]
    assert entry.pending is not None
    assert entry.lag is not None
    assert entry.pending >= 1
    assert entry.lag + entry.pending == 3
    assert [(p.producer, p.forwarded) for p in status.producers] == [(producer_id(database), 3)]

    # The node left: its leases and its beat went with it.
    code = await cli(["cluster", "status", url, "--namespace", "shop"])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert "nodes       0 live of 0" in out
    assert "no nodes" in out
    leased = {int(row[1]): row for row in rows(out) if row[:1] == ["billing"]}
    assert all(row[2:6] == ["-", "-", "-", "0"] for row in leased.values())
    assert [row[6] for row in leased.values()] == ["0"] * 4  # every entry acknowledged


# ------------------------------------------------------------------ what engines leave


def populate(server: RedisServer, ns: str = "shop") -> None:
    """A namespace as engines leave it, written by hand: a node whose beat expired, a
    partition without its stream, a lease, a producer's mark."""
    server.command("SET", f"{ns}:partitions", "2")
    server.command("XADD", f"{ns}:0", "*", "p", "abc", "s", "1", "e", "{}")
    server.command("XGROUP", "CREATE", f"{ns}:0", "billing", "0")
    server.command("ZADD", f"{ns}:nodes", "1000", "gone")
    server.command("SET", f"{ns}:lease:billing:0", "gone/7", "PX", "60000")
    server.command("HSET", f"{ns}:marks", "abc", "1")


def test_a_dead_node_and_a_missing_stream(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    populate(redis_server)
    code, out, err = run(capsys, "cluster", "status", redis_server.url, "--namespace", "shop")
    assert (code, err) == (0, "")
    table = rows(out)
    assert "nodes       0 live of 1" in out.splitlines()
    gone = next(row for row in table if row[:1] == ["gone"])
    assert gone[1] == "no"
    assert gone[-1] == "ago"
    assert ["0", "shop:0", "1"] in table
    assert ["1", "shop:1", "0"] in table
    billing = [row for row in table if row[:1] == ["billing"]]
    assert billing[0][:5] == ["billing", "0", "gone", "7", billing[0][4]]
    assert billing[0][6:] == ["1", "0"]  # never read: lag 1, nothing pending
    assert billing[1] == ["billing", "1", "-", "-", "-", "-", "-"]  # no stream, no group
    assert ["abc", "1"] in table

    code, raw, _ = run(
        capsys, "cluster", "status", redis_server.url, "--namespace", "shop", "--json"
    )
    status = msgspec.json.decode(raw, type=ClusterStatus)
    [node] = status.nodes
    assert node.live is False
    assert node.expires_in < -1e6
    second = status.subscriptions[0].partitions[1]
    assert (second.holder, second.lag, second.pending) == (None, None, None)


def test_an_unknown_namespace_fails(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    err = failed(capsys, "cluster", "status", redis_server.url, "--namespace", "nope")
    assert err == (
        f"error: no cluster namespace 'nope' on {redis_server.url} "
        "(nope:partitions is not set: no engine has joined it)\n"
    )


def test_a_partition_count_that_is_not_one_fails(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    redis_server.command("SET", "shop:partitions", "lots")
    err = failed(capsys, "cluster", "status", redis_server.url, "--namespace", "shop")
    assert err == (
        f"error: shop:partitions on {redis_server.url} holds 'lots', "
        "not a partition count (1 to 1024)\n"
    )


def test_a_key_of_the_wrong_type_is_one_line(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    populate(redis_server)
    redis_server.command("DEL", "shop:nodes")
    redis_server.command("SET", "shop:nodes", "not a sorted set")
    err = failed(capsys, "cluster", "status", redis_server.url, "--namespace", "shop")
    assert err.startswith(f"error: Redis at {redis_server.url}: WrongTypeError: ")
    assert "shop:nodes" in err
    assert "wrong kind of value" in err


def test_an_unreachable_redis_is_one_line_without_the_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    err = failed(
        capsys, "cluster", "status", "redis://ops:s3cret@127.0.0.1:1/0", "--namespace", "shop"
    )
    assert err.startswith("error: Redis at redis://ops:***@127.0.0.1:1/0: ConnectionError: ")
    assert "s3cret" not in err


def test_a_redis_that_does_not_answer_is_given_up_on(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    populate(redis_server)
    redis_server.pause()
    try:
        err = failed(
            capsys,
            "cluster",
            "status",
            redis_server.url,
            "--namespace",
            "shop",
            "--timeout",
            "0.3",
        )
    finally:
        redis_server.resume()
    assert err == f"error: Redis at {redis_server.url} did not answer within 0.3 s\n"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["redis://127.0.0.1:1/0", "--namespace", "bad ns"],
            "namespace must be 1 to 100 letters, digits, '_', '.' or '-', got 'bad ns'",
        ),
        (
            ["http://ops:s3cret@127.0.0.1/", "--namespace", "shop"],
            "url must start with redis://, rediss:// or unix://, got 'http' in "
            "'http://ops:***@127.0.0.1/'",
        ),
        (
            ["redis://127.0.0.1:1/0", "--namespace", "shop", "--timeout", "0"],
            "a timeout is a number of seconds > 0, got '0'",
        ),
        (
            ["redis://127.0.0.1:1/0", "--namespace", "shop", "--timeout", "nan"],
            "a timeout is a number of seconds > 0, got 'nan'",
        ),
        (["redis://127.0.0.1:1/0"], "the following arguments are required: --namespace"),
    ],
)
def test_bad_arguments_are_usage_errors(
    capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    err = usage_error(capsys, "cluster", "status", *argv)
    assert message in err
    assert "s3cret" not in err


# ------------------------------------------------------------------ hostile text

HOSTILE_GROUP = "bill\x1b[31m\r\u202e"
HOSTILE_NODE = "n\x1b]0;title\x07\u2028"
HOSTILE_PRODUCER = "p\r\n\x9b"


def hostile(server: RedisServer) -> None:
    server.command("SET", "shop:partitions", "1")
    server.command("XGROUP", "CREATE", "shop:0", HOSTILE_GROUP, "0", "MKSTREAM")
    server.command("ZADD", "shop:nodes", "1000", HOSTILE_NODE)
    server.command("SET", f"shop:lease:{HOSTILE_GROUP}:0", "\x1b[2Jx", "PX", "60000")
    server.command("HSET", "shop:marks", HOSTILE_PRODUCER, "5")


def test_names_from_redis_are_escaped(
    redis_server: RedisServer, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile(redis_server)
    code, out, err = run(capsys, "cluster", "status", redis_server.url, "--namespace", "shop")
    assert (code, err) == (0, "")
    assert {c for c in out if c in UNSAFE and c != "\n"} == set()
    table = rows(out)
    assert any(row[:2] == ["n\\x1b]0;title\\x07\\u2028", "no"] for row in table)
    assert ["bill\\x1b[31m\\r\\u202e", "0", "\\x1b[2Jx", "-"] in [row[:4] for row in table]
    assert ["p\\r\\n\\x9b", "5"] in table

    code, raw, err = run(
        capsys, "cluster", "status", redis_server.url, "--namespace", "shop", "--json"
    )
    assert (code, err) == (0, "")
    assert raw.count("\n") == 1
    assert {c for c in raw if c in UNSAFE and c != "\n"} == set()
    data = json.loads(raw)
    assert data["nodes"][0]["node"] == HOSTILE_NODE
    assert data["subscriptions"][0]["name"] == HOSTILE_GROUP
    assert data["subscriptions"][0]["partitions"][0]["holder"] == "\x1b[2Jx"
    assert data["producers"] == [{"producer": HOSTILE_PRODUCER, "forwarded": 5}]


def test_a_real_process_prints_the_status_and_its_errors(redis_server: RedisServer) -> None:
    hostile(redis_server)

    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "engine", "cluster", "status", *args],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )

    shown = cli(redis_server.url, "--namespace", "shop")
    assert (shown.returncode, shown.stderr) == (0, b"")
    assert b"\x1b" not in shown.stdout
    assert b"\r" not in shown.stdout
    assert b"partitions  1\n" in shown.stdout

    missing = cli(redis_server.url, "--namespace", "other")
    assert missing.returncode == 1
    assert missing.stdout == b""
    assert missing.stderr.startswith(b"error: no cluster namespace 'other' on ")
