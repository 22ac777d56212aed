"""A pytest plugin for testing your own handlers against a real engine.

Installed with the package and registered as ``actorbus`` (entry point
``pytest11``), so its fixtures are there in any test suite of a project that
depends on actorbus. Their names carry the ``actorbus_`` prefix, so they never
collide with a project's own ``engine`` fixture:

``actorbus_engine``
    A running in-memory ``Engine``; left (drained and stopped) after the test.
``actorbus_durable_engine``
    A running ``Engine`` on a fresh SQLite file in the test's ``tmp_path``.
``actorbus_redis_url``
    The URL of a real ``redis-server`` started for the test on a free 127.0.0.1
    port (no persistence; stopped afterwards). The test fails, naming the package
    to install, when ``redis-server`` is missing.

The engine fixtures are async: they run on the test's anyio backend (the
``anyio_backend`` fixture; parametrize it over ``"asyncio"`` and ``"trio"`` to
run each test on both) and need the test to be an anyio test
(``@pytest.mark.anyio``). Publish, ``await engine.idle()``, then assert::

    @pytest.mark.anyio
    async def test_billing(actorbus_engine):
        billed = []

        async def bill(event):
            billed.append(event.order_id)

        actorbus_engine.subscribe(OrderPlaced, handler=bill, name="billing")
        await actorbus_engine.publish(OrderPlaced(order_id=order, total=100, currency="EUR"))
        await actorbus_engine.idle()
        assert billed == [order]
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from ._engine import Engine
from ._redis_server import MISSING, RedisServer, find_redis_server

__all__ = ["actorbus_durable_engine", "actorbus_engine", "actorbus_redis_url"]


@pytest.fixture
async def actorbus_engine(anyio_backend: object) -> AsyncIterator[Engine]:
    """A running in-memory engine, left after the test (what it accepted is drained)."""
    async with Engine() as engine:
        yield engine


@pytest.fixture
async def actorbus_durable_engine(anyio_backend: object, tmp_path: Path) -> AsyncIterator[Engine]:
    """A running engine on a fresh SQLite file, ``tmp_path / "actorbus.db"``."""
    async with Engine(tmp_path / "actorbus.db") as engine:
        yield engine


@pytest.fixture
def actorbus_redis_url() -> Iterator[str]:
    """The URL of a ``redis-server`` of the test's own, on a free port."""
    binary = find_redis_server()
    if binary is None:
        pytest.fail(f"the actorbus_redis_url fixture needs {MISSING}")
    with RedisServer(binary) as server:
        yield server.url
