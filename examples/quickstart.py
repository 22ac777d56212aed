"""A first look at actorbus: actors, a crash and its restart, then durable events on SQLite.

Run: python3 examples/quickstart.py [asyncio|trio] [DATABASE]   (DATABASE: a new file)

Part one runs in memory; part two writes orders and their events to an
SQLite file (a fresh temporary one unless DATABASE is given) with
``transact``, handles them in a durable subscription and a projection, and
restarts the engine to show that positions survive.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from engine import Actor, ActorRef, Backoff, Engine, Event, Strategy, Transaction


class OrderPlaced(Event, tag="quickstart.order_placed"):
    order: str
    amount: int


class Counter(Actor):
    """Keeps a count; its state is lost when it crashes and restarts fresh."""

    def __init__(self) -> None:
        self.count = 0

    async def on_start(self) -> None:
        print(f"  [counter] on_start (count={self.count})")

    async def on_restart(self, error: BaseException) -> None:
        print(f"  [counter] on_restart after {type(error).__name__}: {error}")

    async def on_stop(self) -> None:
        print(f"  [counter] on_stop (count={self.count})")

    async def receive(self, message: Any) -> Any:
        match message:
            case ("add", int(n)):
                self.count += n
                return self.count
            case "get":
                return self.count
            case "crash":
                raise RuntimeError("simulated crash")
            case _:
                raise ValueError(f"unknown message {message!r}")


class Greeter(Actor):
    """Talks to the counter through its ref: actors never hold each other."""

    def __init__(self, counter: ActorRef[Any]) -> None:
        self.counter = counter

    async def receive(self, name: str) -> str:
        visits = await self.counter.ask(("add", 1))
        return f"hello {name}, you are visitor #{visits}"


async def actors() -> None:
    async with Engine() as engine:
        sup = await engine.supervisor(
            "app", strategy=Strategy.ONE_FOR_ONE, backoff=Backoff(initial=0.05)
        )
        counter = await sup.spawn(Counter, name="counter", max_attempts=2)
        greeter = await sup.spawn(lambda: Greeter(counter), name="greeter")

        print("1. tell and ask")
        await counter.tell(("add", 10))
        print(f"   count is {await counter.ask('get')}")
        print(f"   {await greeter.ask('ada')}")

        print("2. a crash: the counter is restarted with fresh state, the message retried")
        try:
            await counter.ask("crash")
        except RuntimeError as exc:
            print(f"   ask raised the handler's error after 2 attempts: {exc}")
        print(f"   count is {await counter.ask('get')} (a fresh instance)")
        print(f"   {await greeter.ask('grace')}")

        print("3. dead letters keep what could not be handled")
        for letter in engine.dead_letters.list():
            print(f"   #{letter.id} {letter.actor}: {letter.message!r} {letter.reason}")
            print(f"      {letter.error}, attempts={letter.attempts}")

        print("4. statistics")
        for stats in engine.metrics().actors.values():
            print(
                f"   {stats.name}: processed={stats.processed} failed={stats.failed} "
                f"restarts={stats.restarts} peak_depth={stats.peak_depth}"
            )
        print("5. leaving the engine: drain, then on_stop in reverse start order")


def place(order: str, amount: int) -> Any:
    """A transact function: the order row and its event commit together, or neither."""

    def write(tx: Transaction) -> None:
        tx.db.table("orders").insert({"id": order, "amount": amount}, pk="id")
        tx.publish(OrderPlaced(order=order, amount=amount))
        if amount < 0:
            raise ValueError(f"order {order}: amount must be >= 0")

    return write


def revenue(tx: Transaction, event: OrderPlaced) -> None:
    """A projection: runs in the transaction that moves its position (exactly once)."""
    tx.conn.execute(
        "INSERT INTO revenue (day, total) VALUES ('today', ?) "
        "ON CONFLICT (day) DO UPDATE SET total = total + excluded.total",
        (event.amount,),
    )


async def durable(database: Path) -> None:
    mailed: list[str] = []

    async def mailer(event: OrderPlaced) -> None:
        mailed.append(event.order)

    for run in (1, 2):
        async with Engine(database) as engine:
            engine.subscribe(OrderPlaced, handler=mailer, name="mailer")
            engine.project(OrderPlaced, projector=revenue, name="revenue")
            if run == 1:
                await engine.transact(
                    lambda tx: tx.conn.execute(
                        "CREATE TABLE IF NOT EXISTS revenue (day TEXT PRIMARY KEY, total INTEGER)"
                    )
                )
                for order, amount in [("o-1", 30), ("o-2", 12), ("o-3", -5)]:
                    try:
                        await engine.transact(place(order, amount))
                    except ValueError as exc:
                        print(f"   rolled back: {exc} (no row, no event)")
            else:
                await engine.transact(place("o-4", 8))
        print(f"   run {run}: the mailer got {mailed}")
        mailed.clear()
    async with Engine(database) as engine:
        total = await engine.transact(
            lambda tx: tx.conn.execute("SELECT total FROM revenue").fetchone()[0]
        )
        rows = await engine.transact(lambda tx: tx.db.table("orders").count)
    print(f"   {rows} orders, revenue {total}: each event applied once")


async def main() -> None:
    await actors()
    print("6. durable events on SQLite: transact, a subscription and a projection")
    if len(sys.argv) > 2:
        await durable(Path(sys.argv[2]))  # checked to be new before anything ran
    else:
        with tempfile.TemporaryDirectory() as directory:
            await durable(Path(directory) / "quickstart.db")
    print("done")


if __name__ == "__main__":
    if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
        sys.exit(f"quickstart writes a new database; {sys.argv[2]} exists already")
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
