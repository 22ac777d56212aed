"""Durable delivery: the outbox relay, subscription positions, catch-up and projections.

After a commit the writer hands the new events to the relay (wake-up on
commit; no polling on the hot path), which dispatches them in sequence order
through the dispatcher to the *live* durable subscriptions. A subscription
that registers behind the head — at start-up, after a crash, or a new one —
first catches up by reading the outbox by position, then goes live.

A subscription's position per partition moves only past events its handler
finished or dead-lettered; positions are checkpointed by the writer a little
later (at-least-once). A projection's position moves in the transaction that
applies the event (exactly-once).
"""

from __future__ import annotations

import collections
import logging
import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio

from engine._actor import Actor, Cell
from engine._deadletters import DeadLetter, describe
from engine._engine import RELAY
from engine._errors import EngineError
from engine._events import Event
from engine._store import OutboxRow, Request, Transaction, read_outbox, storage_fault_in

from ._dispatcher import Delivery, Subscription

if TYPE_CHECKING:
    from engine._engine import Engine

__all__ = [
    "PartitionTrack",
    "ProjectionSubscriber",
    "Relay",
    "RelayState",
    "Tracker",
    "catch_up",
    "checkpoint",
    "register",
    "run_projector",
]

logger = logging.getLogger("actorbus.relay")

READ_BATCH = 256
TAIL_LIMIT = 4096
# Deliveries a projection may have waiting for the writer: they commit together.
PROJECTION_WINDOW = 256

_UPSERT_POSITION = (
    "INSERT INTO tracking (subscriber, partition, position, partitions, kind, updated_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber, partition) DO UPDATE SET "
    "position = max(position, excluded.position), partitions = excluded.partitions, "
    "kind = excluded.kind, updated_at = excluded.updated_at"
)


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

    def __init__(self, engine: Engine, subscription: Subscription) -> None:
        self.engine = engine
        self.subscription = subscription
        # The last outbox seq this subscription has been handed or has skipped.
        self.cursor = 0
        # Set together by catch_up: one position each, as last checkpointed.
        self.partitions: list[PartitionTrack] = []
        self.saved: list[int] = []

    @property
    def kind(self) -> str:
        """How ``tracking`` records it: ``projection`` or ``subscription``."""
        return "projection" if self.subscription.projector is not None else "subscription"

    def passed(self) -> int:
        if self.subscription.live:
            return max(self.cursor, self.engine._dispatched)
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


def register(engine: Engine, subscription: Subscription) -> Tracker:
    """Give ``subscription`` a tracker; it goes live after ``catch_up``."""
    tracker = Tracker(engine, subscription)
    subscription.tracker = tracker
    subscription.live = False
    return tracker


async def catch_up(engine: Engine, tracker: Tracker) -> None:
    """Resume ``tracker``'s subscription after its stored position, then make it live."""
    store = engine._store
    assert store is not None
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

    def save(tx: Transaction) -> None:
        conn = tx.conn
        if rows and len(rows) != count:
            conn.execute("DELETE FROM tracking WHERE subscriber = ?", (name,))
        for i, start in enumerate(starts):
            conn.execute(
                "INSERT INTO tracking (subscriber, partition, position, partitions, kind, "
                "updated_at) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (subscriber, partition) "
                "DO UPDATE SET partitions = excluded.partitions, kind = excluded.kind",
                (name, i, start, count, tracker.kind, now),
            )

    await store.call(save, kind="positions", background=True)
    while True:
        batch: list[OutboxRow] = await store.read(
            lambda conn: read_outbox(conn, tracker.cursor, READ_BATCH)
        )
        if not batch:
            relay = engine._relay_state
            if relay is None or tracker.cursor >= relay.cursor:
                break
            continue
        for row in batch:
            if engine._terminating:
                return
            await _deliver_row(engine, tracker, row)
            tracker.cursor = row.seq
    subscription.live = True
    engine._router.changed()
    logger.debug("subscription %r is live at %d", name, tracker.cursor, extra={"subscriber": name})


async def _deliver_row(engine: Engine, tracker: Tracker, row: OutboxRow) -> None:
    subscription = tracker.subscription
    event = row.event
    if event is None:
        await _undecodable(engine, subscription.name, row)
        return
    if not subscription.matches(type(event)):
        return
    delivery = Delivery(event, engine._no_slot, seq=row.seq)
    delivery.routed = True  # handed straight to the partition, not via the dispatcher
    try:
        cell = subscription.pick(event)
    except Exception as exc:
        subscription.refuse(delivery, "failed", exc)
        return
    if row.seq <= cell.track.start:
        return  # this partition finished it in an earlier run
    await subscription.deliver_to(cell, delivery)


async def _undecodable(engine: Engine, name: str, row: OutboxRow) -> None:
    """Dead-letter an outbox row that does not decode, for ``name``, with the decode error.

    Returns once the dead letter is stored: only then may positions pass the row.
    """
    stored = anyio.Event()
    engine.dead_letters.add(
        name,
        row.payload,
        "failed",
        error=row.error,
        seq=row.seq,
        event_type=row.type,
        then=stored.set,
    )
    await stored.wait()


class RelayState:
    """What the relay knows: the committed head, its cursor and a tail of recent events."""

    def __init__(self, head: int) -> None:
        self.head = head
        self.cursor = head
        self.tail: collections.deque[tuple[int, Event]] = collections.deque()
        # The tail holds every committed event after this seq.
        self.tail_from = head

    def committed(self, events: list[tuple[int, Event]]) -> None:
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

    def take(self) -> list[tuple[int, Event]] | None:
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


class Relay(Actor):
    """Dispatches committed outbox events in order, one backpressure slot each."""

    def __init__(self, engine: Engine, state: RelayState) -> None:
        self.engine = engine
        self.state = state

    async def receive(self, message: object) -> None:
        engine = self.engine
        state = self.state
        store = engine._store
        assert store is not None
        controller = engine._controller
        while state.cursor < state.head and not engine._terminating:
            events = state.take()
            if events is None:
                try:
                    rows: list[OutboxRow] = await store.read(
                        lambda conn: read_outbox(conn, state.cursor, READ_BATCH)
                    )
                except EngineError:
                    if engine._terminating:
                        return  # stopped during a storage outage: the next run resumes
                    raise
                if not rows:
                    return
                for row in rows:
                    if row.event is None:
                        await _undecodable(engine, RELAY, row)
                    # Even an undecodable row goes through the dispatcher (as a
                    # marker), so the live subscriptions' positions pass it in order.
                    await self._dispatch(controller, row.seq, row.event)
                continue
            if not events:
                return
            for seq, event in events:
                if engine._terminating:
                    return
                await self._dispatch(controller, seq, event)

    async def _dispatch(self, controller: Any, seq: int, event: Event | None) -> None:
        state = self.state
        if seq <= state.cursor:
            return
        engine = self.engine
        if event is not None and not engine._routing and not engine._router.route(type(event)):
            # No live subscription takes it and nothing before it waits to be
            # routed: the live positions pass it at once, without a slot.
            if seq > engine._dispatched:
                engine._dispatched = seq
            state.cursor = seq
            return
        if not controller.try_acquire():
            await controller.acquire(None)
        engine._routing += 1
        try:
            engine._dispatch(Delivery(event, controller, seq=seq))  # type: ignore[arg-type]
        except BaseException:
            engine._routing -= 1
            raise
        state.cursor = seq


class ProjectionSubscriber(Actor):
    """Applies events to a projection in the writer's transactions, in order.

    Each event is a write request that checks the stored position, runs the
    projector (retried in place up to ``max_attempts``; then the event is
    dead-lettered in the same transaction) and moves the position: applied
    exactly once even across crashes. Up to PROJECTION_WINDOW events wait for
    the writer at a time, so a catch-up commits many per transaction.
    """

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.window = 0
        self.room: anyio.Event | None = None

    async def receive(self, message: Delivery) -> None:
        engine = self.subscription.engine
        store = engine._store
        assert store is not None
        cell = self._actorbus_cell
        assert cell is not None
        seq = message.seq
        if seq is None:  # pragma: no cover - replays go through the writer directly
            raise AssertionError("projection deliveries come from the outbox")
        apply = _projection_step(engine, self.subscription, seq, message.event)

        def done(request: Request) -> None:
            self.window -= 1
            if self.room is not None:
                self.room.set()
                self.room = None
            if request.error is not None:
                _projection_failed(engine, self.subscription, cell, message, request.error)
                return
            _settle(engine, cell, message, request.result)

        store.submit(Request(apply, done, kind="projection"), bounded=False)
        self.window += 1
        while self.window >= PROJECTION_WINDOW:
            if self.room is None:
                self.room = anyio.Event()
            await self.room.wait()


def _projection_step(
    engine: Engine, subscription: Subscription, seq: int, event: Event
) -> Callable[[Transaction], Any]:
    projector = subscription.projector
    assert projector is not None
    name = subscription.name
    attempts = subscription.max_attempts

    def apply(tx: Transaction) -> Any:
        conn = tx.conn
        row = conn.execute(
            "SELECT position FROM tracking WHERE subscriber = ? AND partition = 0", (name,)
        ).fetchone()
        if row is not None and row[0] >= seq:
            return None  # applied before a crash: exactly once
        error = run_projector(tx, projector, event, attempts)
        return _projected(tx, engine, subscription, event, seq, error)

    return apply


def _projected(
    tx: Transaction,
    engine: Engine,
    subscription: Subscription,
    event: Event,
    seq: int,
    error: BaseException | None,
) -> DeadLetter | None:
    """Move the projection past ``seq``, dead-lettering the event in the same transaction
    if ``error``; returns that dead letter."""
    name = subscription.name
    letter = None
    if error is not None:
        letter = engine.dead_letters.insert_row(
            tx.conn, name, event, "failed", error, subscription.max_attempts, seq=seq
        )
    tx.conn.execute(_UPSERT_POSITION, (name, 0, seq, 1, "projection", time.time()))
    return letter


def _settle(engine: Engine, cell: Cell, delivery: Delivery, letter: DeadLetter | None) -> None:
    """After the commit: count the dead letter it wrote (if any) and finish the delivery."""
    if letter is not None:
        engine.dead_letters.restored(letter)
    delivery.finish(cell)


def run_projector(
    tx: Transaction, projector: Callable[[Any, Any], Any], event: Event, attempts: int
) -> Exception | None:
    """Run ``projector`` under a savepoint, up to ``attempts`` times; the last error or None."""
    conn = tx.conn
    error: Exception | None = None
    published = len(tx._events)
    for _ in range(attempts):
        conn.execute("SAVEPOINT actorbus_projection")
        try:
            projector(tx, event)
        except Exception as exc:
            if storage_fault_in(exc) is not None:
                raise  # the database's fault, not the projector's: the writer retries
            error = exc
            del tx._events[published:]  # what it published rolls back with it
            if conn.in_transaction:
                conn.execute("ROLLBACK TO actorbus_projection")
                conn.execute("RELEASE actorbus_projection")
            else:
                raise
            continue
        conn.execute("RELEASE actorbus_projection")
        return None
    return error


def _projection_failed(
    engine: Engine,
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
        return _projected(tx, engine, subscription, event, seq, error)

    def recorded(request: Request) -> None:
        _settle(engine, cell, delivery, request.result)

    store = engine._store
    assert store is not None
    store.submit(Request(record, recorded, kind="projection"), bounded=False)


def checkpoint(engine: Engine) -> Request | None:
    """A write request saving every durable subscription position that moved."""
    changes: list[tuple[Tracker, int, int]] = []
    for subscription in engine._router.subscriptions.values():
        tracker = subscription.tracker
        if tracker is None or not tracker.partitions:
            continue
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
                    t.kind,
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
