"""The pytest plugin ``engine.testing`` (entry point ``pytest11``, name ``actorbus``),
run as a user would: a test suite of its own, in a pytest subprocess."""

from __future__ import annotations

import os
import textwrap
from importlib.metadata import entry_points

import pytest

from tests.redis_server import redis_server_binary

# A user's suite: both backends, and a fixture of its own called ``engine``.
CONFTEST = """
import pytest

@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param

@pytest.fixture
def engine():
    return "the user's own engine fixture (SQLAlchemy users have one)"
"""


def _run(pytester: pytest.Pytester, test: str, *args: str) -> pytest.RunResult:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_user=textwrap.dedent(test))
    # No plugin named on the command line: the entry point loads it, as in a user's project.
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:xdist", *args)


def test_the_plugin_is_registered_as_actorbus() -> None:
    [entry] = [e for e in entry_points(group="pytest11") if e.name == "actorbus"]
    assert entry.value == "engine.testing"


def test_a_users_handler_test_on_both_backends(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        from uuid import uuid4
        from engine.catalog import OrderPlaced

        @pytest.mark.anyio
        async def test_billing(actorbus_engine, engine, anyio_backend):
            assert engine.startswith("the user's own")
            billed = []

            async def bill(event):
                billed.append(event.order_id)

            actorbus_engine.subscribe(OrderPlaced, handler=bill, name="billing")
            order = uuid4()
            await actorbus_engine.publish(OrderPlaced(order_id=order, total=100, currency="EUR"))
            await actorbus_engine.idle()
            assert billed == [order]
            assert actorbus_engine.database is None
        """,
    )
    result.assert_outcomes(passed=2)


def test_the_durable_engine_is_on_a_file_of_the_test(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        from uuid import uuid4
        from engine.catalog import TagCreated

        @pytest.mark.anyio
        async def test_projection(actorbus_durable_engine, tmp_path):
            engine = actorbus_durable_engine
            assert engine.database == str(tmp_path / "actorbus.db")

            def project(tx, event):
                tx.db["tags"].insert({"id": str(event.tag_id)})

            engine.project(TagCreated, projector=project, name="tags")
            await engine.transact(lambda tx: tx.publish(TagCreated(tag_id=uuid4())))
            await engine.idle()
            count = await engine.transact(lambda tx: tx.db["tags"].count)
            assert count == 1
        """,
    )
    result.assert_outcomes(passed=2)


def test_an_engine_fixture_leaves_the_engine_after_the_test(pytester: pytest.Pytester) -> None:
    result = _run(
        pytester,
        """
        import pytest
        from engine import EngineError

        kept = []

        @pytest.mark.anyio
        async def test_keep(actorbus_engine):
            kept.append(actorbus_engine)

        @pytest.mark.anyio
        async def test_it_was_left(anyio_backend):
            with pytest.raises(EngineError, match="not running"):
                await kept[-1].idle()
        """,
    )
    result.assert_outcomes(passed=4)


def test_the_redis_url_is_a_real_server_of_the_test(pytester: pytest.Pytester) -> None:
    redis_server_binary()  # this project's rule: skipped without it, failed under CI
    result = _run(
        pytester,
        """
        import socket
        from urllib.parse import urlsplit

        def test_ping(actorbus_redis_url):
            url = urlsplit(actorbus_redis_url)
            assert url.scheme == "redis" and url.hostname == "127.0.0.1"
            assert url.port != 6379
            with socket.create_connection((url.hostname, url.port), timeout=5) as s:
                s.sendall(b"PING\\r\\n")
                assert s.recv(64) == b"+PONG\\r\\n"
        """,
    )
    result.assert_outcomes(passed=1)


def test_without_redis_server_the_redis_fixture_fails_naming_what_to_install(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACTORBUS_REDIS_SERVER", os.path.join(str(pytester.path), "no-such-binary"))
    result = _run(
        pytester,
        """
        def test_needs_redis(actorbus_redis_url):
            raise AssertionError("never reached")
        """,
    )
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["*the actorbus_redis_url fixture needs redis-server*apt-get install redis-server*"]
    )
