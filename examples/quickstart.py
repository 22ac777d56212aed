"""A small shop on actorbus, on the embedded SQLite default.

Run: python3 examples/quickstart.py [asyncio|trio] [DATABASE]   (DATABASE: a new file)

- orders are written with ``transact``: the order row and its event commit together;
- an inventory projection applies each order exactly once, in the same database;
- billing calls a flaky payment service behind a circuit breaker;
- a mailer meets a poison message, which ends in the dead letters (with its error);
- a restart shows that positions survive, then the final metrics.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import anyio

from engine import (
    CircuitBreakerConfig,
    CircuitOpenError,
    Engine,
    Event,
    Transaction,
)


class OrderPlaced(Event, tag="quickstart.order_placed"):
    order: str
    sku: str
    quantity: int
    amount: int
    email: str


STOCK = {"mug": 10, "tee": 5}
ORDERS = [
    ("o-1", "mug", 2, 24, "ada@example.com"),
    ("o-2", "tee", 1, 20, "grace@example.com"),
    ("o-3", "mug", 1, 12, "not-an-email"),  # the mailer's poison message
    ("o-4", "tee", 2, 40, "alan@example.com"),
    ("o-5", "mug", 9, 108, "edsger@example.com"),  # more mugs than in stock: refused
]


def place(order: str, sku: str, quantity: int, amount: int, email: str) -> Any:
    """A transact function: checks stock, writes the order and publishes its event."""

    def write(tx: Transaction) -> None:
        # Checked against the orders themselves, in this transaction: the
        # inventory projection may lag behind the writes by a few milliseconds.
        (sold,) = tx.conn.execute(
            "SELECT coalesce(sum(quantity), 0) FROM orders WHERE sku = ?", (sku,)
        ).fetchone()
        if sold + quantity > STOCK[sku]:
            raise ValueError(f"{order}: not enough {sku} in stock")
        tx.db.table("orders").insert({"id": order, "sku": sku, "quantity": quantity}, pk="id")
        tx.publish(OrderPlaced(order=order, sku=sku, quantity=quantity, amount=amount, email=email))

    return write


def take_stock(tx: Transaction, event: OrderPlaced) -> None:
    """The inventory projection: runs in the transaction that moves its position."""
    tx.conn.execute(
        "UPDATE inventory SET stock = stock - ? WHERE sku = ?", (event.quantity, event.sku)
    )


def schema(tx: Transaction) -> None:
    tx.conn.execute("CREATE TABLE IF NOT EXISTS inventory (sku TEXT PRIMARY KEY, stock INTEGER)")
    tx.conn.execute(
        "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, sku TEXT, quantity INTEGER)"
    )
    tx.conn.executemany("INSERT OR IGNORE INTO inventory VALUES (?, ?)", STOCK.items())


class PaymentService:
    """A flaky dependency: it fails its first two charges, then recovers."""

    def __init__(self) -> None:
        self.calls = 0

    async def charge(self, order: str, amount: int) -> str:
        self.calls += 1
        await anyio.sleep(0.001)
        if self.calls <= 2:
            raise ConnectionError("payment service unreachable")
        return f"receipt-{order}"


def settled(engine: Engine, billed: int) -> bool:
    """Every order billed and every durable subscription caught up."""
    lag = engine.metrics().lag
    return billed >= 4 and len(lag) == 3 and set(lag.values()) == {0}


async def shop(database: Path) -> None:
    payments = PaymentService()
    billed: list[str] = []
    mailed: list[str] = []

    async def bill(event: OrderPlaced) -> None:
        try:
            receipt = await breaker.call(payments.charge, event.order, event.amount)
        except CircuitOpenError as exc:
            print(f"   billing {event.order}: breaker open, retry in {exc.retry_after:.2f} s")
            raise
        except ConnectionError as exc:
            print(f"   billing {event.order}: {exc} (breaker {breaker.state})")
            raise
        billed.append(event.order)
        print(f"   billing {event.order}: {receipt}")

    async def mail(event: OrderPlaced) -> None:
        if "@" not in event.email:
            raise ValueError(f"cannot mail {event.email!r}")
        mailed.append(event.order)

    print("1. orders, written with transact (row and event commit together, or neither)")
    async with Engine(database) as engine:
        breaker = engine.breaker("payments", CircuitBreakerConfig(failure_threshold=2, timeout=0.1))
        engine.project(OrderPlaced, projector=take_stock, name="inventory")
        engine.subscribe(OrderPlaced, handler=bill, name="billing", max_attempts=4)
        engine.subscribe(OrderPlaced, handler=mail, name="mailer")
        await engine.transact(schema)
        for order in ORDERS:
            try:
                await engine.transact(place(*order))
                print(f"   placed {order[0]}: {order[2]} x {order[1]}")
            except ValueError as exc:
                print(f"   refused {exc} (nothing written, nothing published)")
        print("2. leaving the engine drains what was committed")
    print(f"   billed {billed}, mailed {mailed}")
    first_run = list(billed)

    print("3. a restart: positions survive (nothing is handled twice), dead letters too")
    billed.clear()
    mailed.clear()
    async with Engine(database) as engine:
        breaker = engine.breaker("payments")
        engine.project(OrderPlaced, projector=take_stock, name="inventory")
        engine.subscribe(OrderPlaced, handler=bill, name="billing", max_attempts=4)
        engine.subscribe(OrderPlaced, handler=mail, name="mailer")
        for letter in engine.dead_letters.list():
            print(f"   dead letter #{letter.id} for {letter.actor}: {letter.error}")
        print("4. the payment service is back: replay billing's dead letters")
        for letter in engine.dead_letters.list():
            if letter.actor == "billing":
                await engine.dead_letters.replay(letter.id)
        with anyio.fail_after(5):  # a bounded wait on the engine's own metrics
            while not settled(engine, len(first_run) + len(billed)):  # noqa: ASYNC110
                await anyio.sleep(0.01)
        stock = await engine.transact(
            lambda tx: dict(tx.conn.execute("SELECT sku, stock FROM inventory ORDER BY sku"))
        )
        print(f"   inventory {stock} (each order applied exactly once)")
        m = engine.metrics()
        print(f"   outbox head {m.outbox_head}, lag {dict(sorted(m.lag.items()))}")
        payments_metrics = m.breakers["payments"]
        print(
            f"   breaker payments: {payments_metrics.state}, {payments_metrics.successes} successes"
        )
        print(f"   dead letters left: {engine.dead_letters.count()} (the mailer's poison)")
    every_order_once = sorted(first_run + billed) == ["o-1", "o-2", "o-3", "o-4"]
    print(f"   every order billed once: {every_order_once}")
    print(f"   mailed after the restart: {mailed} (positions survived)")


async def main() -> None:
    if len(sys.argv) > 2:
        await shop(Path(sys.argv[2]))  # checked to be new before anything ran
    else:
        with tempfile.TemporaryDirectory() as directory:
            await shop(Path(directory) / "shop.db")
    print("done")


if __name__ == "__main__":
    if len(sys.argv) > 2 and Path(sys.argv[2]).exists():
        sys.exit(f"quickstart writes a new database; {sys.argv[2]} exists already")
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
