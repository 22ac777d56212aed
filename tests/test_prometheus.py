"""Prometheus exposition of engine.metrics(), and the counters of refused input."""

from __future__ import annotations

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
from engine.prometheus import BREAKER_STATE, register
from engine.tenancy import TenantIdentifierValidator

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


async def test_a_scrape_without_a_database_has_no_storage_metrics() -> None:
    registry = CollectorRegistry()
    async with Engine() as engine:
        register(engine, registry)
        assert not any(key.startswith("actorbus_storage") for key in scrape(registry))
