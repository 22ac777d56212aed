"""Process-wide counters of refused input, for dashboards (``engine.metrics()``, Prometheus).

Validation happens wherever an event or a tenant identifier is checked — in a
request handler, a worker thread, before any engine exists — so the counts
belong to the process, not to one engine. A burst of refusals (a probe, an
attack, a broken client) shows as a rising count per event type or reason.
"""

from __future__ import annotations

import collections
import threading

__all__ = ["count_tenant_rejection", "count_validation_failure", "snapshot"]

_lock = threading.Lock()
_validation: collections.Counter[tuple[str, str]] = collections.Counter()
_tenants: collections.Counter[str] = collections.Counter()


def count_validation_failure(event_type: str, kind: str) -> None:
    with _lock:
        _validation[(event_type, kind)] += 1


def count_tenant_rejection(kind: str) -> None:
    with _lock:
        _tenants[kind] += 1


def snapshot() -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """(event type -> kind -> count, tenant rejection kind -> count)."""
    with _lock:
        validation: dict[str, dict[str, int]] = {}
        for (event_type, kind), count in _validation.items():
            validation.setdefault(event_type, {})[kind] = count
        return validation, dict(_tenants)
