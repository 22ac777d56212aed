"""OpenTelemetry tracing: one trace from the publishing request to every handler,
in memory, through the outbox and across a restart; real SDK, in-memory exporter."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import coredis
import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from engine import Actor, CircuitBreakerConfig, Engine, Event
from engine.cluster import RedisStreams
from engine.events import encode
from tests.redis_server import RedisServer, redis_server_binary

pytestmark = pytest.mark.anyio


class Paid(Event, tag="t15.tracing.paid"):
    n: int


class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self.provider = TracerProvider()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.tracer = self.provider.get_tracer("test")

    def spans(self) -> dict[str, ReadableSpan]:
        return {span.name: span for span in self.exporter.get_finished_spans()}


class EndOf(SpanProcessor):
    """Sets ``ended`` when a span called ``name`` ends (in whichever thread)."""

    def __init__(self, name: str, ended: threading.Event) -> None:
        self.name = name
        self.ended = ended

    def on_end(self, span: ReadableSpan) -> None:
        if span.name == self.name:
            self.ended.set()


@pytest.fixture
def traced() -> Iterator[Traced]:
    tracing = Traced()
    yield tracing
    tracing.provider.shutdown()


def pending_writes(engine: Engine) -> int:
    storage = engine.metrics().storage
    assert storage is not None
    return storage.pending_writes


def _parent(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _recorder(seen: list[Any]) -> Any:
    async def handle(event: Any) -> None:
        seen.append(event)

    return handle


async def test_a_handler_runs_in_the_trace_that_published_its_event(traced: Traced) -> None:
    seen: list[Paid] = []
    async with Engine(tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=_recorder(seen), name="billing", partitions=2)
        with traced.tracer.start_as_current_span("request"):
            await engine.publish(Paid(n=1))
            engine.try_publish(Paid(n=2))
        await engine.idle()
    assert [event.n for event in seen] in ([1, 2], [2, 1])
    finished = traced.exporter.get_finished_spans()
    request = next(span for span in finished if span.name == "request")
    publishes = [span for span in finished if span.name == "publish"]
    handles = [span for span in finished if span.name == "handle billing"]
    assert len(publishes) == len(handles) == 2
    trace_id = request.context.trace_id
    assert {span.context.trace_id for span in publishes + handles} == {trace_id}
    assert {_parent(span) for span in publishes} == {request.context.span_id}
    assert {_parent(span) for span in handles} == {span.context.span_id for span in publishes}
    for span in handles:
        assert span.attributes is not None
        assert span.attributes["actorbus.event.type"] == "t15.tracing.paid"
        assert span.attributes["actorbus.outcome"] == "handled"
        assert span.attributes["actorbus.attempt"] == 1
        assert str(span.attributes["actorbus.partition"]).startswith("billing#")


async def test_one_trace_runs_through_transact_the_outbox_a_projection_and_a_handler(
    traced: Traced, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    seen: list[Paid] = []

    def project(tx: Any, event: Paid) -> None:
        tx.db["paid"].insert({"n": event.n})

    async with Engine(path, tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=_recorder(seen), name="billing")
        engine.project(Paid, projector=project, name="ledger")
        with traced.tracer.start_as_current_span("request"):
            await engine.transact(lambda tx: tx.publish(Paid(n=7)))
        await engine.idle()
    spans = traced.spans()
    request, transact = spans["request"], spans["transact"]
    handle, projection = spans["handle billing"], spans["project ledger"]
    trace_id = request.context.trace_id
    assert {s.context.trace_id for s in (transact, handle, projection)} == {trace_id}
    assert _parent(transact) == request.context.span_id
    assert _parent(handle) == _parent(projection) == transact.context.span_id
    assert projection.attributes is not None
    assert projection.attributes["actorbus.outbox.seq"] == 1
    assert projection.attributes["actorbus.outcome"] == "applied"
    with sqlite3.connect(path) as conn:
        [(stored,)] = conn.execute("SELECT trace FROM outbox").fetchall()
    assert stored.startswith(f"00-{trace_id:032x}-")


async def test_the_trace_waits_in_the_outbox_across_a_restart(
    traced: Traced, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    async with Engine(path, tracer_provider=traced.provider) as engine:
        with traced.tracer.start_as_current_span("request"):
            await engine.publish(Paid(n=1))  # nobody subscribes in this run
    seen: list[Paid] = []
    async with Engine(path, tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=_recorder(seen), name="late")
        await engine.idle()
    assert [event.n for event in seen] == [1]
    spans = traced.spans()
    assert spans["handle late"].context.trace_id == spans["request"].context.trace_id
    assert _parent(spans["handle late"]) == spans["publish"].context.span_id


async def test_a_projections_replay_is_a_span_of_the_replaying_callers_trace(
    traced: Traced, tmp_path: Path
) -> None:
    """A projection's dead letter replayed: the ``project`` span of the replay is a
    child of the span that asked for it, and says the event was applied."""
    healed = False

    def tally(tx: Any, event: Paid) -> None:
        if not healed:
            raise ValueError(f"cannot tally {event.n}")
        tx.conn.execute("INSERT INTO tally (n) VALUES (?)", (event.n,))

    async with Engine(tmp_path / "app.db", tracer_provider=traced.provider) as engine:
        await engine.transact(lambda tx: tx.conn.execute("CREATE TABLE tally (n INTEGER)"))
        engine.project(Paid, projector=tally, name="tally", max_attempts=1)
        await engine.transact(lambda tx: tx.publish(Paid(n=7)))
        await engine.idle()
        (letter,) = engine.dead_letters.list()
        healed = True
        traced.exporter.clear()
        # The writer is busy when the replay comes: it runs in the writer's batch, not
        # in the caller's thread hop, and still joins the caller's trace.
        holding, gate = threading.Event(), threading.Event()

        def hold(tx: Any) -> None:
            holding.set()
            gate.wait(10)

        async def replay() -> None:
            with traced.tracer.start_as_current_span("operator"):
                await engine.dead_letters.replay(letter.id)

        async with anyio.create_task_group() as tg:
            tg.start_soon(engine.transact, hold)
            await anyio.to_thread.run_sync(holding.wait)
            tg.start_soon(replay)
            with anyio.fail_after(10):
                while pending_writes(engine) < 2:  # noqa: ASYNC110 - queued behind ``hold``
                    await anyio.sleep(0.001)
            gate.set()
        await engine.idle()
        rows = await engine.transact(lambda tx: tx.conn.execute("SELECT n FROM tally").fetchall())
    assert rows == [(7,)]
    spans = traced.spans()
    replayed, operator = spans["project tally"], spans["operator"]
    assert replayed.attributes is not None
    assert replayed.attributes["actorbus.outcome"] == "applied"
    assert _parent(replayed) == operator.context.span_id


async def test_a_dead_letter_is_an_event_on_the_failed_handlers_span(traced: Traced) -> None:
    async def failing(event: Paid) -> None:
        raise ValueError(f"cannot pay {event.n}")

    async with Engine(tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=failing, name="failing", max_attempts=2)
        await engine.publish(Paid(n=3))
        await engine.idle()
    span = traced.spans()["handle failing"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["actorbus.outcome"] == "dead-lettered"
    assert span.attributes["actorbus.attempt"] == 2
    names = [event.name for event in span.events]
    assert names == ["exception", "exception", "actorbus.dead_letter"]


class Cashier(Actor):
    """Fails each event the first ``Cashier.fails[n]`` times it is given it."""

    fails: dict[int, int] = {}  # noqa: RUF012 - the test's shared script
    seen: dict[int, int] = {}  # noqa: RUF012

    async def receive(self, message: Any) -> None:
        n = message.n
        Cashier.seen[n] = Cashier.seen.get(n, 0) + 1
        if Cashier.seen[n] <= Cashier.fails.get(n, 0):
            raise ValueError(f"cannot pay {n}")


async def test_an_actor_handlers_attempts_are_spans_and_the_last_carries_the_dead_letter(
    traced: Traced,
) -> None:
    """An actor handler is restarted between attempts: each attempt is a span of its
    own, with its number and outcome; the last one of a dead-lettered event carries
    the dead letter and fails."""
    Cashier.fails, Cashier.seen = {1: 0, 2: 1, 3: 5}, {}
    async with Engine(tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=Cashier, name="cashier", max_attempts=3)
        with traced.tracer.start_as_current_span("request"):
            for n in (1, 2, 3):
                await engine.publish(Paid(n=n))
        await engine.idle()
    request = traced.spans()["request"]
    assert request.context is not None
    by_event: dict[str, list[tuple[object, object, str, list[str]]]] = {}
    for span in traced.exporter.get_finished_spans():
        if span.name != "handle cashier":
            continue
        assert span.attributes is not None
        assert span.context is not None
        assert span.context.trace_id == request.context.trace_id
        by_event.setdefault(str(span.attributes["actorbus.event.id"]), []).append(
            (
                span.attributes["actorbus.attempt"],
                span.attributes["actorbus.outcome"],
                span.status.status_code.name,
                [event.name for event in span.events],
            )
        )
    assert sorted(by_event.values(), key=len) == [
        [(1, "handled", "UNSET", [])],
        [(1, "failed", "ERROR", ["exception"]), (2, "handled", "UNSET", [])],
        [
            (1, "failed", "ERROR", ["exception"]),
            (2, "failed", "ERROR", ["exception"]),
            (3, "dead-lettered", "ERROR", ["actorbus.dead_letter", "exception"]),
        ],
    ]
    assert engine.dead_letters.count() == 1


async def test_a_breaker_call_is_a_span_of_its_callers_trace(traced: Traced) -> None:
    async def ok() -> str:
        return "ok"

    async def down() -> None:
        raise ConnectionError("down")

    async with Engine(tracer_provider=traced.provider) as engine:
        breaker = engine.breaker("payments", CircuitBreakerConfig(failure_threshold=5))
        await anyio.lowlevel.checkpoint()  # its actor starts
        with traced.tracer.start_as_current_span("request"):
            assert await breaker.call(ok) == "ok"
            with pytest.raises(ConnectionError):
                await breaker.call(down)
    finished = traced.exporter.get_finished_spans()
    request = next(span for span in finished if span.name == "request")
    calls = [span for span in finished if span.name == "breaker payments"]
    assert len(calls) == 2
    assert {_parent(span) for span in calls} == {request.context.span_id}
    assert [span.status.status_code for span in calls] == [StatusCode.UNSET, StatusCode.ERROR]


async def test_without_a_provider_nothing_is_traced_and_events_still_flow(
    traced: Traced,
) -> None:
    seen: list[Paid] = []
    async with Engine() as engine:  # the API's global proxy provider: no SDK
        engine.subscribe(Paid, handler=_recorder(seen), name="plain")
        with traced.tracer.start_as_current_span("request"):
            await engine.publish(Paid(n=1))
        await engine.idle()
    assert [event.n for event in seen] == [1]
    assert [span.name for span in traced.exporter.get_finished_spans()] == ["request"]


async def test_a_stored_trace_that_is_garbage_starts_a_trace_of_its_own(
    traced: Traced, tmp_path: Path
) -> None:
    path = tmp_path / "app.db"
    async with Engine(path):
        pass
    event = Paid(n=9)
    with sqlite3.connect(path) as conn:  # another tool wrote this row
        conn.execute(
            "INSERT INTO outbox (id, type, tenant_id, payload, created_at, trace) "
            "VALUES (?, ?, NULL, ?, 0, ?)",
            (str(event.id), "t15.tracing.paid", encode(event), "00-garbage\n\x1b[2J"),
        )
    seen: list[Paid] = []
    async with Engine(path, tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=_recorder(seen), name="reader")
        await engine.idle()
    assert [e.n for e in seen] == [9]
    span = traced.spans()["handle reader"]
    assert span.parent is None


def test_a_tracer_provider_must_be_one() -> None:
    with pytest.raises(TypeError, match="tracer_provider must be an OpenTelemetry"):
        Engine(tracer_provider=object())


# ------------------------------------------------------------------ a cluster


def _ledger(tx: Any, event: Paid) -> None:
    tx.db["paid"].insert({"n": event.n})


async def test_one_trace_runs_across_two_cluster_nodes(traced: Traced, tmp_path: Path) -> None:
    seen: list[tuple[str, Paid]] = []
    handled = anyio.Event()
    projected = threading.Event()
    traced.provider.add_span_processor(EndOf("project ledger", projected))

    def handler(node: str) -> Any:
        async def handle(event: Paid) -> None:
            seen.append((node, event))
            handled.set()

        return handle

    def node(name: str, server: RedisServer) -> Engine:
        cluster = RedisStreams(server.url, namespace="traced", partitions=2, node=name)
        return Engine(tmp_path / f"{name}.db", cluster=cluster, tracer_provider=traced.provider)

    with RedisServer(redis_server_binary()) as server:
        async with node("a", server) as a, node("b", server) as b:
            b.subscribe(Paid, handler=handler("b"), name="billing", scope="node")
            b.project(Paid, projector=_ledger, name="ledger")
            with traced.tracer.start_as_current_span("request"):
                await a.transact(lambda tx: tx.publish(Paid(n=5)))
            with anyio.fail_after(15):  # through Redis: node b reads what node a forwarded
                await handled.wait()
            # Its projection reads the same entry on its own (idle() does not wait for
            # what Redis has not handed this node yet): its span ends in the writer thread.
            assert await anyio.to_thread.run_sync(projected.wait, 15)
    assert [(name, event.n) for name, event in seen] == [("b", 5)]
    spans = traced.spans()
    trace_id = spans["request"].context.trace_id
    assert spans["handle billing"].context.trace_id == trace_id
    assert _parent(spans["handle billing"]) == spans["transact"].context.span_id
    assert spans["project ledger"].context.trace_id == trace_id


async def test_a_stream_entry_that_does_not_decode_is_a_dead_lettered_span(
    traced: Traced, tmp_path: Path
) -> None:
    """Another tool writes an entry that is no event into a partition's stream, with
    its own trace context: a node's handler and projection dead-letter it, each in a
    span of that trace naming the entry."""
    with RedisServer(redis_server_binary()) as server:
        cluster = RedisStreams(server.url, namespace="traced", partitions=1, node="a")
        async with Engine(tmp_path / "a.db", cluster=cluster, tracer_provider=traced.provider) as a:
            a.subscribe(Paid, handler=_recorder([]), name="billing", scope="node")
            a.project(Paid, projector=_ledger, name="ledger")
            carrier: dict[str, str] = {}
            with traced.tracer.start_as_current_span("stranger"):
                TraceContextTextMapPropagator().inject(carrier)
            client = coredis.Redis.from_url(server.url)
            async with client:
                entry = await client.xadd(
                    "traced:0",
                    {"p": "stranger", "s": "1", "e": "not json", "t": carrier["traceparent"]},
                )
            with anyio.fail_after(15):  # an entry of another producer: idle() does not wait
                while a.dead_letters.count() < 2:  # noqa: ASYNC110 - stored in two places
                    await anyio.sleep(0.01)
    assert entry is not None
    stranger = traced.spans()["stranger"]
    for name in ("handle billing", "project ledger"):
        span = traced.spans()[name]
        assert span.attributes is not None
        assert span.attributes["actorbus.stream.entry"] == entry.decode()
        assert span.attributes["actorbus.outcome"] == "dead-lettered"
        assert span.status.status_code is StatusCode.ERROR
        assert [event.name for event in span.events] == ["exception", "actorbus.dead_letter"]
        assert _parent(span) == stranger.context.span_id


async def test_otel_sdk_disabled_switches_tracing_off(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    seen: list[Paid] = []
    async with Engine(tracer_provider=traced.provider) as engine:
        engine.subscribe(Paid, handler=_recorder(seen), name="quiet")
        await engine.publish(Paid(n=1))
        await engine.idle()
    assert [event.n for event in seen] == [1]
    assert traced.exporter.get_finished_spans() == ()
