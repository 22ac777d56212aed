"""The Engine's durable API: ``project``, ``transact``, ``prune`` and ``forget``.

A part of the facade: ``Engine`` inherits it, as it inherits ``Spawner``. Each
method checks its arguments and hands the work to the outbox, which holds the rules.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any, TypeVar

from ._bus import EventBus
from ._cluster import ClusterLink
from ._durable import Outbox, age_seconds
from ._errors import EngineError
from ._events import Event
from ._routing import SubscriptionRef
from ._runtime import Runtime
from ._store import Transaction, check_transact_function
from ._tracing import Tracing

__all__ = ["DurableAPI"]

_T = TypeVar("_T")


class DurableAPI:
    """What an engine with a database offers beyond publishing (``Engine("app.db")``)."""

    _bus: EventBus
    _link: ClusterLink | None
    _outbox: Outbox | None
    _runtime: Runtime
    _tracing: Tracing

    def project(
        self,
        *event_types: type[Event],
        projector: Callable[[Transaction, Any], None],
        name: str,
        max_attempts: int = 3,
        capacity: int = 1000,
    ) -> SubscriptionRef:
        """A durable projection: ``projector(tx, event)`` runs in the database thread.

        It runs inside the transaction that also moves the projection's
        position, so its writes to the same database happen exactly once, even
        across crashes. A failing projector is retried in place (a savepoint
        per attempt) up to ``max_attempts``, then the event is dead-lettered in
        that same transaction. Needs a database.
        """
        self._database("project")
        return self._bus.project(
            event_types, projector, name=name, max_attempts=max_attempts, capacity=capacity
        )

    def _database(self, what: str) -> Outbox:
        """The outbox; ``EngineError`` for ``what`` without a database."""
        outbox = self._outbox
        if outbox is None:
            raise EngineError(f"{what} needs a database: use Engine('app.db')")
        return outbox

    def _require_outbox(self, what: str) -> Outbox:
        outbox = self._database(what)
        self._runtime.check_publishing()
        return outbox

    async def transact(self, fn: Callable[[Transaction], _T]) -> _T:
        """Run ``fn(tx)`` in the database thread inside one transaction; return its result.

        ``tx.db`` is a ``sqlite_utils.Database`` on that transaction and
        ``tx.publish(event)`` appends a validated event to the outbox in it.
        If ``fn`` raises, its writes and its events roll back together and the
        error is raised here. Concurrent calls share one commit (group commit)
        with a savepoint each; this returns once the commit holding the work
        is durable. Needs a database (``EngineError`` otherwise).
        """
        check_transact_function(fn)
        outbox = self._require_outbox("transact")
        tracing = self._tracing
        if tracing.on:
            with tracing.publishing("transact", {}) as trace:
                traced: _T = await outbox.transact(fn, trace)
            return traced
        result: _T = await outbox.transact(fn)
        return result

    async def prune(self, *, older_than: float | dt.timedelta) -> int:
        """Delete outbox events older than ``older_than`` that every subscription passed.

        ``older_than`` is seconds or a ``timedelta``. Positions are as last
        checkpointed, so an event is never pruned before every durable
        subscription (and projection) finished it. Sequence numbers are never
        reused. Returns how many events were deleted.
        """
        age_seconds(older_than)
        return await self._require_outbox("prune").prune(older_than)

    async def forget(self, name: str) -> int:
        """Drop the stored positions of a retired durable subscription or projection, as
        ``python -m engine forget`` does; returns how many it had (``KeyError``: none;
        ``ValueError`` while one of that name is registered here: close it first). On a
        cluster node also its positions in the streams and, once no live node runs it in
        cluster scope, its consumer groups (``ValueError`` naming the nodes that do)."""
        self._bus.check_retired(name)
        outbox = self._require_outbox("forget")
        return await (outbox if self._link is None else self._link).forget(name)
