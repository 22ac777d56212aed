"""Leaving ``async with Engine()``: drain, stop order, errors, interrupts, cancellation.

Also the dead-letter store (what shutdown leaves behind) and running the engine
from plain asyncio and trio programs rather than through the pytest plugin.
"""

from __future__ import annotations

import asyncio
import functools
import json
import pathlib
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest
import trio
import trio.testing

from engine import (
    Actor,
    ActorRef,
    ActorState,
    ActorStopped,
    Backoff,
    Engine,
    EngineError,
    Overflow,
)
from tests.helpers import user_actors

pytestmark = pytest.mark.anyio

NO_BACKOFF = Backoff(initial=0, maximum=0, jitter=0)


class Journal(Actor):
    """Journals ``name:message`` per message and ``name:stop`` on stop.

    With a ``gate`` each message waits for it to open (``entered`` is set first),
    which keeps a message in progress and the rest of the mailbox queued.
    """

    def __init__(
        self,
        journal: list[str],
        name: str,
        gate: anyio.Event | None = None,
        entered: anyio.Event | None = None,
    ) -> None:
        self.journal = journal
        self.name = name
        self.gate = gate
        self.entered = entered

    async def receive(self, message: Any) -> Any:
        if self.entered is not None:
            self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        self.journal.append(f"{self.name}:{message}")
        return message

    async def on_stop(self) -> None:
        self.journal.append(f"{self.name}:stop")


class Forwarder(Journal):
    """A Journal that passes every message on to ``targets[0]`` (filled in later)."""

    def __init__(
        self,
        journal: list[str],
        name: str,
        targets: list[ActorRef[Any]],
        gate: anyio.Event | None = None,
        entered: anyio.Event | None = None,
    ) -> None:
        super().__init__(journal, name, gate, entered)
        self.targets = targets

    async def receive(self, message: Any) -> Any:
        await super().receive(message)
        await self.targets[0].tell(f"from {self.name} {message}")


def entries(journal: list[str], name: str) -> list[str]:
    return [entry for entry in journal if entry.startswith(f"{name}:")]


def running_task_ids() -> set[int]:
    return {task.id for task in anyio.get_running_tasks()}


# ------------------------------------------------------------------ drain


async def test_normal_exit_handles_every_accepted_message_before_on_stop() -> None:
    journal: list[str] = []
    gate = anyio.Event()
    entered = anyio.Event()
    replies: list[Any] = []

    async def ask_from_outside(ref: ActorRef[Any]) -> None:
        replies.append(await ref.ask("asked", timeout=None))

    async def open_gate_once_the_engine_waits_for_the_drain() -> None:
        await anyio.wait_all_tasks_blocked()
        gate.set()

    async with anyio.create_task_group() as outside, Engine() as engine:
        ref = await engine.spawn(lambda: Journal(journal, "j", gate, entered), name="j")
        ref.try_tell("first")
        await entered.wait()
        for i in range(5):
            ref.try_tell(i)
        outside.start_soon(ask_from_outside, ref)
        await anyio.wait_all_tasks_blocked()
        assert ref.statistics().depth == 6
        outside.start_soon(open_gate_once_the_engine_waits_for_the_drain)
    assert journal == ["j:first", "j:0", "j:1", "j:2", "j:3", "j:4", "j:asked", "j:stop"]
    assert replies == ["asked"]
    assert engine.dead_letters.count() == 0
    assert engine.metrics().in_flight == 0
    assert user_actors(engine) == {}
    assert ref.statistics().state is ActorState.STOPPED


async def test_in_flight_counts_queued_and_in_progress_messages_then_returns_to_zero() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal([], "j", gate, entered), name="j")
        assert engine.metrics().in_flight == 0
        ref.try_tell("in progress")
        await entered.wait()
        ref.try_tell("queued")
        counted = engine.metrics().in_flight
        gate.set()
        await ref.ask("sync")
        assert engine.metrics().in_flight == 0
    assert engine.metrics().in_flight == 0
    assert counted == 2


async def test_a_burst_told_just_before_exit_is_handled_in_full() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        refs = [await engine.spawn(functools.partial(Journal, journal, n), name=n) for n in "abc"]
        for i in range(200):
            for ref in refs:
                await ref.tell(i)
    for n in "abc":
        assert entries(journal, n) == [*(f"{n}:{i}" for i in range(200)), f"{n}:stop"]
    assert engine.dead_letters.count() == 0
    assert engine.metrics().in_flight == 0


async def test_drain_refuses_work_from_outside_while_actors_keep_messaging_each_other() -> None:
    journal: list[str] = []
    gate = anyio.Event()
    entered = anyio.Event()
    refusals: list[tuple[str, BaseException]] = []
    targets: list[ActorRef[Any]] = []

    async with anyio.create_task_group() as outside, Engine() as engine:
        b = await engine.spawn(lambda: Journal(journal, "b"), name="b")
        targets.append(b)
        a = await engine.spawn(lambda: Forwarder(journal, "a", targets, gate, entered), name="a")
        a.try_tell(1)
        await entered.wait()
        a.try_tell(2)

        async def try_tell() -> None:
            b.try_tell("outside")

        attempts: dict[str, Callable[[], Awaitable[object]]] = {
            "tell": lambda: b.tell("outside"),
            "try_tell": try_tell,
            "ask": lambda: a.ask("outside"),
            "spawn": lambda: engine.spawn(lambda: Journal(journal, "late"), name="late"),
            "supervisor": lambda: engine.supervisor("late-sup"),
        }

        async def work_from_outside_during_the_drain() -> None:
            # Everything else waits: a on its gate, the engine on the drain.
            await anyio.wait_all_tasks_blocked()
            for what, attempt in attempts.items():
                try:
                    await attempt()
                except EngineError as exc:
                    refusals.append((what, exc))
            gate.set()

        outside.start_soon(work_from_outside_during_the_drain)

    assert [what for what, _ in refusals] == list(attempts)
    for _, exc in refusals:
        assert type(exc) is EngineError
        assert "shutting down" in str(exc)
    assert entries(journal, "a") == ["a:1", "a:2", "a:stop"]
    assert entries(journal, "b") == ["b:from a 1", "b:from a 2", "b:stop"]
    # on_stop in reverse start order, after the drain.
    assert journal[-2:] == ["a:stop", "b:stop"]
    assert engine.dead_letters.count() == 0
    assert engine.metrics().in_flight == 0
    assert user_actors(engine) == {}


async def test_on_stop_runs_in_reverse_start_order_across_nested_supervisors() -> None:
    journal: list[str] = []

    def journal_(name: str) -> Callable[[], Actor]:
        return lambda: Journal(journal, name)

    async with Engine() as engine:
        await engine.spawn(journal_("a1"), name="a1")
        sup1 = await engine.supervisor("sup1")
        await sup1.spawn(journal_("s1a"), name="s1a")
        await sup1.spawn(journal_("s1b"), name="s1b")
        sup2 = await sup1.supervisor("sup2")
        await sup2.spawn(journal_("s2a"), name="s2a")
        await sup2.spawn(journal_("s2b"), name="s2b")
        await sup1.spawn(journal_("s1c"), name="s1c")
        await engine.spawn(journal_("a2"), name="a2")
        assert engine.root.children == ["actorbus.dispatcher", "a1", "sup1", "a2"]
        assert sup1.children == ["s1a", "s1b", "sup2", "s1c"]
    assert journal == [
        "a2:stop",
        "s1c:stop",
        "s2b:stop",
        "s2a:stop",
        "s1b:stop",
        "s1a:stop",
        "a1:stop",
    ]
    assert user_actors(engine) == {}


# --------------------------------------------------- errors and interrupts


async def test_error_in_the_body_propagates_unchanged_after_actors_stop() -> None:
    journal: list[str] = []
    gate = anyio.Event()
    entered = anyio.Event()
    pending_asks: list[BaseException] = []
    cause = KeyError("the cause")
    error = ValueError("bad input")
    error.__cause__ = cause

    async def ask_from_outside(ref: ActorRef[Any]) -> None:
        try:
            await ref.ask("asked", timeout=None)
        except ActorStopped as exc:
            pending_asks.append(exc)

    raised: list[BaseException] = []
    async with anyio.create_task_group() as outside:
        try:
            async with Engine() as engine:
                idle = await engine.spawn(lambda: Journal(journal, "idle"), name="idle")
                busy = await engine.spawn(
                    lambda: Journal(journal, "busy", gate, entered), name="busy"
                )
                busy.try_tell("in progress")
                await entered.wait()
                busy.try_tell("queued")
                outside.start_soon(ask_from_outside, busy)
                await anyio.wait_all_tasks_blocked()
                raise error
        except ValueError as exc:
            raised.append(exc)
    # The very same exception: not wrapped in a group, cause kept.
    assert raised == [error]
    assert raised[0].__cause__ is cause
    assert journal == ["busy:stop", "idle:stop"]
    assert [(d.actor, d.message, d.reason) for d in engine.dead_letters.list()] == [
        ("busy", "in progress", "shutdown"),
        ("busy", "queued", "shutdown"),
        ("busy", "asked", "shutdown"),
    ]
    assert len(pending_asks) == 1
    assert engine.metrics().in_flight == 0
    assert user_actors(engine) == {}
    assert idle.statistics().state is ActorState.STOPPED


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
async def test_interrupt_in_the_body_is_not_swallowed(
    interrupt: type[BaseException],
) -> None:
    journal: list[str] = []
    with pytest.raises(interrupt) as info:
        async with Engine() as engine:
            ref = await engine.spawn(lambda: Journal(journal, "j"), name="j")
            await ref.ask("hello")
            raise interrupt()
    assert type(info.value) is interrupt
    assert journal == ["j:hello", "j:stop"]
    assert user_actors(engine) == {}
    assert engine.metrics().in_flight == 0


async def test_cancellation_from_outside_is_not_swallowed_and_leaves_nothing_running() -> None:
    journal: list[str] = []
    before = running_task_ids()
    reached_the_end_of_the_body = False
    with anyio.CancelScope() as scope:
        async with Engine() as engine:
            idle = await engine.spawn(lambda: Journal(journal, "idle"), name="idle")
            stuck = await engine.spawn(lambda: Journal(journal, "stuck", anyio.Event()), name="s")
            stuck.try_tell("in progress")
            stuck.try_tell("queued")
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            await anyio.sleep_forever()
            reached_the_end_of_the_body = True
    assert scope.cancelled_caught
    assert not reached_the_end_of_the_body
    assert running_task_ids() == before
    assert user_actors(engine) == {}
    assert engine.metrics().in_flight == 0
    for ref in (idle, stuck):
        assert ref.statistics().state is ActorState.STOPPED
        with pytest.raises(ActorStopped):
            await ref.tell("after")
    # Nothing accepted is lost: both messages are dead letters.
    assert [d.message for d in engine.dead_letters.list()] == ["in progress", "queued"]


async def test_cancellation_by_an_outside_task_is_not_swallowed() -> None:
    journal: list[str] = []
    before = running_task_ids()
    scope = anyio.CancelScope()
    ready = anyio.Event()

    async def cancel_once_everything_waits() -> None:
        await ready.wait()
        await anyio.wait_all_tasks_blocked()
        scope.cancel()

    async with anyio.create_task_group() as outside:
        outside.start_soon(cancel_once_everything_waits)
        with scope:
            async with Engine() as engine:
                ref = await engine.spawn(lambda: Journal(journal, "j"), name="j")
                await ref.ask("hello")
                ready.set()
                await anyio.sleep_forever()
    assert scope.cancelled_caught
    assert running_task_ids() == before
    assert user_actors(engine) == {}
    assert ref.statistics().state is ActorState.STOPPED


async def test_cancellation_from_outside_still_stops_actors_like_a_shutdown() -> None:
    journal: list[str] = []
    with anyio.CancelScope() as scope:
        async with Engine() as engine:
            await engine.spawn(lambda: Journal(journal, "idle"), name="idle")
            stuck = await engine.spawn(lambda: Journal(journal, "stuck", anyio.Event()), name="s")
            stuck.try_tell("in progress")
            stuck.try_tell("queued")
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    # DESIGN.md, Supervision: every instance whose on_start finished gets on_stop;
    # what could not finish is dead-lettered with reason "shutdown".
    assert sorted(journal) == ["idle:stop", "stuck:stop"]
    assert [(d.message, d.reason) for d in engine.dead_letters.list()] == [
        ("in progress", "shutdown"),
        ("queued", "shutdown"),
    ]


# ------------------------------------------------------------- after exit


async def test_an_engine_cannot_be_entered_twice() -> None:
    engine = Engine()
    async with engine:
        with pytest.raises(EngineError, match="only once"):
            await engine.__aenter__()
        await engine.spawn(lambda: Journal([], "j"), name="j")
    with pytest.raises(EngineError, match="only once"):
        await engine.__aenter__()


async def test_work_after_exit_is_refused() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(journal, "j"), name="j")
        sup = await engine.supervisor("sup")
        child = await sup.spawn(lambda: Journal(journal, "child"), name="child")
    with pytest.raises(EngineError, match="not running"):
        await engine.spawn(lambda: Journal(journal, "late"), name="late")
    with pytest.raises(EngineError, match="not running"):
        await engine.supervisor("late-sup")
    with pytest.raises((EngineError, ActorStopped)):
        await sup.spawn(lambda: Journal(journal, "late"), name="late")
    with pytest.raises((EngineError, ActorStopped)):
        await sup.supervisor("late-sup")
    for target in (ref, child):
        with pytest.raises(ActorStopped):
            await target.tell("late")
        with pytest.raises(ActorStopped):
            target.try_tell("late")
        with pytest.raises(ActorStopped):
            await target.ask("late")
        await target.stop()  # a no-op, not an error
    assert user_actors(engine) == {}
    assert engine.metrics().in_flight == 0
    assert engine.dead_letters.count() == 0
    assert journal == ["child:stop", "j:stop"]


# ------------------------------------------------------------ dead letters


class Flaky(Actor):
    """Fails every message while ``healthy[0]`` is false."""

    def __init__(self, journal: list[str], healthy: list[bool]) -> None:
        self.journal = journal
        self.healthy = healthy

    async def receive(self, message: Any) -> Any:
        if not self.healthy[0]:
            raise ValueError(f"cannot handle {message!r} yet")
        self.journal.append(message)
        return message


async def test_a_dead_letter_is_replayed_to_its_actor_and_leaves_the_store() -> None:
    journal: list[str] = []
    healthy = [False]
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=NO_BACKOFF)
        ref = await sup.spawn(lambda: Flaky(journal, healthy), name="flaky", max_attempts=1)
        with pytest.raises(ValueError, match="cannot handle 'order-1'"):
            await ref.ask("order-1")
        with pytest.raises(ValueError, match="cannot handle 'order-2'"):
            await ref.ask("order-2")
        first, second = engine.dead_letters.list()
        assert (first.actor, first.message, first.reason) == ("flaky", "order-1", "failed")
        healthy[0] = True
        await engine.dead_letters.replay(first.id)
        assert engine.dead_letters.list() == [second]
        await ref.ask("sync")
        assert journal == ["order-1", "sync"]
        with pytest.raises(KeyError):
            await engine.dead_letters.replay(first.id)
    assert engine.metrics().in_flight == 0


async def test_replay_to_a_stopped_actor_raises_and_keeps_the_letter() -> None:
    journal: list[str] = []
    gate = anyio.Event()
    entered = anyio.Event()
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(journal, "j", gate, entered), name="j")
        ref.try_tell("in progress")
        await entered.wait()
        ref.try_tell("queued")
        async with anyio.create_task_group() as tg:
            tg.start_soon(ref.stop)
            await anyio.wait_all_tasks_blocked()
            gate.set()
        (letter,) = engine.dead_letters.list()
        assert (letter.message, letter.reason) == ("queued", "stopped")
        with pytest.raises(ActorStopped, match="'j'"):
            await engine.dead_letters.replay(letter.id)
        assert engine.dead_letters.list() == [letter]
    # After exit the actor is gone for good too.
    with pytest.raises(ActorStopped):
        await engine.dead_letters.replay(letter.id)
    assert engine.dead_letters.list() == [letter]


async def test_purge_returns_the_count_and_list_respects_its_limit() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Journal([], "j", gate, entered),
            name="j",
            capacity=1,
            overflow=Overflow.DROP_NEWEST,
        )
        ref.try_tell("in progress")
        await entered.wait()
        ref.try_tell("queued")
        for i in range(5):
            ref.try_tell(i)
        assert engine.dead_letters.count() == 5
        assert [d.message for d in engine.dead_letters.list(limit=2)] == [0, 1]
        assert [d.message for d in engine.dead_letters.list(limit=5)] == [0, 1, 2, 3, 4]
        assert [d.message for d in engine.dead_letters.list(limit=50)] == [0, 1, 2, 3, 4]
        assert engine.dead_letters.list(limit=0) == []
        assert {d.reason for d in engine.dead_letters.list()} == {"dropped"}
        assert engine.dead_letters.purge() == 5
        assert engine.dead_letters.count() == 0
        assert engine.dead_letters.list() == []
        assert engine.dead_letters.purge() == 0
        gate.set()
    assert engine.metrics().dead_letters == 0
    assert engine.metrics().dead_letters_total == 5


async def test_the_dead_letter_store_is_bounded_and_counts_evictions() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    async with Engine(dead_letter_limit=3) as engine:
        ref = await engine.spawn(
            lambda: Journal([], "j", gate, entered),
            name="j",
            capacity=1,
            overflow=Overflow.DROP_NEWEST,
        )
        ref.try_tell("in progress")
        await entered.wait()
        ref.try_tell("queued")
        for i in range(5):
            ref.try_tell(i)
        assert engine.dead_letters.count() == 3
        assert engine.dead_letters.evicted == 2
        # The newest are kept.
        assert [d.message for d in engine.dead_letters.list()] == [2, 3, 4]
        metrics = engine.metrics()
        assert (metrics.dead_letters, metrics.dead_letters_total) == (3, 5)
        gate.set()


# --------------------------------------------- plain asyncio and trio programs


async def count_to_three_and_leave() -> list[str]:
    journal: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(journal, "j"), name="j")
        for i in range(3):
            await ref.tell(i)
        assert await ref.ask("last") == "last"
    assert user_actors(engine) == {}
    return journal


EXPECTED = ["j:0", "j:1", "j:2", "j:last", "j:stop"]


def test_engine_runs_inside_a_plain_asyncio_program() -> None:
    assert asyncio.run(count_to_three_and_leave()) == EXPECTED


def test_engine_runs_inside_a_plain_trio_program() -> None:
    assert trio.run(count_to_three_and_leave) == EXPECTED


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_engine_runs_under_anyio_run(backend: str) -> None:
    assert anyio.run(count_to_three_and_leave, backend=backend) == EXPECTED


# ------------------------------------ interrupts raised by an actor's receive

# Each case runs in a fresh interpreter: on asyncio an interrupt raised inside a
# task leaves through the event loop itself (asyncio re-raises KeyboardInterrupt
# and SystemExit out of the loop), which would abort the pytest process or leave
# it in a broken state. The script prints what happened as JSON.
INTERRUPT_PROGRAM = """
import asyncio, json, sys
import anyio, trio
from engine import Actor, Engine

runner, interrupt_name, mode = sys.argv[1:]
interrupt = {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[interrupt_name]
calls = []
seen = []
engines = []

class Interrupting(Actor):
    async def receive(self, message):
        calls.append(message)
        if message == "interrupt":
            raise interrupt()
        return message

async def program():
    try:
        async with Engine() as engine:
            engines.append(engine)
            ref = await engine.spawn(Interrupting, name="i", max_attempts=3)
            await ref.ask("before")
            if mode == "ask":
                await ref.ask("interrupt")
            else:
                await ref.tell("interrupt")
                await anyio.sleep_forever()
    except BaseException as exc:
        seen.append(type(exc).__name__)
        raise

try:
    if runner == "asyncio":
        asyncio.run(program())
    else:
        trio.run(program)
    raised = None
except BaseException as exc:
    raised = type(exc).__name__
engine = engines[0]
print(json.dumps({
    "raised": raised,
    "seen": seen,
    "calls": calls,
    "reasons": [d.reason for d in engine.dead_letters.list()],
    "actors": [n for n in engine.metrics().actors if not n.startswith("actorbus.")],
}))
"""


def run_interrupt_program(runner: str, interrupt: str, mode: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", INTERRUPT_PROGRAM, runner, interrupt, mode],
        capture_output=True,
        text=True,
        timeout=50,
        cwd=pathlib.Path(__file__).parent.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    return report


RUNNERS = ["asyncio", "trio"]
INTERRUPTS = ["KeyboardInterrupt", "SystemExit"]


@pytest.mark.parametrize("runner", RUNNERS)
@pytest.mark.parametrize("interrupt", INTERRUPTS)
def test_interrupt_raised_by_receive_is_not_a_message_failure(runner: str, interrupt: str) -> None:
    report = run_interrupt_program(runner, interrupt, "tell")
    assert report["raised"] == interrupt
    assert report["seen"] == [interrupt]
    # Not retried on a fresh instance, not dead-lettered as a failure.
    assert report["calls"] == ["before", "interrupt"]
    assert "failed" not in report["reasons"]
    assert report["actors"] == []


ASKED_RUNNERS = [
    "asyncio",
    "trio",
]


@pytest.mark.parametrize("runner", ASKED_RUNNERS)
@pytest.mark.parametrize("interrupt", INTERRUPTS)
def test_interrupt_raised_by_receive_while_asked_leaves_the_engine_as_itself(
    runner: str, interrupt: str
) -> None:
    report = run_interrupt_program(runner, interrupt, "ask")
    assert report["calls"] == ["before", "interrupt"]
    assert "failed" not in report["reasons"]
    assert report["actors"] == []
    assert report["seen"] == [interrupt]
    assert report["raised"] == interrupt


# ------------------------------------------------------ on the virtual clock


class Sleepy(Actor):
    """Takes ``seconds`` of (virtual) time per message; journals like Journal."""

    def __init__(self, journal: list[str], seconds: float) -> None:
        self.journal = journal
        self.seconds = seconds

    async def receive(self, message: Any) -> Any:
        await anyio.sleep(self.seconds)
        self.journal.append(f"s:{message}")
        return message

    async def on_stop(self) -> None:
        self.journal.append("s:stop")


class TestOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_drain_waits_for_slow_handlers_within_the_shutdown_timeout(self) -> None:
        journal: list[str] = []
        async with Engine(shutdown_timeout=10) as engine:
            ref = await engine.spawn(lambda: Sleepy(journal, 2), name="s")
            start = anyio.current_time()
            for i in range(4):
                ref.try_tell(i)
            await anyio.wait_all_tasks_blocked()  # the first message is in progress
        assert anyio.current_time() - start == 8
        assert journal == ["s:0", "s:1", "s:2", "s:3", "s:stop"]
        assert engine.dead_letters.count() == 0
        assert engine.metrics().in_flight == 0

    async def test_outer_deadline_cuts_the_body_short_without_waiting_for_a_drain(
        self,
    ) -> None:
        journal: list[str] = []
        before = running_task_ids()
        start = anyio.current_time()
        with anyio.move_on_after(5) as scope:
            async with Engine(shutdown_timeout=30) as engine:
                ref = await engine.spawn(lambda: Sleepy(journal, 100), name="s")
                ref.try_tell("long")
                ref.try_tell("queued")
                await anyio.sleep_forever()
        assert scope.cancelled_caught
        assert anyio.current_time() - start == 5
        assert running_task_ids() == before
        assert user_actors(engine) == {}
        assert engine.metrics().in_flight == 0
        assert [d.message for d in engine.dead_letters.list()] == ["long", "queued"]

    async def test_outer_deadline_during_the_drain_is_not_swallowed(self) -> None:
        journal: list[str] = []
        before = running_task_ids()
        start = anyio.current_time()
        with anyio.move_on_after(5) as scope:
            async with Engine(shutdown_timeout=30) as engine:
                ref = await engine.spawn(lambda: Sleepy(journal, 2), name="s")
                for i in range(4):
                    ref.try_tell(i)
                await anyio.wait_all_tasks_blocked()  # the first message is in progress
        assert scope.cancelled_caught
        assert anyio.current_time() - start == 5
        assert running_task_ids() == before
        assert user_actors(engine) == {}
        assert engine.metrics().in_flight == 0
        assert entries(journal, "s")[:2] == ["s:0", "s:1"]
        # Nothing accepted is lost: what was not handled is a dead letter.
        handled = [e.removeprefix("s:") for e in journal if e != "s:stop"]
        assert sorted(handled + [str(d.message) for d in engine.dead_letters.list()]) == [
            "0",
            "1",
            "2",
            "3",
        ]

    async def test_outer_deadline_during_the_drain_still_calls_on_stop(self) -> None:
        journal: list[str] = []
        with anyio.move_on_after(5) as scope:
            async with Engine(shutdown_timeout=30) as engine:
                ref = await engine.spawn(lambda: Sleepy(journal, 2), name="s")
                for i in range(4):
                    ref.try_tell(i)
                await anyio.wait_all_tasks_blocked()  # the first message is in progress
        assert scope.cancelled_caught
        assert journal == ["s:0", "s:1", "s:stop"]
