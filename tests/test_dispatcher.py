"""The dispatcher and subscriptions: routing, fan-out, order, partitions, failures, replay.

Backpressure (depth, states, slots) has its own module, ``test_backpressure.py``.
"""

from __future__ import annotations

import collections
import zlib
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID, uuid4

import anyio
import pytest

from engine import (
    Actor,
    ActorState,
    BackpressureConfig,
    BackpressureError,
    Engine,
    EngineError,
    Event,
    EventValidationError,
    ValidationErrorKind,
)
from engine.catalog import OrderPlaced, TagCreated
from tests.helpers import user_actors

pytestmark = pytest.mark.anyio

DISPATCHER = "actorbus.dispatcher"


class Ping(Event, tag="t4.ping"):
    n: int


class Pong(Event, tag="t4.pong"):
    n: int


class LoudPing(Ping, tag="t4.ping.loud"):
    """A subclass: subscriptions to ``Ping`` receive it too."""


class Keyed(Event, tag="t4.keyed"):
    key: str
    n: int


class Abort(Exception):
    """Leaves an engine block with an error: shutdown without draining."""


Handler = Callable[[Any], Awaitable[None]]


def recorder(log: list[Any]) -> Handler:
    async def handle(event: Any) -> None:
        log.append(event)

    return handle


def numbers(events: list[Any]) -> list[int]:
    return [event.n for event in events]


def tag_created() -> TagCreated:
    return TagCreated(tag_id=uuid4())


def order_placed() -> OrderPlaced:
    return OrderPlaced(order_id=uuid4(), total=1250, currency="EUR")


class Journal(Actor):
    """A subscription's actor handler: journals (its partition actor's name, event)."""

    def __init__(self, log: list[tuple[str, Any]]) -> None:
        self.log = log

    async def receive(self, message: Any) -> None:
        self.log.append((self.ref.name, message))


# ------------------------------------------------------------------ routing


async def test_an_event_reaches_every_matching_subscription() -> None:
    logs: dict[str, list[Any]] = {name: [] for name in ("a", "b", "c", "pongs")}
    async with Engine() as engine:
        for name in ("a", "b", "c"):
            engine.subscribe(Ping, handler=recorder(logs[name]), name=name)
        engine.subscribe(Pong, handler=recorder(logs["pongs"]), name="pongs")
        pings = [Ping(n=i) for i in range(3)]
        for ping in pings:
            await engine.publish(ping)
        pong = Pong(n=7)
        engine.try_publish(pong)
    for name in ("a", "b", "c"):
        assert logs[name] == pings
    assert logs["pongs"] == [pong]
    assert engine.dead_letters.count() == 0


async def test_a_subscription_to_event_receives_every_event() -> None:
    everything: list[Any] = []
    async with Engine() as engine:
        engine.subscribe(Event, handler=recorder(everything), name="all")
        published = [Ping(n=1), Pong(n=2), tag_created(), order_placed(), LoudPing(n=3)]
        for event in published:
            await engine.publish(event)
    assert everything == published


async def test_a_subscription_to_several_types_receives_each_of_them_and_nothing_else() -> None:
    log: list[Any] = []
    async with Engine() as engine:
        engine.subscribe(Ping, TagCreated, handler=recorder(log), name="two")
        ping, pong, tag, order = Ping(n=1), Pong(n=2), tag_created(), order_placed()
        for event in (ping, pong, tag, order):
            await engine.publish(event)
    assert log == [ping, tag]


async def test_a_subscription_receives_subclasses_of_its_types() -> None:
    log: list[Any] = []
    loud_only: list[Any] = []
    async with Engine() as engine:
        engine.subscribe(Ping, handler=recorder(log), name="pings")
        engine.subscribe(LoudPing, handler=recorder(loud_only), name="loud")
        ping, loud = Ping(n=1), LoudPing(n=2)
        await engine.publish(ping)
        await engine.publish(loud)
    assert log == [ping, loud]
    assert loud_only == [loud]


async def test_an_event_no_subscription_matches_is_finished_at_once() -> None:
    async with Engine(backpressure=BackpressureConfig(max_depth=100)) as engine:
        engine.subscribe(Pong, handler=recorder([]), name="pongs")
        # Far more than the budget: each unmatched event frees its slot when routed.
        for i in range(1000):
            await engine.publish(Ping(n=i), timeout=10)
        await anyio.wait_all_tasks_blocked()
        bp = engine.metrics().backpressure
        assert (bp.depth, bp.accepted) == (0, 1000)
    assert engine.dead_letters.count() == 0


# ------------------------------------------------------------------ order


@pytest.mark.parametrize("kind", ["function", "actor"])
async def test_a_single_partition_subscription_sees_events_in_publish_order(kind: str) -> None:
    log: list[Any] = []
    journal: list[tuple[str, Any]] = []
    async with Engine(backpressure=BackpressureConfig(max_depth=50)) as engine:
        if kind == "function":
            engine.subscribe(Ping, handler=recorder(log), name="ordered", capacity=3)
        else:
            engine.subscribe(Ping, handler=lambda: Journal(journal), name="ordered", capacity=3)
        with anyio.fail_after(10):  # a leaked slot would block for good
            for i in range(300):
                # Both entries, waiting and not: the order is the order of acceptance.
                if i % 3:
                    await engine.publish(Ping(n=i))
                else:
                    while True:
                        try:
                            engine.try_publish(Ping(n=i))
                            break
                        except BackpressureError:
                            await anyio.wait_all_tasks_blocked()
    if kind == "actor":
        assert {name for name, _ in journal} == {"ordered"}
        log = [event for _, event in journal]
    assert numbers(log) == list(range(300))


async def test_partitions_keep_order_per_key_and_a_key_always_reaches_the_same_actor() -> None:
    journal: list[tuple[str, Any]] = []
    keys = [f"customer-{i}" for i in range(8)]
    async with Engine() as engine:
        ref = engine.subscribe(
            Keyed,
            handler=lambda: Journal(journal),
            name="keyed",
            partitions=4,
            key=lambda event: event.key,
        )
        assert [p.name for p in ref.partitions] == [f"keyed#{i}" for i in range(4)]
        for n in range(400):
            await engine.publish(Keyed(key=keys[n * 7 % len(keys)], n=n))
    by_key: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for partition, event in journal:
        by_key[event.key].append((partition, event.n))
    assert sorted(by_key) == sorted(keys)
    for key, seen in by_key.items():
        assert [n for _, n in seen] == sorted(n for _, n in seen), f"order broken for {key}"
        # A stable hash: crc32 of the UTF-8 key, the same in every process.
        expected = f"keyed#{zlib.crc32(key.encode()) % 4}"
        assert {partition for partition, _ in seen} == {expected}
    assert len(journal) == 400
    assert len({partition for partition, _ in journal}) > 1


async def test_int_and_uuid_keys_pick_the_partition_by_their_value() -> None:
    by_int: list[tuple[str, Any]] = []
    by_uuid: list[tuple[str, Any]] = []
    by_id: list[tuple[str, Any]] = []
    async with Engine() as engine:
        engine.subscribe(
            Ping, handler=lambda: Journal(by_int), name="ints", partitions=4, key=lambda e: e.n
        )
        engine.subscribe(
            Ping,
            handler=lambda: Journal(by_uuid),
            name="uuids",
            partitions=3,
            key=lambda e: UUID(int=e.n + 1),
        )
        # Without a key the event id spreads the events over the partitions.
        engine.subscribe(Ping, handler=lambda: Journal(by_id), name="ids", partitions=4)
        for n in range(40):
            await engine.publish(Ping(n=n))
    assert all(partition == f"ints#{event.n % 4}" for partition, event in by_int)
    assert all(partition == f"uuids#{(event.n + 1) % 3}" for partition, event in by_uuid)
    assert all(partition == f"ids#{event.id.int % 4}" for partition, event in by_id)
    assert len(by_int) == len(by_uuid) == len(by_id) == 40
    assert len({partition for partition, _ in by_id}) > 1


async def test_a_key_function_that_raises_dead_letters_that_event_for_that_subscription() -> None:
    journal: list[tuple[str, Any]] = []
    others: list[Any] = []

    def key(event: Any) -> object:
        if event.n == 3:
            raise LookupError("no key for 3")
        return event.n

    async with Engine() as engine:
        engine.subscribe(Ping, handler=lambda: Journal(journal), name="k", partitions=2, key=key)
        engine.subscribe(Ping, handler=recorder(others), name="others")
        events = [Ping(n=n) for n in range(6)]
        for event in events:
            await engine.publish(event)
    assert sorted(event.n for _, event in journal) == [0, 1, 2, 4, 5]
    assert others == events
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.reason, letter.message) == ("k", "failed", events[3])
    assert letter.error == "LookupError: no key for 3"
    assert engine.metrics().backpressure.depth == 0


# ------------------------------------------------------------ validation


async def test_an_invalid_event_is_refused_before_anything_is_taken_or_dispatched() -> None:
    log: list[Any] = []
    async with Engine() as engine:
        engine.subscribe(Event, handler=recorder(log), name="all")
        nil_tag = TagCreated(tag_id=UUID(int=0))
        wrong_type = Ping(n="three")  # type: ignore[arg-type]
        for bad in (nil_tag, wrong_type):
            with pytest.raises(EventValidationError) as publish_error:
                await engine.publish(bad)
            with pytest.raises(EventValidationError):
                engine.try_publish(bad)
        assert publish_error.value.field == "n"
        with pytest.raises(EventValidationError) as nil_error:
            engine.try_publish(nil_tag)
        assert (nil_error.value.field, nil_error.value.kind) == (
            "tag_id",
            ValidationErrorKind.NIL_UUID,
        )
        for not_an_event in ("ping", {"type": "t4.ping", "n": 1}, Ping):
            with pytest.raises(TypeError, match="Event"):
                await engine.publish(not_an_event)  # type: ignore[arg-type]
            with pytest.raises(TypeError, match="Event"):
                engine.try_publish(not_an_event)  # type: ignore[arg-type]
        bp = engine.metrics().backpressure
        assert (bp.depth, bp.peak_depth, bp.accepted, bp.rejected) == (0, 0, 0, 0)
        good = Ping(n=1)
        await engine.publish(good)
    assert log == [good]
    assert engine.dead_letters.count() == 0


async def test_publishing_outside_the_engine_is_refused() -> None:
    engine = Engine()
    with pytest.raises(EngineError, match="not running"):
        await engine.publish(Ping(n=1))
    with pytest.raises(EngineError, match="not running"):
        engine.try_publish(Ping(n=1))
    async with engine:
        pass
    with pytest.raises(EngineError):
        engine.try_publish(Ping(n=1))
    with pytest.raises(EngineError):
        engine.subscribe(Ping, handler=recorder([]), name="late")
    assert engine.metrics().backpressure.accepted == 0


# ------------------------------------------------------------ failures


async def test_a_failing_function_handler_is_retried_then_dead_lettered_for_it_alone() -> None:
    calls: list[int] = []
    steady: list[Any] = []

    async def flaky(event: Any) -> None:
        calls.append(event.n)
        if event.n == 2:
            raise ValueError("cannot digest 2")

    async with Engine() as engine:
        engine.subscribe(Ping, handler=flaky, name="flaky", max_attempts=3)
        engine.subscribe(Ping, handler=recorder(steady), name="steady")
        events = [Ping(n=n) for n in range(5)]
        for event in events:
            await engine.publish(event)
    # Retried in place: the events after it wait, so the order holds.
    assert calls == [0, 1, 2, 2, 2, 3, 4]
    assert steady == events
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.message, letter.reason, letter.attempts) == (
        "flaky",
        events[2],
        "failed",
        3,
    )
    assert letter.error == "ValueError: cannot digest 2"
    assert letter.traceback is not None
    assert "cannot digest 2" in letter.traceback
    assert engine.metrics().backpressure.depth == 0


async def test_a_function_handler_that_succeeds_on_a_retry_handles_the_event_once() -> None:
    attempts: collections.Counter[int] = collections.Counter()
    handled: list[int] = []

    async def second_time_lucky(event: Any) -> None:
        attempts[event.n] += 1
        if event.n % 2 and attempts[event.n] == 1:
            raise ConnectionError("try again")
        handled.append(event.n)

    async with Engine() as engine:
        engine.subscribe(Ping, handler=second_time_lucky, name="lucky", max_attempts=2)
        for n in range(6):
            await engine.publish(Ping(n=n))
    assert handled == list(range(6))
    assert attempts == {0: 1, 1: 2, 2: 1, 3: 2, 4: 1, 5: 2}
    assert engine.dead_letters.count() == 0


async def test_max_attempts_one_dead_letters_on_the_first_failure() -> None:
    calls: list[int] = []

    async def fails(event: Any) -> None:
        calls.append(event.n)
        raise RuntimeError("no")

    async with Engine() as engine:
        engine.subscribe(Ping, handler=fails, name="once", max_attempts=1)
        await engine.publish(Ping(n=1))
    assert calls == [1]
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.reason, letter.attempts) == ("once", "failed", 1)


class Fragile(Actor):
    """An actor handler failing on ``n == 2``; counts its instances."""

    instances = 0

    def __init__(self, seen: list[tuple[int, int]]) -> None:
        type(self).instances += 1
        self.instance = type(self).instances
        self.seen = seen

    async def receive(self, message: Any) -> None:
        self.seen.append((self.instance, message.n))
        if message.n == 2:
            raise ValueError("fragile")


async def test_a_failing_actor_handler_is_restarted_and_retried_then_dead_lettered() -> None:
    Fragile.instances = 0
    seen: list[tuple[int, int]] = []
    others: list[Any] = []
    async with Engine() as engine:
        ref = engine.subscribe(Ping, handler=lambda: Fragile(seen), name="fragile")
        engine.subscribe(Ping, handler=recorder(others), name="others")
        events = [Ping(n=n) for n in range(4)]
        for event in events:
            await engine.publish(event)
        # Retrying the same event on a fresh instance each time, then moving on.
        with anyio.fail_after(5):
            while len(seen) < 6:
                await anyio.wait_all_tasks_blocked()
        await anyio.wait_all_tasks_blocked()
        [stats] = ref.statistics()
        assert (stats.name, stats.failed, stats.restarts) == ("fragile", 3, 3)
        assert engine.metrics().backpressure.depth == 0
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 2), (3, 2), (4, 3)]
    assert others == events
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.message, letter.reason, letter.attempts) == (
        "fragile",
        events[2],
        "failed",
        3,
    )


async def test_replay_redelivers_a_dead_letter_to_its_subscription_only() -> None:
    broken = True
    handled: list[Any] = []
    steady: list[Any] = []

    async def sometimes(event: Any) -> None:
        if broken:
            raise OSError("disk full")
        handled.append(event)

    async with Engine() as engine:
        engine.subscribe(Ping, handler=sometimes, name="sometimes", max_attempts=1)
        engine.subscribe(Ping, handler=recorder(steady), name="steady")
        event = Ping(n=1)
        await engine.publish(event)
        with anyio.fail_after(5):
            while engine.dead_letters.count() == 0:
                await anyio.wait_all_tasks_blocked()
        [letter] = engine.dead_letters.list()
        assert letter.actor == "sometimes"
        broken = False
        await engine.dead_letters.replay(letter.id)
        assert engine.dead_letters.count() == 0
        with anyio.fail_after(5):
            while not handled:
                await anyio.wait_all_tasks_blocked()
        await anyio.wait_all_tasks_blocked()
        bp = engine.metrics().backpressure
        # The replay took (and gave back) a slot of its own.
        assert (bp.depth, bp.accepted) == (0, 2)
    assert handled == [event]
    assert steady == [event]


# ------------------------------------------------------------ lifecycle


async def test_a_subscription_made_before_start_begins_with_the_engine() -> None:
    log: list[Any] = []
    engine = Engine()
    ref = engine.subscribe(Ping, handler=recorder(log), name="early", partitions=2)
    assert ref.name == "early"
    assert ref.event_types == (Ping,)
    assert ref.partitions == []
    async with engine:
        assert [p.name for p in ref.partitions] == ["early#0", "early#1"]
        assert "subscription:early" in engine.root.children
        events = [Ping(n=n) for n in range(10)]
        for event in events:
            await engine.publish(event)
    assert sorted(numbers(log)) == list(range(10))


async def test_a_subscription_made_while_running_gets_the_events_published_after_it() -> None:
    log: list[Any] = []
    async with Engine() as engine:
        await engine.publish(Ping(n=0))
        await anyio.wait_all_tasks_blocked()
        engine.subscribe(Ping, handler=recorder(log), name="late")
        # No yield in between: the new subscription already takes this one.
        engine.try_publish(Ping(n=1))
        await engine.publish(Ping(n=2))
    assert numbers(log) == [1, 2]


async def test_metrics_cover_the_dispatcher_and_every_partition_actor() -> None:
    async with Engine(backpressure=BackpressureConfig(max_depth=500)) as engine:
        ref = engine.subscribe(Ping, handler=recorder([]), name="m", partitions=3, capacity=7)
        engine.subscribe(Pong, handler=recorder([]), name="single", capacity=9)
        for n in range(30):
            await engine.publish(Ping(n=n))
        await engine.publish(Pong(n=0))
        await anyio.wait_all_tasks_blocked()
        actors = engine.metrics().actors
        assert set(user_actors(engine)) == {"m#0", "m#1", "m#2", "single"}
        dispatcher = actors[DISPATCHER]
        assert (dispatcher.capacity, dispatcher.processed, dispatcher.depth) == (500, 31, 0)
        partitions = [actors[f"m#{i}"] for i in range(3)]
        assert [s.capacity for s in partitions] == [7, 7, 7]
        assert sum(s.processed for s in partitions) == 30
        assert all(s.state is ActorState.RUNNING and s.failed == 0 for s in partitions)
        assert ref.statistics() == partitions
        assert (actors["single"].capacity, actors["single"].processed) == (9, 1)
        assert engine.root.children == [DISPATCHER, "subscription:m", "subscription:single"]


# ------------------------------------------------------------ shutdown


async def test_shutdown_dead_letters_queued_and_running_deliveries_for_their_subscription() -> None:
    gate = anyio.Event()
    entered = anyio.Event()

    async def stuck(event: Any) -> None:
        entered.set()
        await gate.wait()

    with pytest.raises(Abort):
        async with Engine() as engine:
            engine.subscribe(Ping, handler=stuck, name="stuck")
            events = [Ping(n=n) for n in range(5)]
            for event in events:
                await engine.publish(event)
            with anyio.fail_after(10):
                await entered.wait()
            await anyio.wait_all_tasks_blocked()
            assert engine.metrics().backpressure.depth == 5
            raise Abort
    letters = engine.dead_letters.list()
    assert [(d.actor, d.reason) for d in letters] == [("stuck", "shutdown")] * 5
    assert sorted(numbers([d.message for d in letters])) == list(range(5))
    assert engine.metrics().backpressure.depth == 0


async def test_events_left_in_the_dispatcher_at_shutdown_are_dead_lettered_per_subscription() -> (
    None
):
    gate = anyio.Event()

    async def stuck(event: Any) -> None:
        await gate.wait()

    with pytest.raises(Abort):
        async with Engine(backpressure=BackpressureConfig(max_depth=1000)) as engine:
            engine.subscribe(Ping, handler=stuck, name="a", capacity=1)
            engine.subscribe(Ping, handler=stuck, name="b", capacity=1)
            for n in range(300):
                engine.try_publish(Ping(n=n))
            await anyio.wait_all_tasks_blocked()
            # Most events have not left the dispatcher: its mailbox holds them.
            assert engine.actor(DISPATCHER).statistics().depth > 200
            raise Abort
    assert engine.metrics().backpressure.depth == 0
    per_actor = collections.Counter(d.actor for d in engine.dead_letters.list(limit=10_000))
    assert per_actor == {"a": 300, "b": 300}


# ------------------------------------------------------------ arguments


async def handle_nothing(event: Any) -> None:
    pass


BAD_SUBSCRIBE = {
    "no types": ((), {}, ValueError, "event type"),
    "int type": ((int,), {}, TypeError, "Event subclasses"),
    "an event, not its class": ((Ping(n=1),), {}, TypeError, "Event subclasses"),
    "a tag, not a class": ((Ping, "t4.pong"), {}, TypeError, "Event subclasses"),
    "handler None": ((Ping,), {"handler": None}, TypeError, "handler"),
    "handler 42": ((Ping,), {"handler": 42}, TypeError, "handler"),
    "blank name": ((Ping,), {"name": ""}, ValueError, "name"),
    "int name": ((Ping,), {"name": 7}, TypeError, "name"),
    "partitions 0": ((Ping,), {"partitions": 0}, ValueError, "partitions must be >= 1, got 0"),
    "partitions 2.0": ((Ping,), {"partitions": 2.0}, TypeError, "partitions"),
    "capacity 0": ((Ping,), {"capacity": 0}, ValueError, "capacity must be >= 1, got 0"),
    "capacity True": ((Ping,), {"capacity": True}, TypeError, "capacity"),
    "key a str": ((Ping,), {"key": "n"}, TypeError, "key"),
    "overflow a str": ((Ping,), {"overflow": "block"}, ValueError, "overflow"),
    "max_attempts 0": (
        (Ping,),
        {"max_attempts": 0},
        ValueError,
        "max_attempts must be >= 1, got 0",
    ),
    "max_attempts None": ((Ping,), {"max_attempts": None}, TypeError, "max_attempts"),
}


@pytest.mark.parametrize("when", ["before start", "running"])
@pytest.mark.parametrize(
    ("types", "changes", "error", "match"), BAD_SUBSCRIBE.values(), ids=BAD_SUBSCRIBE.keys()
)
async def test_bad_subscribe_arguments_are_refused_at_the_call_naming_the_argument(
    when: str,
    types: tuple[Any, ...],
    changes: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    kwargs: dict[str, Any] = {"handler": handle_nothing, "name": "s", **changes}
    engine = Engine()
    if when == "before start":
        with pytest.raises(error, match=match):
            engine.subscribe(*types, **kwargs)
    async with engine:
        if when == "running":
            with pytest.raises(error, match=match):
                engine.subscribe(*types, **kwargs)
        assert user_actors(engine) == {}
        assert engine.root.children == [DISPATCHER]
        # Nothing half-registered: the same name is still free.
        log: list[Any] = []
        engine.subscribe(Ping, handler=recorder(log), name="s")
        await engine.publish(Ping(n=1))
    assert numbers(log) == [1]


@pytest.mark.parametrize("when", ["before start", "running"])
async def test_a_duplicate_subscription_name_is_refused(when: str) -> None:
    engine = Engine()
    if when == "before start":
        engine.subscribe(Ping, handler=handle_nothing, name="dup")
        with pytest.raises(ValueError, match="'dup'"):
            engine.subscribe(Pong, handler=handle_nothing, name="dup")
    async with engine:
        if when == "running":
            engine.subscribe(Ping, handler=handle_nothing, name="dup")
            with pytest.raises(ValueError, match="'dup'"):
                engine.subscribe(Pong, handler=handle_nothing, name="dup")
        assert set(user_actors(engine)) == {"dup"}


async def test_a_subscription_name_taken_by_a_running_actor_is_refused() -> None:
    async with Engine() as engine:
        engine.subscribe(Ping, handler=handle_nothing, name="p", partitions=2)
        for taken in ("p#1", DISPATCHER, "subscription:p"):
            with pytest.raises(ValueError, match=repr(taken)):
                engine.subscribe(Ping, handler=handle_nothing, name=taken)
        assert set(user_actors(engine)) == {"p#0", "p#1"}


@pytest.mark.parametrize("taken", ["p#1", DISPATCHER, "subscription:p"])
async def test_before_start_a_name_clash_is_refused_at_the_subscribe_call(taken: str) -> None:
    engine = Engine()
    engine.subscribe(Ping, handler=handle_nothing, name="p", partitions=2)
    with pytest.raises(ValueError, match=repr(taken)):
        engine.subscribe(Ping, handler=handle_nothing, name=taken)
    async with engine:
        assert set(user_actors(engine)) == {"p#0", "p#1"}


@pytest.mark.parametrize("when", ["before start", "running"])
async def test_a_sync_function_handler_is_refused_at_the_call_and_registers_nothing(
    when: str,
) -> None:
    def on_event(event: Any) -> None:
        pass

    engine = Engine()
    if when == "before start":
        with pytest.raises(TypeError, match=r"\bhandler\b"):
            engine.subscribe(Ping, handler=on_event, name="sync")  # type: ignore[arg-type]
    async with engine:
        if when == "running":
            # \b: the test's own name, in on_event's qualname, contains "handler" too.
            with pytest.raises(TypeError, match=r"\bhandler\b"):
                engine.subscribe(Ping, handler=on_event, name="sync")  # type: ignore[arg-type]
        assert engine.root.children == [DISPATCHER]
        engine.subscribe(Ping, handler=handle_nothing, name="sync")
