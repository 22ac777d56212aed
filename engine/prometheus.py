"""Prometheus exposition of ``engine.metrics()`` (optional: ``pip install 'actorbus[prometheus]'``).

```python
from prometheus_client import start_http_server
from engine.prometheus import register

register(engine)          # on prometheus_client's default registry
start_http_server(9100)   # or mount prometheus_client.make_asgi_app()
```

Every scrape takes one ``engine.metrics()`` snapshot. Breaker state is a
gauge: 0 closed, 1 open, 2 half-open. Validation failures and rejected
tenant identifiers are process-wide counters (by event type and kind, by
reason), so a burst of them shows on a dashboard. With a cluster: whether
Redis answers, the live nodes, the forwarding lag, the partitions this node
owns per subscription and each partition's lag (every node reports the same
figure for a partition: aggregate it with ``max``, not ``sum``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
    from prometheus_client.registry import REGISTRY, Collector, CollectorRegistry
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "engine.prometheus needs prometheus_client: pip install 'actorbus[prometheus]'"
    ) from exc

from ._backpressure import BackpressureState
from ._breaker import CircuitState
from .cluster import ClusterMetrics

if TYPE_CHECKING:
    from ._engine import Engine

__all__ = ["BREAKER_STATE", "EngineCollector", "register"]

BREAKER_STATE = {CircuitState.CLOSED: 0, CircuitState.OPEN: 1, CircuitState.HALF_OPEN: 2}
"""The gauge value of each breaker state."""
_PRESSURE = {
    BackpressureState.NORMAL: 0,
    BackpressureState.WARNING: 1,
    BackpressureState.CRITICAL: 2,
}


class EngineCollector(Collector):
    """A prometheus_client collector reading one engine's ``metrics()`` per scrape."""

    def __init__(self, engine: Engine, *, namespace: str = "actorbus") -> None:
        self.engine = engine
        self.namespace = namespace

    def _name(self, name: str) -> str:
        return f"{self.namespace}_{name}"

    def collect(self) -> Iterator[Any]:
        m = self.engine.metrics()
        n = self._name

        depth = GaugeMetricFamily(n("mailbox_depth"), "Messages queued", labels=["actor"])
        peak = GaugeMetricFamily(n("mailbox_peak_depth"), "Peak queued", labels=["actor"])
        processed = CounterMetricFamily(n("messages_processed"), "Handled", labels=["actor"])
        failed = CounterMetricFamily(n("messages_failed"), "Failed attempts", labels=["actor"])
        restarts = CounterMetricFamily(n("actor_restarts"), "Restarts", labels=["actor"])
        for name, stats in m.actors.items():
            depth.add_metric([name], stats.depth)
            peak.add_metric([name], stats.peak_depth)
            processed.add_metric([name], stats.processed)
            failed.add_metric([name], stats.failed)
            restarts.add_metric([name], stats.restarts)
        yield from (depth, peak, processed, failed, restarts)

        yield GaugeMetricFamily(n("in_flight"), "Messages in flight", value=m.in_flight)
        yield GaugeMetricFamily(n("dead_letters"), "Dead letters stored", value=m.dead_letters)
        yield CounterMetricFamily(
            n("dead_letters_recorded"), "Dead letters recorded", value=m.dead_letters_total
        )

        bp = m.backpressure
        yield GaugeMetricFamily(n("backpressure_depth"), "Events in flight", value=bp.depth)
        yield GaugeMetricFamily(
            n("backpressure_state"),
            "0 normal, 1 warning, 2 critical",
            value=_PRESSURE[bp.state],
        )
        yield CounterMetricFamily(n("events_accepted"), "Events accepted", value=bp.accepted)
        yield CounterMetricFamily(n("events_rejected"), "Events refused", value=bp.rejected)

        storage = m.storage
        if storage is not None:
            yield GaugeMetricFamily(
                n("storage_available"),
                "1 while the database takes writes, 0 during an outage",
                value=int(storage.available),
            )
            yield CounterMetricFamily(
                n("storage_outages"), "Times the database became unwritable", value=storage.outages
            )
            yield CounterMetricFamily(
                n("storage_retries"),
                "Attempts retried after a storage fault",
                value=storage.retries,
            )
            yield GaugeMetricFamily(
                n("storage_pending_writes"),
                "Writes waiting for a commit",
                value=storage.pending_writes,
            )

        cluster = m.cluster
        if cluster is not None:
            yield from self._cluster(cluster)

        yield GaugeMetricFamily(n("outbox_head"), "Last committed outbox seq", value=m.outbox_head)
        lag = GaugeMetricFamily(n("subscription_lag"), "Outbox events behind", labels=["name"])
        for name, value in m.lag.items():
            lag.add_metric([name], value)
        yield lag

        state = GaugeMetricFamily(
            n("breaker_state"), "0 closed, 1 open, 2 half-open", labels=["breaker"]
        )
        calls = CounterMetricFamily(
            n("breaker_calls"), "Calls by outcome", labels=["breaker", "outcome"]
        )
        transitions = CounterMetricFamily(
            n("breaker_transitions"), "State changes", labels=["breaker"]
        )
        for name, b in m.breakers.items():
            state.add_metric([name], BREAKER_STATE[b.state])
            calls.add_metric([name, "success"], b.successes)
            calls.add_metric([name, "failure"], b.failures)
            calls.add_metric([name, "rejected"], b.rejected)
            transitions.add_metric([name], b.transitions)
        yield from (state, calls, transitions)

        invalid = CounterMetricFamily(
            n("validation_failures"), "Events refused", labels=["event_type", "kind"]
        )
        for event_type, kinds in m.validation_failures.items():
            for kind, count in kinds.items():
                invalid.add_metric([event_type, kind], count)
        yield invalid
        tenants = CounterMetricFamily(
            n("tenant_rejections"), "Tenant identifiers refused", labels=["reason"]
        )
        for reason, count in m.tenant_rejections.items():
            tenants.add_metric([reason], count)
        yield tenants

    def _cluster(self, cluster: ClusterMetrics) -> Iterator[Any]:
        n = self._name
        yield GaugeMetricFamily(
            n("cluster_connected"),
            "1 while Redis answers this node's cluster calls, 0 otherwise",
            value=int(cluster.connected),
        )
        yield GaugeMetricFamily(
            n("cluster_live_nodes"),
            "Nodes whose heartbeat has not expired, this one included",
            value=len(cluster.live_nodes),
        )
        yield GaugeMetricFamily(
            n("cluster_forwarding_lag"),
            "Events committed on this node and not yet in Redis",
            value=cluster.forwarding_lag,
        )
        owned = GaugeMetricFamily(
            n("cluster_owned_partitions"),
            "Partitions of a cluster-scope subscription this node holds a lease on",
            labels=["subscription"],
        )
        for name, held in cluster.owned.items():
            owned.add_metric([name], len(held))
        yield owned
        # Every node reports every partition's lag, the same figure: aggregate with max.
        lag = GaugeMetricFamily(
            n("cluster_partition_lag"),
            "Stream entries not yet given to a cluster-scope subscription",
            labels=["subscription", "partition"],
        )
        for name, per_partition in cluster.lag.items():
            for partition, entries in per_partition.items():
                lag.add_metric([name, str(partition)], entries)
        yield lag
        yield CounterMetricFamily(
            n("cluster_trimmed"), "Stream entries this node trimmed", value=cluster.trimmed
        )


def register(
    engine: Engine,
    registry: CollectorRegistry | None = None,
    *,
    namespace: str = "actorbus",
) -> EngineCollector:
    """Register a collector for ``engine`` (on the default registry unless one is given)."""
    collector = EngineCollector(engine, namespace=namespace)
    (REGISTRY if registry is None else registry).register(collector)
    return collector
