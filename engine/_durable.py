"""The outbox: durable delivery on SQLite.

After a commit the writer hands the new events to the relay actor (a wake-up
on commit; no polling on the hot path), which has ``Outbox.relay`` dispatch
them in sequence order, one backpressure slot each, through the dispatcher to
the *live* durable subscriptions (``Outbox.route``). A subscription that
registers behind the head — at start-up, after a crash, or a new one — first
catches up by reading the outbox by position, then goes live.

A subscription's position per partition moves only past events its handler
finished or dead-lettered (once the dead letter is stored); positions are
checkpointed by the writer a little later (at-least-once). A projection's
position moves in the transaction that applies the event (exactly-once).
Every rule of durable delivery lives here: what has been dispatched, what is
being routed, positions, catch-up, checkpoints, projections, pruning.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import math
import sqlite3
import time
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import msgspec

from ._actor import Actor, Cell, current_cell
from ._backpressure import BackpressureError, BackpressureState
from ._bus import RELAY, EventBus
from ._deadletters import DeadLetter, DeadLetters, describe, read_rows
from ._errors import EngineError
from ._events import Event
from ._routing import Delivery, Subscription
from ._runtime import Runtime
from ._store import (
    Committed,
    Durability,
    OutboxRow,
    Request,
    StorageError,
    StorageMetrics,
    Store,
    Transaction,
    forget_positions,
    last_seq,
    prune_outbox,
    read_outbox,
    storage_fault_in,
)
from ._tracing import Tracing, event_attributes

__all__ = [
    "RELAY",
    "Outbox",
    "PartitionTrack",
    "RelayState",
    "Tracker",
    "Wake",
    "age_seconds",
]

logger = logging.getLogger("actorbus.relay")

READ_BATCH = 256
TAIL_LIMIT = 4096
# Deliveries a projection may have waiting for the writer: they commit together.
PROJECTION_WINDOW = 256
# How often positions are checkpointed, and the outbox is polled as a safety net.
# 0.13 s, not 0.1 s: anyio's wait_all_tasks_blocked on asyncio polls every 0.1 s
# and, in step with a 0.1 s timer, would find this task runnable every time.
CHECKPOINT_INTERVAL = 0.13
POLL_INTERVAL = 1.0

_UPSERT_POSITION = (
    "INSERT INTO tracking (subscriber, partition, position, partitions, kind, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber, partition) DO UPDATE SET "
    "position = max(position, excluded.position), partitions = excluded.partitions, "
    "kind = excluded.kind, updated_at = excluded.updated_at"
)


class Wake(msgspec.Struct, frozen=True, tag="relay.wake"):
    """To the relay: events were committed (or found by the poll)."""


_WAKE = Wake()


# ---------------------------------------------------------------- positions


class PartitionTrack:
    """Outstanding events of one partition; its position is just before the oldest."""

    __slots__ = ("finished", "outstanding", "start", "tracker")

    def __init__(self, tracker: Tracker, start: int) -> None:
        self.tracker = tracker
        # Events up to here were finished in an earlier run: skipped while catching up.
        self.start = start
        self.outstanding: collections.deque[int] = collections.deque()
        self.finished: set[int] = set()

    def sent(self, seq: int) -> None:
        self.outstanding.append(seq)

    def finish(self, seq: int) -> None:
        outstanding = self.outstanding
        if outstanding and outstanding[0] == seq:
            outstanding.popleft()
            finished = self.finished
            while outstanding and outstanding[0] in finished:
                finished.discard(outstanding.popleft())
        elif seq in outstanding:  # finished out of order (a dropped message)
            self.finished.add(seq)

    def position(self) -> int:
        if self.outstanding:
            return self.outstanding[0] - 1
        return max(self.start, self.tracker.passed())


class Tracker:
    """A durable subscription's cursor and per-partition positions."""

    def __init__(self, outbox: Outbox, subscription: Subscription) -> None:
        self.outbox = outbox
        self.subscription = subscription
        # The last outbox seq this subscription has been handed or has skipped.
        self.cursor = 0
        # Set together by catch-up: one position each, as last checkpointed.
        self.partitions: list[PartitionTrack] = []
        self.saved: list[int] = []
        # Closing: the catch-up stops (``Outbox.halt``); set when it ended.
        self.halted = False
        self.caught_up: anyio.Event | None = None

    def passed(self) -> int:
        if self.subscription.live:
            return max(self.cursor, self.outbox.dispatched)
        return self.cursor

    def positions(self) -> list[int]:
        return [p.position() for p in self.partitions]

    def dirty(self) -> list[tuple[int, int]]:
        """(partition, position) pairs that moved since the last checkpoint."""
        return [
            (i, position) for i, position in enumerate(self.positions()) if position > self.saved[i]
        ]


def load_positions(conn: sqlite3.Connection, name: str) -> list[tuple[int, int, int, str]]:
    return conn.execute(
        "SELECT partition, position, partitions, kind FROM tracking WHERE subscriber = ? "
        "ORDER BY partition",
        (name,),
    ).fetchall()


# ------------------------------------------------------------------ the relay


class RelayState:
    """What the relay knows: the committed head, its cursor and a tail of recent events."""

    def __init__(self, head: int) -> None:
        self.head = head
        self.cursor = head
        self.tail: collections.deque[Committed] = collections.deque()
        # The tail holds every committed event after this seq.
        self.tail_from = head

    def committed(self, events: list[Committed]) -> None:
        first = events[0][0]
        tail = self.tail
        last = tail[-1][0] if tail else self.tail_from
        if first != last + 1:
            # A gap (another writer, or seqs consumed by rolled-back work):
            # the relay reads what it does not hold from the outbox.
            tail.clear()
            self.tail_from = first - 1
        tail.extend(events)
        while len(tail) > TAIL_LIMIT:
            self.tail_from = tail.popleft()[0]
        if events[-1][0] > self.head:
            self.head = events[-1][0]

    def take(self) -> list[Committed] | None:
        """The events after the cursor held in memory; None if they must be read."""
        if self.cursor < self.tail_from:
            return None
        tail = self.tail
        while tail and tail[0][0] <= self.cursor:
            tail.popleft()
            self.tail_from = self.cursor
        if not tail and self.head > self.cursor:
            return None  # committed elsewhere (another process): read it
        return list(tail)


# ---------------------------------------------------------------- projections


def run_projector(
    tx: Transaction, projector: Callable[[Any, Any], Any], event: Event, attempts: int
) -> Exception | None:
    """Run ``projector`` under a savepoint, up to ``attempts`` times; the last error or None."""
    error: Exception | None = None
    for _ in range(attempts):
        try:
            with tx.savepoint():  # what it wrote and published rolls back with it
                projector(tx, event)
        except Exception as exc:
            if storage_fault_in(exc) is not None:
                raise  # the database's fault, not the projector's: the writer retries
            if not tx.conn.in_transaction:
                raise  # it destroyed the transaction: failed beyond its savepoint
            error = exc
            continue
        return None
    return error


def project_event(
    tracing: Tracing,
    name: str,
    tx: Transaction,
    projector: Callable[[Any, Any], Any],
    event: Event,
    attempts: int,
    seq: int | None,
    trace: str | None,
) -> Exception | None:
    """``run_projector`` for projection ``name``, in a ``project {name}`` span (child of
    the event's ``trace``) when the engine traces."""
    if not tracing.on:
        return run_projector(tx, projector, event, attempts)
    with tracing.span(f"project {name}", event_attributes(event, seq), trace) as span:
        error = run_projector(tx, projector, event, attempts)
        if error is None:
            span.set_attribute("actorbus.outcome", "applied")
        else:
            span.set_attribute("actorbus.outcome", "dead-lettered")
            span.record_exception(error)
            span.add_event("actorbus.dead_letter", {"actorbus.reason": "failed"})
        return error


def _poll(conn: Any) -> tuple[int, list[int]]:
    head = last_seq(conn)
    replays = [
        row[0]
        for row in conn.execute(
            "SELECT id FROM dead_letters WHERE replay_requested = 1 ORDER BY id LIMIT 100"
        )
    ]
    return head, replays


def _load_dead_letters(limit: int) -> Callable[[Any], tuple[list[DeadLetter], int, int]]:
    def load(conn: Any) -> tuple[list[DeadLetter], int, int]:
        count, newest = conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM dead_letters"
        ).fetchone()
        return read_rows(conn, limit=limit), count, newest

    return load


def age_seconds(older_than: float | dt.timedelta) -> float:
    """``older_than`` (seconds or a ``timedelta``) in seconds, checked."""
    if isinstance(older_than, dt.timedelta):
        seconds = older_than.total_seconds()
    elif isinstance(older_than, int | float) and not isinstance(older_than, bool):
        seconds = float(older_than)
    else:
        raise TypeError(
            f"older_than must be seconds or a datetime.timedelta, got {type(older_than).__name__}"
        )
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"older_than must be finite and >= 0, got {older_than!r}")
    return seconds


class Outbox:
    """The engine's database: the writer, the relay's state, positions and projections."""

    def __init__(
        self,
        runtime: Runtime,
        bus: EventBus,
        dead_letters: DeadLetters,
        path: str,
        *,
        durability: Durability,
        storage_timeout: float,
        start_timeout: float | None,
    ) -> None:
        self.runtime = runtime
        self.bus = bus
        self.dead_letters = dead_letters
        self.start_timeout = start_timeout
        self.store = Store(
            path,
            durability=durability,
            max_pending=bus.config.max_depth,
            on_commit=self._committed,
            on_busy=runtime.busy,
            on_idle=runtime.idle,
            timeout=storage_timeout,
        )
        self.state = RelayState(0)
        self.trackers: dict[str, Tracker] = {}
        # The highest outbox seq the dispatcher has routed to every live subscription.
        self.dispatched = 0
        # Outbox deliveries handed to the dispatcher and not yet routed.
        self.routing = 0
        self.relay_cell: Cell | None = None
        self._housekeeping: anyio.CancelScope | None = None
        self._store_done: anyio.Event | None = None

    # ------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the database (waiting out a lock), start the writer, load the dead letters."""
        store = self.store
        head = await store.open(timeout=self.start_timeout)
        self._store_done = done = anyio.Event()

        async def write() -> None:
            try:
                await store.run()
            finally:
                done.set()

        self.runtime.start_task(write, name="actorbus writer")
        loaded, count, newest = await store.read(
            _load_dead_letters(self.dead_letters.max_entries), background=False
        )
        self.dead_letters.attach(store, loaded, count, newest)
        self.state = RelayState(head)
        self.dispatched = head

    async def start_relay(self, relay: Callable[[], Actor]) -> None:
        """Start the relay actor and the housekeeping (after the dispatcher)."""
        self.relay_cell = await self.runtime.start_builtin(relay, name=RELAY, capacity=1)
        scope = anyio.CancelScope()
        self._housekeeping = scope
        self.runtime.start_task(self._housekeep, scope, name="actorbus housekeeping")

    async def close(self) -> None:
        """Checkpoint positions, commit what is pending (through an outage, within
        the shutdown timeout), close the database."""
        store = self.store
        if self._store_done is None:
            return  # never opened
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        request = self._checkpoint()
        if request is not None:
            store.submit(request, bounded=False)
        store.close(within=self.runtime.shutdown_timeout)
        await self._store_done.wait()
        self.dead_letters.detach()

    def metrics(self) -> StorageMetrics:
        return self.store.metrics()

    @property
    def head(self) -> int:
        """The last committed outbox seq."""
        return self.state.head

    async def forget(self, name: str) -> int:
        """Drop the stored positions of ``name``, a subscription this engine does not
        run; returns how many partition positions it had (``KeyError`` for none)."""
        forgotten: int = await self.store.call(lambda tx: forget_positions(tx.conn, name))
        if not forgotten:
            raise KeyError(f"no subscription or projection named {name!r} is tracked")
        return forgotten

    def lag(self) -> dict[str, int]:
        head = self.state.head
        return {
            name: max(0, head - min(tracker.positions()))
            for name, tracker in self.trackers.items()
            if tracker.partitions
        }

    # ------------------------------------------------------------ writing

    async def transact(self, fn: Callable[[Transaction], Any], trace: str | None = None) -> Any:
        return await self.store.call(fn, trace=trace)

    async def publish(
        self,
        event: Event,
        timeout: float | None,  # noqa: ASYNC109
        trace: str | None = None,
    ) -> None:
        """Commit ``event`` (already validated); the relay takes its slot when it
        dispatches. Publishers still wait while CRITICAL."""
        await self.bus.controller.admit(timeout)
        await self.store.call(lambda tx: tx.publish(event), kind="events", trace=trace)

    def try_publish(self, event: Event, trace: str | None = None) -> None:
        """Hand ``event`` to the writer without waiting."""
        bus = self.bus
        if bus.controller.state is BackpressureState.CRITICAL:
            bus.refuse_critical()
        request = Request(lambda tx: tx.publish(event), kind="events", trace=trace)
        if not self.store.submit(request):
            bus.controller.reject()
            raise BackpressureError(
                f"the outbox writer has {self.store.max_pending} writes waiting for a commit"
            )

    async def prune(self, older_than: float | dt.timedelta) -> int:
        seconds = age_seconds(older_than)
        cutoff = time.time() - seconds
        deleted: int = await self.store.call(lambda tx: prune_outbox(tx.conn, cutoff))
        return deleted

    def _committed(self, events: list[Committed]) -> None:
        self.state.committed(events)
        self.wake_relay()

    def wake_relay(self) -> None:
        relay = self.relay_cell
        if relay is not None and not relay.closed and not relay.queue:
            # The engine's own tasks count as inside: during the drain the
            # relay still takes wake-ups, as actors still take each other's tells.
            token = current_cell.set(relay)
            try:
                relay.offer(_WAKE)
            finally:
                current_cell.reset(token)

    # ------------------------------------------------------------- relaying

    async def relay(self) -> None:
        """Dispatch committed events after the relay's cursor, in order (the relay actor)."""
        state = self.state
        store = self.store
        runtime = self.runtime
        while state.cursor < state.head and not runtime.stopping:
            events = state.take()
            if events is None:
                try:
                    rows: list[OutboxRow] = await store.read(
                        lambda conn: read_outbox(conn, state.cursor, READ_BATCH)
                    )
                except EngineError:
                    if runtime.stopping:
                        return  # stopped during a storage outage: the next run resumes
                    raise
                if not rows:
                    return
                for row in rows:
                    if row.event is None:
                        await self._undecodable(RELAY, row)
                    # Even an undecodable row goes through the dispatcher (as a
                    # marker), so the live subscriptions' positions pass it in order.
                    await self._dispatch(row.seq, row.event, row.trace)
                continue
            if not events:
                return
            for seq, event, trace in events:
                if runtime.stopping:
                    return
                await self._dispatch(seq, event, trace)

    async def _dispatch(self, seq: int, event: Event | None, trace: str | None) -> None:
        state = self.state
        if seq <= state.cursor:
            return
        bus = self.bus
        if event is not None and not self.routing and not bus.router.route(type(event)):
            # No live subscription takes it and nothing before it waits to be
            # routed: the live positions pass it at once, without a slot.
            self._passed(seq)
            state.cursor = seq
            return
        controller = bus.controller
        if not controller.try_acquire():
            await controller.acquire(None)
        self.routing += 1
        try:
            bus.dispatch(Delivery(event, bus.routes, seq=seq, trace=trace))  # type: ignore[arg-type]
        except BaseException:
            self.routing -= 1
            raise
        state.cursor = seq

    def _passed(self, seq: int) -> None:
        if seq > self.dispatched:
            self.dispatched = seq

    async def route(self, delivery: Delivery) -> None:
        """Route an outbox event (the dispatcher): only to live subscriptions that have
        not had it yet — one that just caught up may have handled an event still queued."""
        try:
            event = delivery.event
            seq = delivery.seq
            assert seq is not None
            if event is None:  # an outbox row the relay dead-lettered: only the position moves
                delivery.done()
                self._passed(seq)
                return
            trackers = self.trackers
            subscriptions = tuple(
                s
                for s in self.bus.router.route(type(event))
                if s.name not in trackers or seq > trackers[s.name].cursor
            )
            if not subscriptions:
                delivery.done()
            else:
                delivery.remaining = len(subscriptions)
                for index, subscription in enumerate(subscriptions):
                    tracker = trackers.get(subscription.name)
                    if tracker is not None:
                        tracker.cursor = seq
                    delivery.undelivered = subscriptions[index:]
                    await subscription.deliver(delivery)
            self._passed(seq)
        finally:
            self.routing -= 1

    async def _undecodable(self, name: str, row: OutboxRow) -> None:
        """Dead-letter an outbox row that does not decode, for ``name``, with the decode error.

        Returns once the dead letter is stored: only then may positions pass the row.
        """
        stored = anyio.Event()
        self.dead_letters.add(
            name,
            row.payload,
            "failed",
            error=row.error,
            seq=row.seq,
            event_type=row.type,
            then=stored.set,
        )
        await stored.wait()

    # ------------------------------------------------------------ subscriptions

    def track(self, subscription: Subscription) -> None:
        """Follow ``subscription``'s positions; it goes live after its catch-up."""
        self.trackers[subscription.name] = Tracker(self, subscription)
        subscription.live = False

    def start(self, subscription: Subscription) -> None:
        tracker = self.trackers[subscription.name]
        tracker.caught_up = anyio.Event()
        self.runtime.busy()  # counted now: the drain waits for a catch-up not yet begun
        self.runtime.start_task(self._catch_up, tracker, name=f"catch-up {subscription.name}")

    async def _catch_up(self, tracker: Tracker) -> None:
        runtime = self.runtime
        current_cell.set(self.bus.dispatcher)  # inside the engine: delivers during the drain
        try:
            if not runtime.stopping:
                await self._resume(tracker)
        except (EngineError, sqlite3.Error):
            if not runtime.stopping:
                raise
            # Stopped while catching up: the next run resumes from the positions.
        finally:
            runtime.idle()
            assert tracker.caught_up is not None
            tracker.caught_up.set()

    async def halt(self, subscription: Subscription) -> None:
        """``subscription`` is closing: its catch-up (if it still runs) stops."""
        tracker = self.trackers.get(subscription.name)
        if tracker is not None and tracker.caught_up is not None:
            tracker.halted = True
            await tracker.caught_up.wait()

    async def retire(self, subscription: Subscription) -> None:
        """``subscription`` closed and its actors stopped: the positions it reached are
        stored (after whatever its projector wrote: the writer keeps the order), and it
        is no longer followed."""
        tracker = self.trackers.get(subscription.name)
        if tracker is None:
            return
        if tracker.partitions:
            request = self._checkpoint((tracker,))
            if request is not None:
                self.store.submit(request, bounded=False)
            await self.store.call(lambda tx: None, kind="positions", background=True)
        del self.trackers[subscription.name]

    async def _resume(self, tracker: Tracker) -> None:
        """Resume ``tracker``'s subscription after its stored position, then make it live."""
        store = self.store
        subscription = tracker.subscription
        name = subscription.name
        count = subscription.partition_count
        rows = await store.read(lambda conn: load_positions(conn, name))
        starts = [0] * count
        if rows:
            if len(rows) == count and [r[0] for r in rows] == list(range(count)):
                starts = [r[1] for r in rows]
            else:
                # The partition count changed: every partition resumes from the
                # oldest position (at-least-once holds; some events come again).
                lowest = min(r[1] for r in rows)
                starts = [lowest] * count
                logger.info(
                    "subscription %r: %d partitions now, %d stored; resuming all from %d",
                    name,
                    count,
                    len(rows),
                    lowest,
                    extra={"subscriber": name},
                )
        tracker.partitions = [PartitionTrack(tracker, start) for start in starts]
        for cell, track in zip(subscription.cells, tracker.partitions, strict=True):
            cell.track = track
        tracker.cursor = min(starts)
        tracker.saved = list(starts)
        now = time.time()
        kind = subscription.kind

        def save(tx: Transaction) -> None:
            conn = tx.conn
            if rows and len(rows) != count:
                conn.execute("DELETE FROM tracking WHERE subscriber = ?", (name,))
            for i, start in enumerate(starts):
                conn.execute(
                    "INSERT INTO tracking (subscriber, partition, position, partitions, kind, "
                    "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber, partition) "
                    "DO UPDATE SET partitions = excluded.partitions, kind = excluded.kind",
                    (name, i, start, count, kind, now),
                )

        await store.call(save, kind="positions", background=True)
        while True:
            batch: list[OutboxRow] = await store.read(
                lambda conn: read_outbox(conn, tracker.cursor, READ_BATCH)
            )
            if not batch:
                if tracker.cursor >= self.state.cursor:
                    break
                continue
            for row in batch:
                if self.runtime.stopping or tracker.halted:
                    return
                await self._deliver_row(tracker, row)
                tracker.cursor = row.seq
        if tracker.halted:
            return
        subscription.live = True
        self.bus.router.changed()
        logger.debug(
            "subscription %r is live at %d", name, tracker.cursor, extra={"subscriber": name}
        )

    async def _deliver_row(self, tracker: Tracker, row: OutboxRow) -> None:
        subscription = tracker.subscription
        event = row.event
        if event is None:
            await self._undecodable(subscription.name, row)
            return
        if not subscription.matches(type(event)):
            return
        delivery = Delivery(event, self.bus.free_routes, seq=row.seq, trace=row.trace)
        delivery.routed = True  # handed straight to the partition, not via the dispatcher
        try:
            index = subscription.index(event)
        except Exception as exc:
            subscription.refuse(delivery, "failed", exc)
            return
        if row.seq <= tracker.partitions[index].start:
            return  # this partition finished it in an earlier run
        await subscription.deliver_to(subscription.cells[index], delivery)

    def _checkpoint(self, trackers: Iterable[Tracker] | None = None) -> Request | None:
        """A write request saving every durable subscription position that moved
        (of ``trackers``: by default every one)."""
        changes: list[tuple[Tracker, int, int]] = []
        for tracker in self.trackers.values() if trackers is None else trackers:
            if tracker.partitions:
                for partition, position in tracker.dirty():
                    changes.append((tracker, partition, position))
        if not changes:
            return None
        now = time.time()

        def save(tx: Transaction) -> None:
            tx.conn.executemany(
                _UPSERT_POSITION,
                [
                    (
                        t.subscription.name,
                        p,
                        pos,
                        t.subscription.partition_count,
                        t.subscription.kind,
                        now,
                    )
                    for t, p, pos in changes
                ],
            )

        def saved(request: Request) -> None:
            if request.error is not None:
                logger.error("checkpoint of positions failed: %s", describe(request.error))
                return
            for tracker, partition, position in changes:
                if position > tracker.saved[partition]:
                    tracker.saved[partition] = position

        return Request(save, saved, kind="positions")

    async def _housekeep(self, scope: anyio.CancelScope) -> None:
        """Checkpoint positions often; poll the outbox and replay requests now and then."""
        store = self.store
        state = self.state
        polled = anyio.current_time()
        with scope:
            previous: Request | None = None
            while True:
                await anyio.sleep(CHECKPOINT_INTERVAL)
                # One checkpoint at a time: a stalled writer must not pile them up.
                if previous is None or previous.taken:
                    previous = self._checkpoint()
                    if previous is not None and not self.runtime.stopping:
                        store.submit(previous, bounded=False)
                if anyio.current_time() - polled >= POLL_INTERVAL:
                    polled = anyio.current_time()
                    await store.checkpoint()
                    head, replays = await store.read(_poll)
                    if head > state.head:
                        state.head = head
                        self.wake_relay()
                    await self.dead_letters.refresh()
                    for letter_id in replays:
                        await self._replay_requested(letter_id)

    async def _replay_requested(self, letter_id: int) -> None:
        """A replay asked for from outside (``python -m engine dead-letters DB replay ID``)."""
        try:
            await self.dead_letters.replay(letter_id)
        except StorageError:
            return  # the database's fault, not the letter's: asked again at the next poll
        except Exception as exc:
            logger.warning(
                "replay of dead letter %d requested from outside failed: %s",
                letter_id,
                exc,
                extra={"dead_letter": letter_id},
            )
            await self.store.call(
                lambda tx: tx.conn.execute(
                    "UPDATE dead_letters SET replay_requested = 0 WHERE id = ?", (letter_id,)
                ),
                kind="dead letters",
                background=True,
            )
        else:
            logger.info("dead letter %d replayed on request", letter_id)

    # --------------------------------------------------------------- projections

    def project(
        self,
        subscription: Subscription,
        cell: Cell,
        delivery: Delivery,
        then: Callable[[], None],
    ) -> None:
        """Apply ``delivery`` to a projection in the writer, exactly once; ``then()``
        runs when its transaction ended (committed, or it failed for good)."""
        seq = delivery.seq
        if seq is None:  # pragma: no cover - replays go through the writer directly
            raise AssertionError("projection deliveries come from the outbox")
        projector = subscription.projector
        assert projector is not None
        name = subscription.name
        attempts = subscription.max_attempts
        event = delivery.event
        tracing = self.bus.tracing
        trace = delivery.trace

        def apply(tx: Transaction) -> Any:
            conn = tx.conn
            row = conn.execute(
                "SELECT position FROM tracking WHERE subscriber = ? AND partition = 0", (name,)
            ).fetchone()
            if row is not None and row[0] >= seq:
                return None  # applied before a crash: exactly once
            error = project_event(tracing, name, tx, projector, event, attempts, seq, trace)
            return self._projected(tx, subscription, event, seq, error)

        def done(request: Request) -> None:
            then()
            if request.error is not None:
                self._projection_failed(subscription, cell, delivery, request.error)
                return
            self._settle(cell, delivery, request.result)

        # What its projector publishes continues the event's trace.
        request = Request(apply, done, kind="projection", trace=delivery.trace)
        self.store.submit(request, bounded=False)

    def _projected(
        self,
        tx: Transaction,
        subscription: Subscription,
        event: Event,
        seq: int,
        error: BaseException | None,
    ) -> DeadLetter | None:
        """Move the projection past ``seq``, dead-lettering the event in the same
        transaction if ``error``; returns that dead letter."""
        name = subscription.name
        letter = None
        if error is not None:
            letter = self.dead_letters.insert_row(
                tx.conn, name, event, "failed", error, subscription.max_attempts, seq=seq
            )
        tx.conn.execute(_UPSERT_POSITION, (name, 0, seq, 1, "projection", time.time()))
        return letter

    def _settle(self, cell: Cell, delivery: Delivery, letter: DeadLetter | None) -> None:
        """After the commit: count the dead letter it wrote (if any) and finish the delivery."""
        if letter is not None:
            self.dead_letters.restored(letter)
        delivery.finish(cell)

    def _projection_failed(
        self,
        subscription: Subscription,
        cell: Cell,
        delivery: Delivery,
        error: BaseException,
    ) -> None:
        """The projector's statement destroyed the transaction: dead-letter it on its own."""
        seq = delivery.seq
        assert seq is not None
        name = subscription.name
        event = delivery.event
        logger.error(
            "projection %r failed on event %d beyond its transaction: %s",
            name,
            seq,
            describe(error),
            extra={"subscriber": name},
        )

        def record(tx: Transaction) -> Any:
            return self._projected(tx, subscription, event, seq, error)

        def recorded(request: Request) -> None:
            self._settle(cell, delivery, request.result)

        self.store.submit(Request(record, recorded, kind="projection"), bounded=False)

    async def replay_projection(
        self, subscription: Subscription, event: Event, letter: DeadLetter
    ) -> None:
        """Apply a dead-lettered event to its projection again, deleting the letter
        in the same transaction."""
        projector = subscription.projector
        assert projector is not None
        attempts = subscription.max_attempts
        name = subscription.name
        tracing = self.bus.tracing
        # Traced, the replay's span is a child of the caller's (whoever asked for it).
        trace = tracing.context() if tracing.on else None

        def replay(tx: Transaction) -> None:
            error = project_event(tracing, name, tx, projector, event, attempts, None, trace)
            if error is not None:
                raise error
            tx.conn.execute("DELETE FROM dead_letters WHERE id = ?", (letter.id,))

        await self.store.call(replay)
