"""``engine.health()`` and ``engine.asgi.health_app``: each status and reason comes from a
real condition (a lock another process holds, a slow subscriber, a breaker, a supervisor
that gave up, a Redis that stops, a lease a dead node still holds), and the probes are
asked through a real hypercorn server with httpx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import trio.testing

from engine import (
    Actor,
    Backoff,
    BackpressureConfig,
    CircuitBreakerConfig,
    Engine,
    Event,
    Health,
    StorageError,
    SupervisorEscalation,
)
from engine.asgi import ASGIApp, Message, Scope, health_app
from engine.cluster import RedisStreams
from tests.asgi_server import served
from tests.helpers import Gate
from tests.redis_server import RedisServer, redis_server_binary
from tests.storage_faults import lock_held, release

pytestmark = pytest.mark.anyio

OK = Health(status="ok", reasons=(), ready=True)
HUNDRED = BackpressureConfig(max_depth=100)
FAST = Backoff(initial=0.0, maximum=0.0, jitter=0.0)
# A parent that waits an hour before it restarts a child that gave up: the child's
# stopped state lasts as long as a test looks at it.
HOUR = Backoff(initial=3600.0, maximum=3600.0, jitter=0.0)
# Real time, for what another process (redis-server) does: a generous bound.
BOUND = 15.0


class Tick(Event, tag="t15.health.tick"):
    n: int


class Job(Event, tag="t15.health.job"):
    n: int


class Valve:
    """A subscriber that finishes an event only when the test says so: holds the depth."""

    def __init__(self) -> None:
        self.opened = anyio.Event()

    async def __call__(self, event: Tick) -> None:
        await self.opened.wait()


async def fill(engine: Engine, count: int) -> None:
    for n in range(count):
        engine.try_publish(Tick(n=n))
    await anyio.wait_all_tasks_blocked()


class BreaksOnce(Actor):
    """Fails on a message, then once more in ``on_restart``: a crash (outside
    ``receive``) that counts toward its supervisor's restart intensity."""

    def __init__(self, broken: list[bool]) -> None:
        self.broken = broken

    async def on_restart(self, error: BaseException) -> None:
        if not self.broken:
            self.broken.append(True)
            raise RuntimeError("on_restart broke")

    async def receive(self, message: Any) -> Any:
        if message == "break":
            raise ValueError("asked to break")
        return message


class AlwaysCrashes(Actor):
    async def on_restart(self, error: BaseException) -> None:
        raise RuntimeError("on_restart broke")

    async def receive(self, message: Any) -> None:
        raise ValueError("asked to break")


def degraded(*reasons: str) -> Health:
    """Alive, and (DESIGN: /readyz is 200 only when ok) not ready."""
    return Health(status="degraded", reasons=reasons, ready=False)


def failing(*reasons: str) -> Health:
    return Health(status="failing", reasons=reasons, ready=False)


# ------------------------------------------------------------------- the engine's life


async def test_an_engine_fails_before_it_starts_is_ok_while_it_runs_and_fails_once_stopped() -> (
    None
):
    engine = Engine()
    before = engine.health()
    assert before == failing("engine: not started")
    assert not before.live
    async with engine:
        during = engine.health()
        assert during == OK
        assert during.live
    assert engine.health() == failing("engine: stopped")


async def test_a_draining_engine_is_failing() -> None:
    gate, entered = anyio.Event(), anyio.Event()
    seen: list[Health] = []

    async def watch(engine: Engine) -> None:
        await anyio.wait_all_tasks_blocked()  # the exit waits for the gated message
        seen.append(engine.health())
        gate.set()

    async with anyio.create_task_group() as tg, Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, [], entered), name="g")
        ref.try_tell("held")
        await entered.wait()
        tg.start_soon(watch, engine)
    assert seen == [failing("engine: draining (shutting down)")]


# ------------------------------------------------------------------- storage


async def test_a_storage_outage_is_failing_until_the_database_takes_writes_again(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "app.db")
    async with Engine(path, storage_timeout=0.1) as engine:
        assert engine.health() == OK
        with lock_held(path) as holder:
            # A caller's own write meets the lock: the outage begins at once.
            with pytest.raises(StorageError):
                await engine.transact(lambda tx: tx.publish(Tick(n=0)))
            health = engine.health()
            assert (health.status, health.ready, health.live) == ("failing", False, False)
            [reason] = health.reasons
            assert re.fullmatch(
                r"storage: database unavailable for \d+\.\d s "
                r"\(OperationalError: database is locked\)",
                reason,
            ), reason
            release(holder)
        await engine.transact(lambda tx: tx.publish(Tick(n=1)))
        assert engine.health() == OK


# ------------------------------------------------------------------- backpressure


async def test_backpressure_warning_and_critical_are_degraded_alive_and_not_ready() -> None:
    valve = Valve()
    async with Engine(backpressure=BackpressureConfig(max_depth=2000)) as engine:
        engine.subscribe(Tick, handler=valve, name="valve", capacity=2000)
        await fill(engine, 1400)
        assert engine.health() == degraded("backpressure: WARNING (1,400 of 2,000 in flight)")
        await fill(engine, 400)
        critical = engine.health()
        assert critical == degraded("backpressure: CRITICAL (1,800 of 2,000 in flight)")
        assert critical.live
        valve.opened.set()
        await engine.idle()
        assert engine.health() == OK


# ------------------------------------------------------------------- breakers


async def test_an_open_breaker_is_degraded_and_not_ready() -> None:
    async with Engine() as engine:
        payments = engine.breaker("payments")
        engine.breaker("stock")  # closed: nothing to say
        await payments.force_open()
        assert engine.health() == degraded("breaker 'payments': open")
        await payments.reset()
        assert engine.health() == OK


class TestOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_a_half_open_breaker_is_degraded_and_not_ready(self) -> None:
        async with Engine() as engine:
            payments = engine.breaker("payments", CircuitBreakerConfig(timeout=60))
            await payments.force_open()
            await anyio.sleep(61)
            assert engine.health() == degraded("breaker 'payments': half-open")

    async def test_a_supervisor_that_gave_up_degrades_until_its_parent_restarts_it(
        self,
    ) -> None:
        async with Engine() as engine:
            outer = await engine.supervisor("outer", backoff=HOUR)
            inner = await outer.supervisor("inner", max_restarts=0, backoff=FAST)
            broken: list[bool] = []  # shared by every instance: it breaks once
            ref = await inner.spawn(lambda: BreaksOnce(broken), name="c", max_attempts=1)
            await ref.tell("break")
            await anyio.wait_all_tasks_blocked()
            assert engine.health() == degraded(
                "supervisor 'inner': its actors are stopped until 'outer' restarts it"
            )
            start = anyio.current_time()
            assert await ref.ask("again", timeout=None) == "again"
            assert anyio.current_time() - start == pytest.approx(3600)
            # The supervisor says it runs once each child restarted: right after.
            await anyio.wait_all_tasks_blocked()
            assert engine.health() == OK


# ------------------------------------------------------------------- supervisors


async def test_a_supervisor_that_gave_up_is_degraded_while_its_parent_waits() -> None:
    # The parent restarts it only after an hour: the engine leaves meanwhile, its
    # shutdown cut short (shutdown_timeout) by the wait.
    async with Engine(shutdown_timeout=0.1) as engine:
        outer = await engine.supervisor("outer", backoff=HOUR)
        inner = await outer.supervisor("inner", max_restarts=0, backoff=FAST)
        broken: list[bool] = []
        ref = await inner.spawn(lambda: BreaksOnce(broken), name="c", max_attempts=1)
        assert engine.health() == OK
        await ref.tell("break")
        await anyio.wait_all_tasks_blocked()
        health = engine.health()
        assert health == degraded(
            "supervisor 'inner': its actors are stopped until 'outer' restarts it"
        )
        assert health.live


async def test_a_root_supervisor_that_gave_up_is_failing() -> None:
    seen: list[Health] = []
    with pytest.raises(SupervisorEscalation, match="'root' gave up"):
        async with Engine() as engine:
            ref = await engine.spawn(AlwaysCrashes, name="c")
            await ref.tell("break")
            try:
                await anyio.sleep_forever()
            finally:  # cancelled by the escalation, before the engine stops
                seen.append(engine.health())
    assert seen == [failing("supervisor 'root': gave up; the engine stops")]
    assert engine.health() == failing("engine: stopped")


# ------------------------------------------------------------------- cluster


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    with RedisServer(redis_server_binary()) as server:
        yield server


async def until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` (real time: Redis is another process) for up to ``BOUND`` s."""
    deadline = anyio.current_time() + BOUND
    while not condition():
        if anyio.current_time() > deadline:
            pytest.fail(f"{what}: not within {BOUND} s")
        await anyio.sleep(0.02)


async def _nothing(job: Job) -> None:
    pass


async def test_a_lone_node_without_every_lease_or_without_redis_is_degraded_and_alive(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    namespace = "t15health"
    # A node that died holding partition 0's lease: it runs out in a minute.
    ghost = f"{namespace}:lease:jobs:0"
    redis_server.command("SET", ghost, "ghost/1", "PX", "60000")
    cluster = RedisStreams(
        redis_server.url, namespace=namespace, partitions=2, node="alone", lease_ttl=0.6
    )
    async with Engine(tmp_path / "alone.db", cluster=cluster) as engine:
        engine.subscribe(Job, handler=_nothing, name="jobs")

        def owned() -> list[int]:
            metrics = engine.metrics().cluster
            assert metrics is not None
            return metrics.owned.get("jobs", [])

        await until(lambda: owned() == [1], "partition 1 leased")
        assert engine.health() == degraded("cluster: no lease on partition 0 of 'jobs'")

        redis_server.command("DEL", ghost)
        await until(lambda: owned() == [0, 1], "partition 0 leased once the ghost's is gone")
        assert engine.health() == OK

        await anyio.to_thread.run_sync(redis_server.stop)
        await until(lambda: "cluster: Redis unreachable" in engine.health().reasons, "Redis away")
        health = engine.health()
        assert (health.status, health.ready, health.live) == ("degraded", False, True)

        await anyio.to_thread.run_sync(redis_server.start)
        await until(lambda: engine.health() == OK, "ok once Redis is back")


# ------------------------------------------------------------------- the probes


def answer(response: httpx.Response) -> tuple[int, Any]:
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    return response.status_code, response.json()


async def test_the_probes_through_hypercorn(anyio_backend: str) -> None:
    valve = Valve()
    async with Engine(backpressure=HUNDRED) as engine:
        engine.subscribe(Tick, handler=valve, name="valve")
        app = health_app(engine)
        async with served(app, anyio_backend) as url, httpx.AsyncClient(base_url=url) as client:
            ok = {"status": "ok", "reasons": []}
            assert answer(await client.get("/livez")) == (200, ok)
            assert answer(await client.get("/readyz")) == (200, ok)
            assert answer(await client.get("/readyz?verbose=1&x=%00")) == (200, ok)

            head = await client.head("/livez")
            assert head.status_code == 200
            assert head.content == b""
            assert head.headers["content-type"] == "application/json"

            posted = await client.post("/livez", content=b"x" * 10_000)
            assert answer(posted) == (
                405,
                {"error": "method_not_allowed", "detail": "the health probes answer GET and HEAD"},
            )
            assert posted.headers["allow"] == "GET, HEAD"
            assert (await client.delete("/readyz")).status_code == 405

            not_found = {
                "error": "not_found",
                "detail": "the health app answers /livez and /readyz",
            }
            for path in ("/", "/livez/", "/LIVEZ", "/healthz", "/livez%2F..%2Freadyz", "/%00%ff"):
                assert answer(await client.get(path)) == (404, not_found), path
            assert answer(await client.get("/" + "a" * 4000)) == (404, not_found)
            assert (await client.post("/nope")).status_code == 404
            missing = await client.head("/nope")
            assert (missing.status_code, missing.content) == (404, b"")

            huge = await client.get("/livez", headers={"X-Junk": "j" * 8000})
            assert answer(huge) == (200, ok)

            await fill(engine, 90)
            critical = {
                "status": "degraded",
                "reasons": ["backpressure: CRITICAL (90 of 100 in flight)"],
            }
            assert answer(await client.get("/livez")) == (200, critical)
            assert answer(await client.get("/readyz")) == (503, critical)
            unready = await client.head("/readyz")
            assert (unready.status_code, unready.content) == (503, b"")

            valve.opened.set()
            await engine.idle()
            assert answer(await client.get("/readyz")) == (200, ok)

            # Degraded by any finding: alive, not ready (DESIGN: /readyz is 200 only when ok).
            payments = engine.breaker("payments")
            await payments.force_open()
            opened = {"status": "degraded", "reasons": ["breaker 'payments': open"]}
            assert answer(await client.get("/livez")) == (200, opened)
            assert answer(await client.get("/readyz")) == (503, opened)


async def test_the_probes_of_an_engine_before_it_starts_and_after_it_stops(
    anyio_backend: str,
) -> None:
    engine = Engine()
    async with (
        served(health_app(engine), anyio_backend) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        for probe in ("/livez", "/readyz"):
            assert answer(await client.get(probe)) == (
                503,
                {"status": "failing", "reasons": ["engine: not started"]},
            )
        async with engine:
            assert (await client.get("/livez")).status_code == 200
        for probe in ("/livez", "/readyz"):
            assert answer(await client.get(probe)) == (
                503,
                {"status": "failing", "reasons": ["engine: stopped"]},
            )


# ------------------------------------------------------------------- the app alone


async def call(app: ASGIApp, scope: Scope, incoming: list[Message] | None = None) -> list[Message]:
    """Call ``app`` once; what it receives is ``incoming`` (then nothing), what it sent."""
    waiting = list(incoming or [{"type": "http.request", "body": b"", "more_body": False}])
    sent: list[Message] = []

    async def receive() -> Message:
        if waiting:
            return waiting.pop(0)
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def http(path: object, method: object = "GET", **more: Any) -> Scope:
    return {"type": "http", "method": method, "path": path, "headers": [], **more}


async def test_lifespan_events_are_answered() -> None:
    sent = await call(
        health_app(Engine()),
        {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}},
        [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}],
    )
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


async def test_a_websocket_is_closed_before_it_is_accepted() -> None:
    sent = await call(
        health_app(Engine()),
        {"type": "websocket", "path": "/livez"},
        [{"type": "websocket.connect"}],
    )
    assert sent == [{"type": "websocket.close", "code": 1008}]
    gone = await call(
        health_app(Engine()),
        {"type": "websocket", "path": "/livez"},
        [{"type": "websocket.disconnect"}],
    )
    assert gone == []


async def test_an_unknown_scope_type_is_refused_the_asgi_way() -> None:
    with pytest.raises(ValueError, match="health_app serves http and lifespan scopes, got 'mqtt'"):
        await call(health_app(Engine()), {"type": "mqtt"})


def status_of(sent: list[Message]) -> tuple[int, Any]:
    start, body = sent
    return start["status"], json.loads(body["body"]) if body["body"] else None


async def test_paths_count_after_the_root_path_and_odd_scopes_get_no_500() -> None:
    app = health_app(Engine())
    failing_body = {"status": "failing", "reasons": ["engine: not started"]}
    assert status_of(await call(app, http("/health/livez", root_path="/health"))) == (
        503,
        failing_body,
    )
    assert status_of(await call(app, http("/livez", root_path="/health"))) == (503, failing_body)
    assert (await call(app, http("/healthlivez", root_path="/health")))[0]["status"] == 404
    for path in (b"/livez", None, ["/livez"], 7):
        assert (await call(app, http(path)))[0]["status"] == 404, path
    for method in (None, b"GET", "get", ["GET"]):
        assert (await call(app, http("/livez", method)))[0]["status"] == 405, method
    assert (await call(app, {"type": "http"}))[0]["status"] == 404


async def test_head_sends_the_headers_of_get_and_no_body() -> None:
    # Servers drop a HEAD answer's body anyway (hypercorn does): the app sends none.
    app = health_app(Engine())
    for path in ("/livez", "/nope"):
        got_start, got_body = await call(app, http(path))
        head_start, head_body = await call(app, http(path, "HEAD"))
        assert head_start == got_start
        assert dict(head_start["headers"])[b"content-length"] == str(len(got_body["body"])).encode()
        assert head_body == {"type": "http.response.body", "body": b""}


async def test_many_reasons_are_cut_to_twenty_in_a_probe() -> None:
    async with Engine() as engine:
        for n in range(25):
            await engine.breaker(f"dependency-{n:02d}").force_open()
        assert len(engine.health().reasons) == 25
        status, body = status_of(await call(health_app(engine), http("/livez")))
    assert status == 200
    assert body["status"] == "degraded"
    assert body["reasons"] == [
        *(f"breaker 'dependency-{n:02d}': open" for n in range(19)),
        "... and 6 more",
    ]


class Broken:
    """Not an engine: a health() that raises, as a bug would."""

    def health(self) -> Health:
        raise RuntimeError("bug")


async def test_a_health_check_that_raises_is_a_503_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sent = await call(health_app(Broken()), http("/livez"))
    assert status_of(sent) == (
        503,
        {"status": "failing", "reasons": ["health: the check raised RuntimeError"]},
    )
    assert "engine.health() raised" in caplog.text


def test_health_app_needs_something_with_health() -> None:
    with pytest.raises(
        TypeError,
        match=r"engine must be an Engine \(anything with a health\(\) method\), got object",
    ):
        health_app(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="got str"):
        health_app("engine")  # type: ignore[arg-type]


def test_health_is_a_frozen_record() -> None:
    health = Engine().health()
    with pytest.raises(AttributeError):
        health.status = "ok"  # type: ignore[misc]
    assert Health.__module__ == "engine"
