"""FastAPI with an engine in its lifespan: orders written with their events, handled durably.

Run: python3 examples/fastapi_lifespan.py   (asyncio only)

The app's lifespan enters ``Engine(database)`` (an SQLite file in a temporary
directory) with a durable subscription and keeps the engine on ``app.state``.
``POST /orders`` writes the order row and its ``OrderAccepted`` event in one
``engine.transact`` call; the subscription handles the event after the commit.
Hypercorn serves the app on a free port of 127.0.0.1; the script posts a few
orders with httpx, waits until the handler saw them and shuts the server down
(leaving the lifespan drains and closes the engine).
"""

from __future__ import annotations

import json
import socket
import sqlite3
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import anyio
import httpx
from fastapi import FastAPI, HTTPException, Request
from hypercorn.asyncio import serve
from hypercorn.config import Config
from hypercorn.typing import ASGIFramework
from pydantic import BaseModel

from engine import Engine, Event, Transaction


class OrderAccepted(Event, tag="example.fastapi.order_accepted"):
    order: str
    amount: int


class NewOrder(BaseModel):
    order: str
    amount: int


def create_app(database: Path) -> FastAPI:
    handled: list[str] = []

    async def fulfil(event: OrderAccepted) -> None:
        handled.append(event.order)
        print(f"   [fulfilment] handled {event.order} ({event.amount} EUR)")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = Engine(database)
        engine.subscribe(OrderAccepted, handler=fulfil, name="fulfilment")  # durable, by name
        async with engine:
            await engine.transact(
                lambda tx: tx.conn.execute(
                    "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, amount INTEGER)"
                )
            )
            app.state.engine = engine
            app.state.handled = handled
            print("   [lifespan] engine started")
            yield
            print("   [lifespan] stopping the engine")
        print("   [lifespan] engine stopped")

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(new: NewOrder, request: Request) -> dict[str, Any]:
        engine: Engine = request.app.state.engine

        def write(tx: Transaction) -> None:
            tx.db.table("orders").insert({"id": new.order, "amount": new.amount}, pk="id")
            tx.publish(OrderAccepted(order=new.order, amount=new.amount))
            if new.amount <= 0:
                raise ValueError(f"amount must be > 0, got {new.amount}")

        try:
            await engine.transact(write)  # the row and the event commit together, or neither
        except ValueError as exc:
            raise HTTPException(status_code=422, detail=f"{exc} (nothing written)") from exc
        return {"order": new.order, "status": "accepted"}

    return app


def listening_socket() -> tuple[int, int]:
    """A socket listening on a free port of 127.0.0.1: (file descriptor, port)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port: int = sock.getsockname()[1]
    return sock.detach(), port  # hypercorn takes the descriptor over (fd://)


ORDERS = [("o-1", 30), ("o-2", 12), ("o-3", -5), ("o-4", 8)]


async def run(database: Path) -> None:
    app = create_app(database)
    fd, port = listening_socket()
    config = Config()
    config.bind = [f"fd://{fd}"]
    config.loglevel = "WARNING"
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        print("1. hypercorn serving the app on 127.0.0.1 (a free port)")
        tg.start_soon(lambda: serve(cast(ASGIFramework, app), config, shutdown_trigger=stop.wait))
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base, trust_env=False, timeout=10) as client:
            # The socket listens already; this waits for the lifespan (the engine) to start.
            for _ in range(500):
                if getattr(app.state, "engine", None) is not None:
                    break
                await anyio.sleep(0.01)
            print("2. POST /orders")
            for order, amount in ORDERS:
                response = await client.post("/orders", json={"order": order, "amount": amount})
                print(f"   {order}: {response.status_code} {json.dumps(response.json())}")
        handled: list[str] = app.state.handled
        expected = sum(1 for _, amount in ORDERS if amount > 0)
        for _ in range(500):  # bounded: about 5 s
            if len(handled) >= expected:
                break
            await anyio.sleep(0.01)
        print(f"3. the subscription handled {sorted(handled)}")
        print("4. shutting the server down")
        stop.set()
    with sqlite3.connect(database) as conn:
        orders = conn.execute("SELECT id FROM orders ORDER BY id").fetchall()
        events = conn.execute("SELECT count(*) FROM outbox").fetchone()[0]
    conn.close()
    print(f"5. in the database: orders {[row[0] for row in orders]}, {events} events in the outbox")


async def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        await run(Path(directory) / "shop.db")
    print("done")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] != "asyncio":
        sys.exit("fastapi_lifespan runs on asyncio only (hypercorn.asyncio)")
    anyio.run(main, backend="asyncio")
