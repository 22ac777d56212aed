"""Prometheus exposition of engine.metrics(), and the counters of refused input."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from engine import (
    CircuitBreakerConfig,
    Engine,
    EngineMetrics,
    Event,
    EventValidationError,
    TenantValidationError,
)
from engine._routing import stable_hash
from engine.cluster import ClusterMetrics, RedisStreams
from engine.prometheus import BREAKER_STATE, register
from engine.tenancy import TenantIdentifierValidator
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio


class Scraped(Event, tag="t7.scraped"):
    n: int
    name: Annotated[str, msgspec.Meta(min_length=1)]


def scrape(registry: CollectorRegistry) -> dict[str, float]:
    """Sample lines as {'name{labels}': value}."""
    samples: dict[str, float] = {}
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            samples[key] = float(value)
    return samples


async def test_a_scrape_shows_actors_backpressure_breakers_and_refusals() -> None:
    registry = CollectorRegistry()
    received: list[Scraped] = []
    handled = anyio.Event()

    async def handle(event: Scraped) -> None:
        received.append(event)
        handled.set()

    async def boom() -> None:
        raise ValueError("down")

    async with Engine() as engine:
        register(engine, registry)
        engine.subscribe(Scraped, handler=handle, name="scraped")
        await engine.publish(Scraped(n=1, name="ok"))
        await handled.wait()  # the subscriber's count follows its handler
        with pytest.raises(EventValidationError):
            await engine.publish(Scraped(n="1", name="bad"))  # type: ignore[arg-type]
        with pytest.raises(TenantValidationError):
            TenantIdentifierValidator().validate_slug("admin")
        breaker = engine.breaker("payments", CircuitBreakerConfig(failure_threshold=1))
        with pytest.raises(ValueError, match="down"):
            await breaker.call(boom)
        # Scraped right after the call: the breaker's state is exact at once.
        samples = scrape(registry)
    assert [event.n for event in received] == [1]
    assert samples['actorbus_messages_processed_total{actor="scraped"}'] >= 1
    assert (
        samples['actorbus_breaker_state{breaker="payments"}'] == BREAKER_STATE[breaker.state] == 1
    )
    assert samples['actorbus_breaker_calls_total{breaker="payments",outcome="failure"}'] == 1
    assert samples['actorbus_breaker_transitions_total{breaker="payments"}'] == 1
    assert samples["actorbus_backpressure_state"] == 0
    assert (
        samples['actorbus_validation_failures_total{event_type="t7.scraped",kind="invalid_value"}']
        >= 1
    )
    assert samples['actorbus_tenant_rejections_total{reason="reserved"}'] >= 1


async def test_refusals_are_counted_per_event_type_and_reason() -> None:
    async with Engine() as engine:
        before = engine.metrics()
        for _ in range(3):
            with pytest.raises(EventValidationError):
                engine.try_publish(Scraped(n=1, name=""))
        for _ in range(2):
            with pytest.raises(TenantValidationError):
                TenantIdentifierValidator().validate_slug("x" * 200)
        after = engine.metrics()

    def count(m: EngineMetrics, kind: str) -> int:
        return m.validation_failures.get("t7.scraped", {}).get(kind, 0)

    assert count(after, "empty_field") - count(before, "empty_field") == 3
    assert after.tenant_rejections["too_long"] - before.tenant_rejections.get("too_long", 0) == 2


async def test_the_default_registry_is_used_without_one() -> None:
    from prometheus_client import REGISTRY

    async with Engine() as engine:
        collector = register(engine, namespace="actorbus_default_test")
        try:
            assert b"actorbus_default_test_in_flight" in generate_latest(REGISTRY)
        finally:
            REGISTRY.unregister(collector)


async def test_a_scrape_shows_the_databases_health(tmp_path: Any) -> None:
    registry = CollectorRegistry()
    async with Engine(str(tmp_path / "app.db")) as engine:
        register(engine, registry)
        await engine.transact(lambda tx: tx.publish(Scraped(n=1, name="x")))
        samples = scrape(registry)
    assert samples["actorbus_storage_available"] == 1
    assert samples["actorbus_storage_outages_total"] == 0
    assert samples["actorbus_storage_retries_total"] == 0
    assert samples["actorbus_storage_pending_writes"] == 0
    assert samples["actorbus_outbox_head"] == 1
    assert not any(key.startswith("actorbus_cluster") for key in samples)


async def test_a_scrape_without_a_database_has_no_storage_metrics() -> None:
    registry = CollectorRegistry()
    async with Engine() as engine:
        register(engine, registry)
        assert not any(key.startswith("actorbus_storage") for key in scrape(registry))


# ------------------------------------------------------------------ cluster

PARTITIONS = 4


class Order(Event, tag="t13.prometheus.order"):
    order: str

    def partition_key(self) -> str:
        return self.order


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


def view(engine: Engine) -> ClusterMetrics:
    cluster = engine.metrics().cluster
    assert cluster is not None
    return cluster


async def poll(condition: Callable[[], bool], what: str) -> None:
    """Wait until ``condition()`` holds: cluster metrics move with the node's beat
    (every lease_ttl / 3), which signals nothing to wait on."""
    try:
        with anyio.fail_after(10):
            while not condition():  # noqa: ASYNC110 - nothing to wait on but the beat
                await anyio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"not within 10 s: {what}")


def node(server: RedisServer, name: str) -> RedisStreams:
    return RedisStreams(
        server.url, namespace="shop", partitions=PARTITIONS, node=name, lease_ttl=0.6
    )


async def test_a_scrape_shows_the_cluster_owned_partitions_and_partition_lag(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    busy = 2
    # More than one read of the partition's reader (64 entries): the rest wait, as lag.
    orders = [key for key in (f"o-{i}" for i in range(2000)) if stable_hash(key) % 4 == busy]
    orders = orders[:70]
    gate = anyio.Event()
    started = anyio.Event()
    billed: list[str] = []

    async def bill(event: Order) -> None:
        started.set()
        await gate.wait()
        billed.append(event.order)

    async with Engine(tmp_path / "n1.db", cluster=node(redis_server, "n1")) as engine:
        register(engine, registry)
        engine.subscribe(Order, handler=bill, name="billing")
        assert "billing" in view(engine).lag  # listed from its registration on
        await poll(lambda: view(engine).owned == {"billing": [0, 1, 2, 3]}, "every partition")
        await engine.transact(lambda tx: [tx.publish(Order(order=order)) for order in orders])
        with anyio.fail_after(10):
            await started.wait()

        # The handler holds the partition's reader: the lag stays where it is.
        def observed() -> bool:
            cluster = view(engine)
            return cluster.forwarding_lag == 0 and cluster.lag["billing"].get(busy, 0) > 0

        await poll(observed, "the partition's lag observed")
        samples = scrape(registry)
        snapshot = view(engine)
        gate.set()
        await poll(lambda: len(billed) == len(orders), "every order billed")

    assert samples["actorbus_cluster_connected"] == 1
    assert samples["actorbus_cluster_live_nodes"] == 1
    assert samples["actorbus_cluster_forwarding_lag"] == 0
    assert samples['actorbus_cluster_owned_partitions{subscription="billing"}'] == 4
    lag = {
        p: samples[f'actorbus_cluster_partition_lag{{partition="{p}",subscription="billing"}}']
        for p in range(PARTITIONS)
    }
    assert lag == {p: snapshot.lag["billing"][p] for p in range(PARTITIONS)}
    assert 6 <= lag[busy] < 70
    assert [lag[p] for p in range(PARTITIONS) if p != busy] == [0, 0, 0]
    assert samples["actorbus_cluster_trimmed_total"] == snapshot.trimmed


async def test_a_scrape_shows_the_forwarding_lag_while_redis_is_away(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    async with Engine(tmp_path / "n1.db", cluster=node(redis_server, "n1")) as engine:
        register(engine, registry)
        await engine.transact(lambda tx: tx.publish(Order(order="o-1")))
        await poll(lambda: view(engine).forwarding_lag == 0, "the first event forwarded")
        assert scrape(registry)["actorbus_cluster_forwarding_lag"] == 0
        redis_server.stop()
        await engine.transact(lambda tx: [tx.publish(Order(order=f"o-{i}")) for i in range(5)])
        assert scrape(registry)["actorbus_cluster_forwarding_lag"] == 5  # committed, not sent
        await poll(lambda: not view(engine).connected, "the node sees Redis gone")
        samples = scrape(registry)
    assert samples["actorbus_cluster_connected"] == 0
    assert samples["actorbus_cluster_forwarding_lag"] == 5


async def test_a_node_without_cluster_subscriptions_counts_live_nodes_only(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    first = Engine(tmp_path / "n1.db", cluster=node(redis_server, "n1"))
    second = Engine(tmp_path / "n2.db", cluster=node(redis_server, "n2"))
    async with first, second:
        register(second, registry)
        await poll(lambda: view(second).live_nodes == ["n1", "n2"], "both nodes live")
        samples = scrape(registry)
    assert samples["actorbus_cluster_live_nodes"] == 2
    assert not any(
        key.startswith(("actorbus_cluster_owned", "actorbus_cluster_partition_lag"))
        for key in samples
    )
