"""Property: whatever the mix, every accepted event is handled or dead-lettered, once.

Hypothesis draws subscriptions (function or actor handlers, partitions, overflow
policies, attempts), events, handler failures decided by the payload, publishers
that wait or not, some of them cancelled, and a shutdown that drains or is cut
short. After the engine is left, for every subscription the events it handled and
its dead letters are disjoint, without duplicates, and together are exactly the
accepted events it matches; the depth is back to 0.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from engine import (
    Actor,
    BackpressureConfig,
    BackpressureError,
    Engine,
    Event,
    Overflow,
)

DISPATCHER = "actorbus.dispatcher"


class Fruit(Event, abstract=True):
    n: int


class Apple(Fruit, tag="t4.prop.apple"):
    pass


class Banana(Fruit, tag="t4.prop.banana"):
    pass


TYPES: dict[str, tuple[type[Event], ...]] = {
    "apple": (Apple,),
    "banana": (Banana,),
    "both": (Apple, Banana),
    "event": (Event,),
}
KINDS: dict[str, type[Fruit]] = {"apple": Apple, "banana": Banana}


class Abort(Exception):
    """Leaves the engine block with an error: shutdown without draining."""


class Boom(Exception):
    pass


@dataclasses.dataclass(frozen=True)
class Sub:
    kind: str  # "function" or "actor"
    types: str
    partitions: int
    keyed: bool
    capacity: int
    overflow: Overflow
    max_attempts: int
    fail_every: int  # payload % fail_every == 0: every attempt fails (0: never)
    flaky_every: int  # payload % flaky_every == 0: the first attempt fails (0: never)

    def fails(self, n: int, attempt: int) -> bool:
        if self.fail_every and n % self.fail_every == 0:
            return True
        return bool(self.flaky_every and n % self.flaky_every == 0 and attempt == 1)

    def gives_up(self, n: int) -> bool:
        """Whether an event that reaches the handler ends as a ``failed`` dead letter."""
        return all(self.fails(n, attempt) for attempt in range(1, self.max_attempts + 1))


@dataclasses.dataclass(frozen=True)
class Scenario:
    subs: list[Sub]
    events: list[tuple[str, int, bool]]  # kind, payload, through try_publish
    publishers: int
    cancelled: frozenset[int]
    cancel_after: int  # checkpoints the test lets pass before cancelling
    yield_every: int
    max_depth: int
    abort: bool


@st.composite
def subs(draw: st.DrawFn) -> Sub:
    partitions = draw(st.integers(1, 3))
    return Sub(
        kind=draw(st.sampled_from(["function", "actor"])),
        types=draw(st.sampled_from(sorted(TYPES))),
        partitions=partitions,
        keyed=partitions > 1 and draw(st.booleans()),
        capacity=draw(st.integers(1, 6)),
        overflow=draw(st.sampled_from(list(Overflow))),
        max_attempts=draw(st.integers(1, 3)),
        fail_every=draw(st.sampled_from([0, 0, 7, 11])),
        flaky_every=draw(st.sampled_from([0, 0, 5])),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    publishers = draw(st.integers(1, 4))
    abort = draw(st.booleans())
    return Scenario(
        subs=draw(st.lists(subs(), min_size=1, max_size=3)),
        events=draw(
            st.lists(
                st.tuples(st.sampled_from(sorted(KINDS)), st.integers(0, 99), st.booleans()),
                min_size=10,
                max_size=60,
            )
        ),
        publishers=publishers,
        cancelled=draw(st.frozensets(st.integers(0, publishers - 1), max_size=publishers)),
        cancel_after=draw(st.one_of(st.integers(0, 4), st.integers(0, 60))),
        yield_every=draw(st.sampled_from([1, 2, 4, 8, 16, 64])),
        max_depth=draw(st.sampled_from([10, 10, 20, 100])),
        abort=abort,
    )


class Wrapped(Actor):
    """An actor handler that delegates to the scenario's handler function."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def receive(self, message: Any) -> None:
        await self.handle(message)


@dataclasses.dataclass
class Outcome:
    engine: Engine
    accepted: list[Fruit]
    refused: int
    handled: dict[str, list[Any]]
    position: dict[Any, tuple[int, int]]  # event id -> (publisher, index)


async def play(scenario: Scenario) -> Outcome:
    engine = Engine(backpressure=BackpressureConfig(max_depth=scenario.max_depth))
    handled: dict[str, list[Any]] = collections.defaultdict(list)
    attempts: collections.Counter[tuple[str, Any]] = collections.Counter()

    def handler_for(name: str, sub: Sub) -> Any:
        async def handle(event: Any) -> None:
            attempts[name, event.id] += 1
            # Slower than the publishers, so mailboxes fill and partitions interleave.
            for _ in range(1 + event.n % 3):
                await anyio.lowlevel.checkpoint()
            if sub.fails(event.n, attempts[name, event.id]):
                raise Boom(f"{name} fails on {event.n}")
            handled[name].append(event.id)

        if sub.kind == "function":
            return handle
        return lambda: Wrapped(handle)

    for i, sub in enumerate(scenario.subs):
        engine.subscribe(
            *TYPES[sub.types],
            handler=handler_for(f"s{i}", sub),
            name=f"s{i}",
            capacity=sub.capacity,
            partitions=sub.partitions,
            key=(lambda event: event.n % 4) if sub.keyed else None,
            overflow=sub.overflow,
            max_attempts=sub.max_attempts,
        )

    events = [KINDS[kind](n=n) for kind, n, _ in scenario.events]
    through_try = [via_try for _, _, via_try in scenario.events]
    position = {
        event.id: (i % scenario.publishers, i // scenario.publishers)
        for i, event in enumerate(events)
    }
    accepted: list[Fruit] = []
    refused = 0

    async def publisher(p: int, scope: anyio.CancelScope) -> None:
        nonlocal refused
        with scope:
            for i in range(p, len(events), scenario.publishers):
                if through_try[i]:
                    try:
                        engine.try_publish(events[i])
                    except BackpressureError:
                        refused += 1
                        continue
                else:
                    await engine.publish(events[i])
                accepted.append(events[i])
                if i % scenario.yield_every == 0:
                    await anyio.lowlevel.checkpoint()

    try:
        async with engine:
            async with anyio.create_task_group() as tg:
                scopes = [anyio.CancelScope() for _ in range(scenario.publishers)]
                for p, scope in enumerate(scopes):
                    tg.start_soon(publisher, p, scope)
                if scenario.cancelled or scenario.abort:
                    for _ in range(scenario.cancel_after):
                        await anyio.lowlevel.checkpoint()
                    for p in scenario.cancelled:
                        scopes[p].cancel()
                    if scenario.abort:  # cut short: whoever still publishes stops now
                        tg.cancel_scope.cancel()
            if scenario.abort:
                raise Abort
    except Abort:
        pass
    return Outcome(engine, accepted, refused, handled, position)


def check(scenario: Scenario, outcome: Outcome) -> None:
    engine = outcome.engine
    bp = engine.metrics().backpressure
    assert bp.depth == 0
    assert bp.accepted == len(outcome.accepted)
    assert bp.rejected == outcome.refused
    assert len({event.id for event in outcome.accepted}) == len(outcome.accepted)

    letters = engine.dead_letters.list(limit=100_000)
    assert engine.dead_letters.evicted == 0
    # What the examples exercised (pytest --hypothesis-show-statistics).
    event("shutdown cut short" if scenario.abort else "shutdown drained")
    for reason in sorted({d.reason for d in letters}):
        event(f"dead letters: {reason}")
    if len(outcome.accepted) + outcome.refused < len(scenario.events):
        event("publishers cancelled while waiting")
    if outcome.refused:
        event("try_publish refused")
    if bp.peak_depth >= int(scenario.max_depth * 0.9):
        event("reached CRITICAL")
    # Even what was still in the dispatcher's mailbox is recorded per subscription.
    assert not [d for d in letters if d.actor == DISPATCHER]

    for i, sub in enumerate(scenario.subs):
        name = f"s{i}"
        expected = {e.id for e in outcome.accepted if isinstance(e, TYPES[sub.types])}
        mine = [d for d in letters if d.actor == name]
        dead = [d.message.id for d in mine]
        handled = outcome.handled[name]
        assert len(set(handled)) == len(handled), f"{name} handled an event twice"
        assert len(set(dead)) == len(dead), f"{name} dead-lettered an event twice"
        assert not set(handled) & set(dead), f"{name}: handled and dead-lettered"
        assert set(handled) | set(dead) == expected, f"{name}: events lost"

        for letter in mine:
            n = letter.message.n
            if letter.reason == "failed":
                assert sub.gives_up(n)
                assert letter.attempts == sub.max_attempts
                assert letter.error == f"Boom: {name} fails on {n}"
            elif letter.reason == "dropped":
                assert sub.overflow is not Overflow.BLOCK
            else:
                assert letter.reason == "shutdown"
                assert scenario.abort
        if not scenario.abort and sub.overflow is Overflow.BLOCK:
            # A full drain with nothing dropped: the payload alone decides the fate.
            assert {d.message.id for d in mine} == {
                e.id for e in outcome.accepted if e.id in expected and sub.gives_up(e.n)
            }

        # Order: one partition (or one key) sees each publisher's events in order.
        by_lane: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        events = {e.id: e for e in outcome.accepted}
        for id_ in handled:
            publisher, index = outcome.position[id_]
            if sub.partitions == 1 or sub.keyed:
                by_lane[publisher, events[id_].n % 4 if sub.keyed else 0].append(index)
        for (publisher, key), indexes in by_lane.items():
            assert indexes == sorted(indexes), f"{name}: order broken ({publisher}, {key})"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(scenario=scenarios())
def test_every_accepted_event_is_handled_or_dead_lettered_once_per_subscription(
    backend: str, scenario: Scenario
) -> None:
    async def main() -> Outcome:
        # pytest-timeout cannot interrupt a deadlocked trio run: fail it from inside.
        with anyio.fail_after(20):
            return await play(scenario)

    outcome = anyio.run(main, backend=backend)
    check(scenario, outcome)
