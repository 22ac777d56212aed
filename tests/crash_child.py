"""The child process of ``tests/test_crash.py``: an engine on a real SQLite file.

    python tests/crash_child.py DB WORKDIR MODE SEED [BACKEND]
    python -m tests.crash_child DB WORKDIR MODE SEED [BACKEND]

MODE is a workload the parent kills with SIGKILL at a random moment after the
``ready`` line (``writes``, ``handlers``, ``projection``, ``mixed``: each leans
on one place a kill should land), ``final`` (a few writes, then wait until every
subscription caught up and leave the engine cleanly) or ``burst`` (rounds of 100
concurrent ``transact`` calls, no subscriptions). SEED seeds the child's random
choices and names its orders, so every run's orders are its own. BACKEND is
``asyncio`` (default) or ``trio``.

What the child did is recorded in WORKDIR, one line per fact, each line one
``os.write`` on a file opened with O_APPEND (it survives SIGKILL: the page cache
is not lost with the process):

- ``plain.log`` / ``keyed.log``: ``RUN EVENT_ID ORDER PART`` per event handled
  by the plain and the partitioned subscription;
- ``failed.log``: ``EVENT_ID ORDER`` per event published in a transaction that
  then raised on purpose (rolled back);
- ``acked.log``: ``EVENT_ID ORDER`` per event whose ``transact`` returned.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from engine import Engine, Event

if TYPE_CHECKING:
    from engine._store import Transaction

PLAIN = "plain"
KEYED = "keyed"
PROJECTION = "totals"
SUBSCRIPTIONS = (PLAIN, KEYED, PROJECTION)
KEYED_PARTITIONS = 4
BURST = 100
# How long the clean child waits for every subscription to catch up.
CATCH_UP_BOUND = 25.0
LOGS = ("plain.log", "keyed.log", "failed.log", "acked.log")


class Paid(Event, tag="crash.paid"):
    """A payment of ``amount`` on ``order``; ``part`` counts the order's payments from 0."""

    order: str
    amount: int
    part: int


class Deliberate(Exception):
    """Raised by a transaction after it published: it must leave no trace."""


@dataclass(frozen=True)
class Profile:
    writers: int
    """Concurrent writer tasks."""
    pause: float
    """Upper bound of a writer's random pause between transactions (seconds)."""
    burst_every: float | None
    """Start BURST concurrent transact calls this often (None: never)."""
    handler_sleep: float
    """Probability that a handler awaits a short sleep before it records the event."""
    projector_work: int
    """SHA-256 rounds a projector computes per event (work inside the transaction)."""
    fail: float = 0.1
    """Probability that a transaction raises after publishing."""
    top_up: float = 0.4
    """Probability that a transaction pays on an existing order instead of a new one."""


PROFILES = {
    # Many concurrent transact calls, and bursts of BURST of them.
    "writes": Profile(
        writers=12, pause=0.02, burst_every=0.1, handler_sleep=0.02, projector_work=10
    ),
    # Handlers that await: kills land inside them.
    "handlers": Profile(
        writers=6, pause=0.02, burst_every=None, handler_sleep=0.6, projector_work=10
    ),
    # A projector doing real work inside the writer's transaction.
    "projection": Profile(
        writers=6, pause=0.02, burst_every=None, handler_sleep=0.05, projector_work=600
    ),
    "mixed": Profile(
        writers=8, pause=0.02, burst_every=0.25, handler_sleep=0.2, projector_work=150
    ),
    "final": Profile(writers=4, pause=0.01, burst_every=None, handler_sleep=0.1, projector_work=50),
    "burst": Profile(writers=0, pause=0.0, burst_every=None, handler_sleep=0.0, projector_work=0),
}


def _setup(tx: Transaction) -> None:
    conn = tx.conn
    conn.execute(
        "CREATE TABLE IF NOT EXISTS orders "
        "(id TEXT PRIMARY KEY, amount INTEGER NOT NULL, parts INTEGER NOT NULL)"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS totals "
        "(name TEXT PRIMARY KEY, total INTEGER NOT NULL, events INTEGER NOT NULL)"
    )
    conn.execute("INSERT OR IGNORE INTO totals (name, total, events) VALUES ('all', 0, 0)")
    # No UNIQUE on event_id: an event applied twice would show as two rows.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS applied (event_id TEXT NOT NULL, order_id TEXT NOT NULL, "
        "part INTEGER NOT NULL, nth INTEGER NOT NULL)"
    )
    conn.execute("CREATE INDEX IF NOT EXISTS applied_order ON applied (order_id)")


def _recent_orders(tx: Transaction) -> list[str]:
    rows = tx.conn.execute("SELECT id FROM orders ORDER BY rowid DESC LIMIT 16").fetchall()
    return [str(row[0]) for row in rows]


def _outbox_head(tx: Transaction) -> int:
    return int(tx.conn.execute("SELECT coalesce(max(seq), 0) FROM outbox").fetchone()[0])


class Child:
    def __init__(self, db: str, workdir: Path, mode: str, seed: int) -> None:
        self.db = db
        self.mode = mode
        self.profile = PROFILES[mode]
        self.run = seed
        self.rng = random.Random(seed)
        self.fds = {
            name: os.open(workdir / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            for name in LOGS
        }
        self.recent: collections.deque[str] = collections.deque(maxlen=16)
        self.orders = 0

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def record(self, log: str, line: str) -> None:
        # One write on an O_APPEND descriptor: the line lands whole, even if killed.
        os.write(self.fds[log], line.encode())

    # --------------------------------------------------------------- writing

    def _pay(self, order: str | None, amount: int, fail: bool) -> Callable[[Transaction], str]:
        """A transaction: a new order (``order`` None) or a payment on an existing one."""
        name = order if order is not None else f"o{self.run}-{self.orders}"
        self.orders += 1

        def fn(tx: Transaction) -> str:
            if order is None:
                tx.db.table("orders").insert({"id": name, "amount": amount, "parts": 1})
                part = 0
            else:
                part = int(
                    tx.conn.execute("SELECT parts FROM orders WHERE id = ?", (name,)).fetchone()[0]
                )
                tx.conn.execute(
                    "UPDATE orders SET amount = amount + ?, parts = parts + 1 WHERE id = ?",
                    (amount, name),
                )
            event = Paid(order=name, amount=amount, part=part)
            tx.publish(event)
            if fail:
                self.record("failed.log", f"{event.id} {name}\n")
                raise Deliberate(name)
            return f"{event.id} {name}"

        return fn

    async def transact_one(self, engine: Engine, *, top_up: bool = True) -> None:
        profile = self.profile
        rng = self.rng
        order = None
        if top_up and self.recent and rng.random() < profile.top_up:
            order = rng.choice(self.recent)
        fn = self._pay(order, rng.randint(1, 100), rng.random() < profile.fail)
        try:
            acked = await engine.transact(fn)
        except Deliberate:
            return
        self.record("acked.log", acked + "\n")
        if order is None:
            self.recent.append(acked.split()[1])

    async def burst(self, engine: Engine, *, top_up: bool = True) -> None:
        async with anyio.create_task_group() as tg:
            for _ in range(BURST):
                tg.start_soon(lambda: self.transact_one(engine, top_up=top_up))

    async def writer(self, engine: Engine, count: int | None) -> None:
        done = 0
        while count is None or done < count:
            await self.transact_one(engine)
            done += 1
            await anyio.sleep(self.rng.uniform(0, self.profile.pause))

    async def bursts(self, engine: Engine, every: float) -> None:
        while True:
            await self.burst(engine)
            await anyio.sleep(every)

    # ------------------------------------------------------------- handling

    def _handler(self, log: str) -> Callable[[Paid], Any]:
        async def handle(event: Paid) -> None:
            if self.rng.random() < self.profile.handler_sleep:
                await anyio.sleep(self.rng.uniform(0.0005, 0.003))
            self.record(log, f"{self.run} {event.id} {event.order} {event.part}\n")

        return handle

    def _project(self, tx: Transaction, event: Paid) -> None:
        digest = event.order.encode()
        for _ in range(self.profile.projector_work):
            digest = hashlib.sha256(digest).digest()
        conn = tx.conn
        # The how-manieth payment of its order this projection applies: equals
        # ``part`` if the projection applies each order's events in seq order.
        nth = conn.execute(
            "SELECT count(*) FROM applied WHERE order_id = ?", (event.order,)
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO applied (event_id, order_id, part, nth) VALUES (?, ?, ?, ?)",
            (str(event.id), event.order, event.part, nth),
        )
        conn.execute(
            "UPDATE totals SET total = total + ?, events = events + 1 WHERE name = 'all'",
            (event.amount,),
        )

    def subscribe(self, engine: Engine) -> None:
        engine.subscribe(Paid, handler=self._handler("plain.log"), name=PLAIN)
        engine.subscribe(
            Paid,
            handler=self._handler("keyed.log"),
            name=KEYED,
            partitions=KEYED_PARTITIONS,
            key=lambda event: event.order,
        )
        engine.project(Paid, projector=self._project, name=PROJECTION)

    # ------------------------------------------------------------------ runs

    async def main(self) -> None:
        async with Engine(self.db) as engine:
            await engine.transact(_setup)
            self.recent.extend(await engine.transact(_recent_orders))
            if self.mode == "burst":
                # A first round committed, then rounds in flight until the kill.
                await self.burst(engine, top_up=False)
                print("ready", flush=True)
                while True:
                    await self.burst(engine, top_up=False)
            self.subscribe(engine)
            print("ready", flush=True)
            if self.mode == "final":
                async with anyio.create_task_group() as tg:
                    for _ in range(self.profile.writers):
                        tg.start_soon(self.writer, engine, 10)
                await self.wait_caught_up(engine)
                return
            async with anyio.create_task_group() as tg:
                for _ in range(self.profile.writers):
                    tg.start_soon(self.writer, engine, None)
                if self.profile.burst_every is not None:
                    tg.start_soon(self.bursts, engine, self.profile.burst_every)

    async def wait_caught_up(self, engine: Engine) -> None:
        """Until every subscription's lag is 0 and the relay's head is the outbox's."""
        deadline = anyio.current_time() + CATCH_UP_BOUND
        while True:
            head = await engine.transact(_outbox_head)
            metrics = engine.metrics()
            lag = metrics.lag
            if all(lag.get(name) == 0 for name in SUBSCRIPTIONS) and metrics.outbox_head == head:
                print(f"caught up at {head}", flush=True)
                return
            if anyio.current_time() > deadline:
                raise RuntimeError(
                    f"not caught up after {CATCH_UP_BOUND} s: lag {lag}, relay head "
                    f"{metrics.outbox_head}, outbox head {head}"
                )
            await anyio.sleep(0.05)


def main(argv: list[str]) -> None:
    if len(argv) not in (4, 5):
        sys.exit(f"usage: {sys.argv[0]} DB WORKDIR MODE SEED [BACKEND]")
    db, workdir, mode, seed = argv[:4]
    backend = argv[4] if len(argv) == 5 else "asyncio"
    if mode not in PROFILES:
        sys.exit(f"MODE must be one of {', '.join(PROFILES)}, got {mode!r}")
    child = Child(db, Path(workdir), mode, int(seed))
    try:
        anyio.run(child.main, backend=backend)
    finally:
        child.close()


if __name__ == "__main__":
    main(sys.argv[1:])
