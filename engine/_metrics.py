"""The engine's snapshot record (``engine.metrics()``)."""

from __future__ import annotations

import msgspec

from ._backpressure import BackpressureMetrics
from ._breaker import BreakerMetrics, BreakerRegistry
from ._bus import EventBus
from ._cluster import ClusterLink
from ._counters import snapshot as refusals
from ._deadletters import DeadLetters
from ._durable import Outbox
from ._runtime import Runtime
from ._store import StorageMetrics
from ._types import ActorStatistics
from .cluster import ClusterMetrics

__all__ = ["EngineMetrics", "snapshot"]


class EngineMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the engine (``engine.metrics()``)."""

    actors: dict[str, ActorStatistics]
    """Every running actor's mailbox statistics, by name."""
    in_flight: int
    """Messages accepted by some mailbox and not yet handled or dead-lettered."""
    dead_letters: int
    """Dead letters stored now."""
    dead_letters_total: int
    """Dead letters recorded since the engine started (including evicted ones)."""
    backpressure: BackpressureMetrics
    """The in-flight event budget: depth, peak, state, accepted, rejected, transitions."""
    outbox_head: int = 0
    """The last committed outbox seq (0 without a database)."""
    lag: dict[str, int] = msgspec.field(default_factory=dict)
    """Per durable subscription or projection: outbox events after its position."""
    breakers: dict[str, BreakerMetrics] = msgspec.field(default_factory=dict)
    """Every circuit breaker's state and counters, by dependency name."""
    validation_failures: dict[str, dict[str, int]] = msgspec.field(default_factory=dict)
    """Events refused by validation in this process: event type -> kind -> count."""
    tenant_rejections: dict[str, int] = msgspec.field(default_factory=dict)
    """Tenant identifiers refused in this process, by reason."""
    storage: StorageMetrics | None = None
    """The database's health: outages, retries, writes waiting (None without a database)."""
    cluster: ClusterMetrics | None = None
    """This node in the cluster (None without one)."""
    system_events_dropped: int = 0
    """System events lagging subscribers lost (their oldest, when their mailbox was full)."""


def snapshot(
    runtime: Runtime,
    bus: EventBus,
    dead_letters: DeadLetters,
    breakers: BreakerRegistry,
    outbox: Outbox | None,
    link: ClusterLink | None,
) -> EngineMetrics:
    """One ``EngineMetrics`` read off the engine's parts."""
    validation, tenants = refusals()
    return EngineMetrics(
        actors=runtime.statistics(),
        in_flight=runtime.in_flight(),
        dead_letters=dead_letters.count(),
        dead_letters_total=dead_letters.total,
        backpressure=bus.metrics(),
        outbox_head=outbox.head if outbox is not None else 0,
        lag=outbox.lag() if outbox is not None else {},
        breakers=breakers.metrics(),
        validation_failures=validation,
        tenant_rejections=tenants,
        storage=outbox.metrics() if outbox is not None else None,
        cluster=link.metrics() if link is not None else None,
        system_events_dropped=bus.system_events_dropped,
    )
