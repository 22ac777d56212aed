"""Actors, refs and mailboxes: tell, try_tell, ask, stop, statistics, overflow."""

from __future__ import annotations

import functools
from typing import Any

import anyio
import pytest
import trio.testing

from engine import (
    Actor,
    ActorState,
    ActorStopped,
    AskTimeout,
    Engine,
    EngineError,
    MailboxFull,
    Overflow,
    Restart,
)
from tests.helpers import Gate, Recorder, user_actors

pytestmark = pytest.mark.anyio


def virtual_clock_backends() -> list[Any]:
    """asyncio, and trio on a virtual clock (a fresh one for each test that uses it)."""
    return [
        "asyncio",
        pytest.param(("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)}), id="trio"),
    ]


class Slow(Actor):
    """Answers ``(delay, value)`` with ``value`` after sleeping ``delay`` seconds."""

    async def receive(self, message: tuple[float, Any]) -> Any:
        delay, value = message
        await anyio.sleep(delay)
        return value


async def test_messages_are_handled_one_at_a_time_in_order() -> None:
    log: list[Any] = []
    active = 0
    overlap = False

    class Slow(Actor):
        async def receive(self, message: Any) -> None:
            nonlocal active, overlap
            active += 1
            overlap = overlap or active > 1
            await anyio.lowlevel.checkpoint()
            log.append(message)
            active -= 1

    async with Engine() as engine:
        ref = await engine.spawn(Slow, name="slow")
        async with anyio.create_task_group() as tg:
            for i in range(3):
                tg.start_soon(ref.tell, -i - 1)
        for i in range(500):
            await ref.tell(i)
        assert await ref.ask("last") is None
    assert not overlap
    assert log[3:] == [*range(500), "last"]


async def test_ask_returns_the_reply() -> None:
    class Doubler(Actor):
        async def receive(self, message: int) -> int:
            return message * 2

    async with Engine() as engine:
        ref = await engine.spawn(Doubler, name="doubler")
        assert await ref.ask(21) == 42
        assert await ref.ask(0, timeout=None) == 0


async def test_ask_raises_the_handlers_own_exception_after_the_final_attempt() -> None:
    attempts = 0

    class Broken(Actor):
        async def receive(self, message: Any) -> None:
            nonlocal attempts
            attempts += 1
            raise KeyError(message)

    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=None)
        ref = await sup.spawn(Broken, name="broken", max_attempts=2)
        with pytest.raises(KeyError, match="x"):
            await ref.ask("x")
        assert attempts == 2
        [letter] = engine.dead_letters.list()
        assert letter.reason == "failed"
        assert letter.attempts == 2
        assert letter.error == "KeyError: 'x'"


async def test_ask_timeout_is_a_timeout_error_and_leaves_the_actor_running() -> None:
    gate = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, log), name="gate")
        with pytest.raises(AskTimeout) as info:
            await ref.ask("slow", timeout=0.01)
        assert isinstance(info.value, TimeoutError)
        assert "'gate'" in str(info.value)
        gate.set()
        assert await ref.ask("next") == "next"
    assert log == ["slow", "next"]


@pytest.mark.parametrize("anyio_backend", virtual_clock_backends())
async def test_a_late_reply_to_a_timed_out_ask_never_reaches_a_later_ask() -> None:
    async with Engine() as engine:
        ref = await engine.spawn(Slow, name="slow")
        for i in range(3):
            start = anyio.current_time()
            with pytest.raises(AskTimeout):
                await ref.ask((0.05, f"late {i}"), timeout=0.01)
            assert anyio.current_time() - start >= 0.01 - 1e-9  # float rounding
            # The actor is still on the timed-out message: this ask waits for its own reply.
            assert await ref.ask((0, i)) == i
            assert anyio.current_time() - start >= 0.05 - 1e-9
        assert ref.statistics().processed == 6


@pytest.mark.parametrize("anyio_backend", virtual_clock_backends())
async def test_concurrent_asks_with_mixed_timeouts_each_get_their_own_outcome() -> None:
    outcomes: dict[int, Any] = {}

    async def asker(ref: Any, i: int) -> None:
        # Every tenth message takes longer than its asker waits; the others are
        # answered well within their (different) timeouts.
        slow = i % 10 == 0
        message = (0.01, i) if slow else (0, i)
        try:
            outcomes[i] = await ref.ask(message, timeout=0.001 if slow else 10.0 + i % 3)
        except AskTimeout:
            outcomes[i] = "timeout"

    async with Engine() as engine:
        ref = await engine.spawn(Slow, name="slow", capacity=300)
        async with anyio.create_task_group() as tg:
            for i in range(200):
                tg.start_soon(asker, ref, i)
        assert outcomes == {i: "timeout" if i % 10 == 0 else i for i in range(200)}
        assert await ref.ask((0, "after")) == "after"


@pytest.mark.parametrize("anyio_backend", virtual_clock_backends())
async def test_an_ask_into_a_full_blocking_mailbox_waits_for_room_within_its_timeout() -> None:
    """The wait for room counts against the ask's timeout: room in time, and the ask
    is answered; none, and it raises ``AskTimeout`` without its message ever queued."""
    async with Engine() as engine:
        ref = await engine.spawn(Slow, name="slow", capacity=1, overflow=Overflow.BLOCK)
        await ref.tell((0.1, "busy"))  # in hand for 0.1 s
        await ref.tell((0.1, "queued"))  # fills the mailbox until the first is done
        start = anyio.current_time()
        with pytest.raises(AskTimeout):
            await ref.ask((0, "no room"), timeout=0.05)
        assert anyio.current_time() - start >= 0.05 - 1e-9
        # Room comes after 0.1 s; this ask is answered once "queued" took its 0.1 s too.
        assert await ref.ask((0, "room"), timeout=5.0) == "room"
        assert anyio.current_time() - start >= 0.2 - 1e-9
        # Handled: busy, queued, room; "no room" never reached the actor.
        assert ref.statistics().processed == 3


async def test_cancelled_asker_does_not_hurt_the_actor() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, log, entered), name="gate")
        async with anyio.create_task_group() as tg:
            tg.start_soon(ref.ask, "abandoned")
            await entered.wait()
            tg.cancel_scope.cancel()
        gate.set()
        assert await ref.ask("after") == "after"
        assert ref.statistics().failed == 0
    assert log == ["abandoned", "after"]


async def test_try_tell_raises_mailbox_full_under_block_and_reject() -> None:
    for overflow in (Overflow.BLOCK, Overflow.REJECT):
        gate = anyio.Event()
        entered = anyio.Event()
        log: list[Any] = []
        async with Engine() as engine:
            ref = await engine.spawn(
                functools.partial(Gate, gate, log, entered), name="g", capacity=2, overflow=overflow
            )
            ref.try_tell(0)
            await entered.wait()
            ref.try_tell(1)
            ref.try_tell(2)
            with pytest.raises(MailboxFull, match="'g' is full"):
                ref.try_tell(3)
            if overflow is Overflow.REJECT:
                with pytest.raises(MailboxFull):
                    await ref.tell(3)
            gate.set()
        assert log == [0, 1, 2]
        assert engine.dead_letters.count() == 0


async def test_tell_waits_for_room_under_block() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, log, entered), name="g", capacity=1)
        await ref.tell(0)
        await entered.wait()
        await ref.tell(1)
        told = anyio.Event()

        async def blocked_sender() -> None:
            await ref.tell(2)
            told.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(blocked_sender)
            await anyio.wait_all_tasks_blocked()
            assert not told.is_set()
            assert ref.statistics().depth == 1
            gate.set()
        assert told.is_set()
    assert log == [0, 1, 2]


async def test_cancelled_blocked_sender_passes_its_wakeup_on() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, log, entered), name="g", capacity=1)
        await ref.tell(0)
        await entered.wait()
        await ref.tell(1)
        async with anyio.create_task_group() as tg:
            with anyio.CancelScope() as doomed:
                tg.start_soon(ref.tell, 2)
                await anyio.wait_all_tasks_blocked()
            async with anyio.create_task_group() as inner:
                with anyio.move_on_after(5):

                    async def cancelled_sender() -> None:
                        with anyio.CancelScope() as scope:
                            cancel_scopes.append(scope)
                            await ref.tell("never")

                    cancel_scopes: list[anyio.CancelScope] = []
                    inner.start_soon(cancelled_sender)
                    await anyio.wait_all_tasks_blocked()
                    cancel_scopes[0].cancel()
            assert not doomed.cancel_called
            gate.set()
    assert log == [0, 1, 2]


async def test_drop_newest_dead_letters_the_new_message() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Gate(gate, log, entered), name="g", capacity=2, overflow=Overflow.DROP_NEWEST
        )
        ref.try_tell(0)
        await entered.wait()
        ref.try_tell(1)
        ref.try_tell(2)
        ref.try_tell(3)
        await ref.tell(4)
        with pytest.raises(MailboxFull, match="dropped"):
            await ref.ask(5)
        letters = engine.dead_letters.list()
        assert [(d.message, d.reason, d.actor) for d in letters] == [
            (3, "dropped", "g"),
            (4, "dropped", "g"),
            (5, "dropped", "g"),
        ]
        gate.set()
    assert log == [0, 1, 2]


async def test_drop_oldest_dead_letters_the_oldest_queued_message() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Gate(gate, log, entered), name="g", capacity=2, overflow=Overflow.DROP_OLDEST
        )
        ref.try_tell(0)
        await entered.wait()
        for i in range(1, 5):
            ref.try_tell(i)
        assert [d.message for d in engine.dead_letters.list()] == [1, 2]
        assert ref.statistics().depth == 2
        gate.set()
    assert log == [0, 3, 4]


async def test_ask_whose_message_is_pushed_out_raises_mailbox_full() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Gate(gate, log, entered), name="g", capacity=1, overflow=Overflow.DROP_OLDEST
        )
        ref.try_tell(0)
        await entered.wait()
        async with anyio.create_task_group() as tg:

            async def asker() -> None:
                with pytest.raises(MailboxFull):
                    await ref.ask("pushed out")

            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            ref.try_tell("newer")
        gate.set()
    assert log == [0, "newer"]


async def test_statistics_track_depth_peak_and_counts() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Gate(gate, log, entered), name="g", capacity=10)
        stats = ref.statistics()
        assert (stats.name, stats.capacity, stats.depth, stats.processed) == ("g", 10, 0, 0)
        assert stats.state is ActorState.RUNNING
        for i in range(6):
            ref.try_tell(i)
        await entered.wait()
        stats = ref.statistics()
        assert stats.depth == 5
        assert stats.peak_depth == 6
        gate.set()
        await ref.ask("sync")
        stats = ref.statistics()
        assert (stats.depth, stats.peak_depth, stats.processed, stats.failed) == (0, 6, 7, 0)
        assert user_actors(engine)["g"] == stats
        assert engine.metrics().in_flight == 0


async def test_stop_dead_letters_queued_messages_and_fails_pending_asks() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []
    stopped: list[str] = []

    class Stoppable(Gate):
        async def on_stop(self) -> None:
            stopped.append("on_stop")

    async with Engine() as engine:
        ref = await engine.spawn(lambda: Stoppable(gate, log, entered), name="g")
        ref.try_tell("in progress")
        await entered.wait()
        ref.try_tell("queued")
        outcomes: list[BaseException] = []

        async def asker() -> None:
            try:
                await ref.ask("pending")
            except ActorStopped as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(asker)
            await anyio.wait_all_tasks_blocked()
            tg.start_soon(ref.stop)
            await anyio.wait_all_tasks_blocked()
            assert ref.statistics().state is ActorState.STOPPING
            gate.set()
        assert len(outcomes) == 1
        assert stopped == ["on_stop"]
        assert ref.statistics().state is ActorState.STOPPED
        with pytest.raises(ActorStopped, match="'g'"):
            ref.try_tell("late")
        with pytest.raises(ActorStopped):
            await ref.ask("late")
        await ref.stop()  # idempotent
        assert [(d.message, d.reason) for d in engine.dead_letters.list()] == [
            ("queued", "stopped"),
            ("pending", "stopped"),
        ]
        # The name is free again.
        await engine.spawn(Recorder, name="g")
    assert log == ["in progress"]


async def test_actor_can_stop_itself_through_its_ref() -> None:
    class Quitter(Actor):
        async def receive(self, message: Any) -> str:
            await self.ref.stop()
            return "bye"

    async with Engine() as engine:
        ref = await engine.spawn(Quitter, name="q")
        assert ref.name == "q"
        assert await ref.ask("go") == "bye"
        with pytest.raises(ActorStopped):
            await ref.ask("again")


async def test_self_stop_restarts_only_permanent_actors() -> None:
    starts: dict[str, int] = {"permanent": 0, "transient": 0, "temporary": 0}

    class Once(Actor):
        def __init__(self, kind: str) -> None:
            self.kind = kind

        async def on_start(self) -> None:
            starts[self.kind] += 1

        async def receive(self, message: Any) -> None:
            if message == "exit":
                self.stop()

    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=None, max_restarts=10)
        refs = {
            kind: await sup.spawn(functools.partial(Once, kind), name=kind, restart=restart)
            for kind, restart in [
                ("permanent", Restart.PERMANENT),
                ("transient", Restart.TRANSIENT),
                ("temporary", Restart.TEMPORARY),
            ]
        }
        for ref in refs.values():
            await ref.ask("exit")
        await refs["permanent"].ask("exit")
        await refs["permanent"].ask("ping")  # handled by the third instance
        for kind in ("transient", "temporary"):
            with pytest.raises(ActorStopped):
                await refs[kind].ask("x")
        assert sup.children == ["permanent"]
        assert refs["permanent"].statistics().restarts == 2
    assert starts == {"permanent": 3, "transient": 1, "temporary": 1}


async def test_ten_thousand_actors_spawn_and_stop_with_nothing_left_running() -> None:
    async with Engine() as engine:
        refs = [await engine.spawn(Recorder, name=f"a{i}", capacity=1) for i in range(10_000)]
        for ref in refs:
            ref.try_tell("hi")
        assert len(user_actors(engine)) == 10_000
        for ref in refs[:5_000]:
            await ref.stop()
        assert len(user_actors(engine)) == 5_000
    assert user_actors(engine) == {}
    assert engine.metrics().in_flight == 0
    assert all(r.statistics().state is ActorState.STOPPED for r in refs)
    assert engine.dead_letters.count() <= 10_000


async def test_duplicate_names_are_refused() -> None:
    async with Engine() as engine:
        await engine.spawn(Recorder, name="x")
        with pytest.raises(ValueError, match="'x' is already taken"):
            await engine.spawn(Recorder, name="x")
        with pytest.raises(ValueError, match="'x' is already taken"):
            await engine.supervisor("x")
        assert engine.actor("x").name == "x"
        with pytest.raises(KeyError):
            engine.actor("nobody")


async def test_spawn_raises_the_first_on_start_error_and_registers_nothing() -> None:
    class Fails(Actor):
        async def on_start(self) -> None:
            raise RuntimeError("no database")

        async def receive(self, message: Any) -> None:
            raise AssertionError("never runs")

    async with Engine() as engine:
        with pytest.raises(RuntimeError, match="no database"):
            await engine.spawn(Fails, name="f")
        assert "f" not in user_actors(engine)
        await engine.spawn(Recorder, name="f")


async def test_factory_errors_surface_at_spawn() -> None:
    def broken() -> Actor:
        raise OSError("factory broke")

    async with Engine() as engine:
        with pytest.raises(OSError, match="factory broke"):
            await engine.spawn(broken, name="b")
        with pytest.raises(TypeError, match="must return an Actor, got int"):
            await engine.spawn(lambda: 42, name="n")  # type: ignore[arg-type,return-value]
        assert user_actors(engine) == {}


async def test_actor_ref_outside_an_engine() -> None:
    with pytest.raises(EngineError, match="not running"):
        _ = Recorder().ref
    engine = Engine()
    with pytest.raises(EngineError, match="not running"):
        await engine.spawn(Recorder, name="x")


async def test_default_receive_is_required() -> None:
    async with Engine() as engine:
        ref = await engine.spawn(Actor, name="bare", max_attempts=1)
        with pytest.raises(NotImplementedError, match="must implement receive"):
            await ref.ask("x")
