"""What the cluster benchmarks rely on: the raw side writes what the forwarder writes,
events go to the partition they name, workers refuse what they do not know, and a
missing redis-server is named. Timings are never asserted."""

from __future__ import annotations

import functools
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import coredis
import pytest

from benchmarks import _common
from benchmarks._common import RedisServerMissing, redis_server_binary
from benchmarks.scenario_cluster import (
    PARTITIONS,
    Placed,
    WorkerFailed,
    placed_events,
    publish_all,
    raw_batches,
    raw_client,
    worker_processes,
    write_batches,
)
from engine import Engine
from engine._cluster import FORWARD_BATCH
from engine._routing import stable_hash
from engine.cluster import RedisStreams
from engine.events import decode, encode
from tests.redis_server import RedisServer
from tests.redis_server import redis_server_binary as require_redis_server

pytestmark = pytest.mark.anyio


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(require_redis_server()) as server:
        yield server


def test_each_event_goes_to_the_partition_it_names() -> None:
    events = placed_events(3 * PARTITIONS)

    assert [stable_hash(event.partition_key()) % PARTITIONS for event in events] == [
        event.partition for event in events
    ]
    assert {event.partition for event in events} == set(range(PARTITIONS))


def _forwarding_lag(engine: Engine) -> int:
    cluster = engine.metrics().cluster
    assert cluster is not None
    return cluster.forwarding_lag


async def _entries(client: Any, cluster: RedisStreams) -> dict[int, list[tuple[Any, ...]]]:
    """Per partition: each entry's field names, seq and payload, in stream order."""
    found: dict[int, list[tuple[Any, ...]]] = {}
    for partition in range(PARTITIONS):
        entries = await client.xrange(cluster.stream(partition))
        found[partition] = [
            (tuple(entry.field_values), entry.field_values[b"s"], entry.field_values[b"e"])
            for entry in entries
        ]
    return found


# The engine's beat calls coredis' zrangebyscore, which coredis 6.9 deprecates (for
# zrange(sortby=BYSCORE)); that is the engine's to change, not what this test checks.
@pytest.mark.filterwarnings("ignore:Use .*zrange.* with the sortby=BYSCORE:DeprecationWarning")
async def test_the_raw_side_writes_the_forwarders_entries(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Raw and ours put the same payloads, under the same fields, into the same
    partitions in the same order: only the producer id differs."""
    url = redis_server.url
    ours = RedisStreams(url, namespace="ours", partitions=PARTITIONS)
    raw = RedisStreams(url, namespace="raw", partitions=PARTITIONS)
    events = placed_events(2 * PARTITIONS + 3)
    async with Engine(tmp_path / "node.db", cluster=ours) as engine:
        await engine.transact(functools.partial(publish_all, events))
        with anyio.fail_after(10):
            # Polled, within a bound: the engine tells no one when its forwarder caught up.
            while _forwarding_lag(engine):  # noqa: ASYNC110
                await anyio.sleep(0.01)
    async with raw_client(url) as script:
        await write_batches(script, raw_batches(raw, events, 1, FORWARD_BATCH))
    client: Any = coredis.Redis.from_url(url)
    async with client:
        written = await _entries(client, ours)
        copied = await _entries(client, raw)

    assert copied == written
    assert sum(len(entries) for entries in written.values()) == len(events)
    assert written[0][0][0] == (b"p", b"s", b"e")


async def test_a_worker_refuses_what_it_does_not_know() -> None:
    async with worker_processes(1) as (worker,):
        with pytest.raises(
            WorkerFailed, match="refused 'nope': ValueError: unknown command 'nope'"
        ):
            await worker.ask("nope")
        with pytest.raises(WorkerFailed, match="no node: send 'start' first"):
            await worker.ask("state")
        # Still serving after a refusal.
        assert await worker.ask("raw_stop") == {}


def test_a_missing_redis_server_is_named_with_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(os, "access", lambda path, mode: False)

    with pytest.raises(RedisServerMissing, match=r"need redis-server, which is not") as error:
        redis_server_binary()
    assert "apt-get install redis-server" in str(error.value)


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0) as connection:
            connection.sendall(b"PING\r\n")
            return connection.recv(16) == b"+PONG\r\n"
    except OSError:
        return False


def test_the_benchmark_redis_server_answers_and_is_gone_after() -> None:
    require_redis_server()  # skipped without redis-server (failed under CI)
    with _common.redis_server() as url:
        port = int(url.removeprefix("redis://127.0.0.1:").removesuffix("/0"))
        assert _answers(port)
    assert not _answers(port)


def test_placed_is_an_event_the_workers_can_decode() -> None:
    event = Placed(n=7, partition=3)
    event.validate()

    assert decode(encode(event)) == event
