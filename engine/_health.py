"""The engine's health (``engine.health()``): ok, degraded or failing, with a reason per
finding, read off in-memory state only (no I/O, never waits).

What each finding means, and what the probes of ``engine.asgi.health_app`` answer:

========================================  ========  ======  =====
finding                                   status    livez   readyz
========================================  ========  ======  =====
engine not started, draining, stopping,   failing   503     503
stopped
the root supervisor gave up               failing   503     503
storage: the database refuses writes      failing   503     503
backpressure WARNING or CRITICAL          degraded  200     503
a breaker open or half-open               degraded  200     503
cluster: Redis unreachable                degraded  200     503
cluster: partitions nobody here leases    degraded  200     503
a supervisor stopped, waiting for its     degraded  200     503
parent to restart it
========================================  ========  ======  =====

As DESIGN has it: ``/livez`` answers 200 for ok and degraded, ``/readyz`` only for
ok. Failing means a restart may help: the engine is not running, or cannot commit to
its own (local) database. Degraded means it works with a finding, and is not ready
for new traffic until the finding clears. An orchestrator that should keep replicas in
service through a shared dependency's outage (a breaker's service, the cluster's
Redis) can probe ``/livez`` for readiness too.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from typing import Literal

import msgspec

from ._backpressure import BackpressureConfig, BackpressureState
from ._breaker import CircuitState
from ._metrics import EngineMetrics
from ._runtime import Phase, Runtime
from ._supervision import Supervisor
from .cluster import ClusterMetrics, RedisStreams

__all__ = ["Health", "HealthStatus", "check_health"]

HealthStatus = Literal["ok", "degraded", "failing"]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of the engine's health (``engine.health()``).

    ``status`` is ``"failing"`` when a finding means the engine cannot do its work
    (not running, its database unwritable, its root supervisor gave up),
    ``"degraded"`` when it works with a finding (backpressure WARNING or CRITICAL, an
    open or half-open breaker, Redis unreachable or partitions without a lease in a
    cluster, a supervisor waiting for its parent to restart it), else ``"ok"``.
    """

    status: HealthStatus
    reasons: tuple[str, ...] = ()
    """One short line per finding, naming the part: ``"breaker 'payments': open"``."""
    ready: bool
    """Takes new traffic (``/readyz``): ok, no finding."""

    @property
    def live(self) -> bool:
        """Not failing (``/livez``): ok and degraded are alive."""
        return self.status != "failing"


class _Level(enum.Enum):
    FAILING = "failing"
    """Neither alive nor ready."""
    DEGRADED = "degraded"
    """Alive, not ready."""


_Finding = tuple[_Level, str]

_NOT_RUNNING = {
    Phase.NEW: "engine: not started",
    Phase.DRAINING: "engine: draining (shutting down)",
    Phase.STOPPING: "engine: stopping",
    Phase.STOPPED: "engine: stopped",
}
_BREAKER_STATES = {CircuitState.OPEN: "open", CircuitState.HALF_OPEN: "half-open"}
# Reasons quote names and errors the user chose: each stays one short line.
_MAX_TEXT = 200


def _short(text: str) -> str:
    return text if len(text) <= _MAX_TEXT else text[: _MAX_TEXT - 3] + "..."


def check_health(
    runtime: Runtime,
    metrics: Callable[[], EngineMetrics],
    backpressure: BackpressureConfig,
    cluster: RedisStreams | None,
) -> Health:
    """The engine's ``Health`` from its runtime and ``metrics()`` (read only when it runs:
    before it starts and after it stopped, its parts have nothing to say)."""
    findings = list(_engine(runtime))
    if runtime.running:
        snapshot = metrics()
        findings.extend(_storage(snapshot))
        findings.extend(_backpressure(snapshot, backpressure))
        findings.extend(_breakers(snapshot))
        if snapshot.cluster is not None and cluster is not None:
            findings.extend(_cluster(snapshot.cluster, cluster.partitions))
        findings.extend(_supervisors(runtime))
    levels = {level for level, _ in findings}
    status: HealthStatus = "ok"
    if _Level.FAILING in levels:
        status = "failing"
    elif levels:
        status = "degraded"
    return Health(
        status=status,
        reasons=tuple(_short(reason) for _, reason in findings),
        ready=not levels,
    )


def _engine(runtime: Runtime) -> Iterator[_Finding]:
    phase = runtime.phase
    if phase is not Phase.RUNNING:
        yield _Level.FAILING, _NOT_RUNNING[phase]
    root = runtime.root
    # The root has no parent to wait for: awaiting one means it gave up, and the
    # engine is on its way down (the escalation leaves ``async with Engine()``).
    if root is not None and root.awaiting_command:
        yield _Level.FAILING, f"supervisor {root.name!r}: gave up; the engine stops"


def _storage(metrics: EngineMetrics) -> Iterator[_Finding]:
    storage = metrics.storage
    if storage is None or storage.available:
        return
    error = f" ({storage.last_error})" if storage.last_error else ""
    yield (
        _Level.FAILING,
        f"storage: database unavailable for {storage.outage_seconds:.1f} s{error}",
    )


def _backpressure(metrics: EngineMetrics, config: BackpressureConfig) -> Iterator[_Finding]:
    state = metrics.backpressure.state
    if state is BackpressureState.NORMAL:
        return
    depth = metrics.backpressure.depth
    yield (
        _Level.DEGRADED,
        f"backpressure: {state.name} ({depth:,} of {config.max_depth:,} in flight)",
    )


def _breakers(metrics: EngineMetrics) -> Iterator[_Finding]:
    for name, breaker in sorted(metrics.breakers.items()):
        state = _BREAKER_STATES.get(breaker.state)
        if state is not None:
            yield _Level.DEGRADED, f"breaker {name!r}: {state}"


def _cluster(metrics: ClusterMetrics, partitions: int) -> Iterator[_Finding]:
    if not metrics.connected:
        yield _Level.DEGRADED, "cluster: Redis unreachable"
        return
    # Only a node alone knows that a partition has no reader: with others live, a
    # partition it does not hold is theirs (or theirs to take).
    if metrics.live_nodes != [metrics.node]:
        return
    for name, owned in sorted(metrics.owned.items()):
        missing = sorted(set(range(partitions)) - set(owned))
        if missing:
            which = "partition" if len(missing) == 1 else "partitions"
            yield (
                _Level.DEGRADED,
                f"cluster: no lease on {which} {_ranges(missing)} of {name!r}",
            )


def _ranges(numbers: Iterable[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and spans[-1][1] == number - 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _supervisors(runtime: Runtime) -> Iterator[_Finding]:
    # A supervisor awaits its parent's command after it gave up, or while its parent
    # restarts a sibling with it: its actors are stopped until the parent restarts it.
    for target in list(runtime.names.values()):
        parent = target.parent if isinstance(target, Supervisor) else None
        if parent is not None and target.awaiting_command:
            yield (
                _Level.DEGRADED,
                f"supervisor {target.name!r}: its actors are stopped until {parent.name!r} "
                "restarts it",
            )
