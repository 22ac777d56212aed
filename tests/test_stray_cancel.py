"""A stray ``CancelledError`` inside user code fails that message, not the engine.

On asyncio a stray cancellation is what happens in the wild: user code awaits a
future another party cancelled (a connection pool does this), while nothing
cancelled the task it runs in. On trio user code can only raise asyncio's
``CancelledError`` itself; trio's own ``Cancelled`` always means a real cancel
scope. Every test runs on both (trio on the virtual clock, so the retry backoff
costs no wall time); a real cancellation must keep its meaning on both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import trio.testing

from engine import (
    Actor,
    ActorState,
    BackpressureConfig,
    BackpressureState,
    Engine,
    EngineError,
    Event,
    StrayCancellation,
    TenantKey,
)
from engine._cancel import as_failure, is_stray_cancellation

pytestmark = pytest.mark.anyio

DISPATCHER = "actorbus.dispatcher"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "trio":
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})
    return "asyncio"


class Ping(Event, tag="stray_cancel.ping"):
    n: int


class Probe(Event, tag="stray_cancel.probe"):
    pass


class Abort(Exception):
    """Leaves an engine block with an error: shutdown at once, without a drain."""


def on_asyncio() -> bool:
    return anyio.get_cancelled_exc_class() is asyncio.CancelledError


async def stray_cancel() -> None:
    """Raise a stray CancelledError the way it happens in the wild."""
    if on_asyncio():
        future = asyncio.get_running_loop().create_future()
        future.cancel("the pool gave up on this connection")
        await future
    else:
        raise asyncio.CancelledError("the pool gave up on this connection")


def assert_stray_letter(letter: Any) -> None:
    assert letter.reason == "failed"
    assert letter.error is not None
    assert letter.error.startswith("StrayCancellation: CancelledError: the pool gave up")
    assert "stray" in letter.error.removeprefix("StrayCancellation")
    assert letter.traceback is not None
    # The original CancelledError and where it came from are in the traceback.
    assert "CancelledError" in letter.traceback
    assert "stray_cancel" in letter.traceback


async def assert_alive(engine: Engine) -> None:
    """The dispatcher still routes and a later publish is handled."""
    handled = anyio.Event()

    async def probe(event: Probe) -> None:
        handled.set()

    engine.subscribe(Probe, handler=probe, name="probe")
    await engine.publish(Probe())
    await handled.wait()
    assert engine.metrics().actors[DISPATCHER].state is ActorState.RUNNING


# ------------------------------------------------------------------ actors


class Journal(Actor):
    """Strays on "stray" (every attempt) and on "once" (the first attempt only)."""

    def __init__(self, log: list[str]) -> None:
        self.log = log

    async def receive(self, message: Any) -> Any:
        self.log.append(message)
        if message == "stray" or (message == "once" and self.log.count("once") == 1):
            await stray_cancel()
        return message


async def test_a_stray_cancel_in_receive_fails_a_told_message_like_any_error() -> None:
    log: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(log), name="journal")
        await ref.tell("stray")
        await ref.tell("after")
        # FIFO: once "after" is answered, "stray" went through all its attempts.
        assert await ref.ask("last") == "last"
        assert log == ["stray", "stray", "stray", "after", "last"]
        [letter] = engine.dead_letters.list()
        assert (letter.actor, letter.message, letter.attempts) == ("journal", "stray", 3)
        assert_stray_letter(letter)
        stats = ref.statistics()
        assert (stats.failed, stats.restarts, stats.state) == (3, 3, ActorState.RUNNING)
        await assert_alive(engine)
    assert engine.metrics().in_flight == 0


async def test_an_ask_whose_receive_strays_raises_a_typed_error_in_the_asker() -> None:
    log: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(log), name="journal")
        with pytest.raises(StrayCancellation) as info:
            await ref.ask("stray")
        # Not a CancelledError: the asker's own task was not cancelled and must not look so.
        assert not isinstance(info.value, asyncio.CancelledError)
        assert isinstance(info.value, EngineError)
        assert type(info.value.__cause__) is asyncio.CancelledError
        assert str(info.value.__cause__) == "the pool gave up on this connection"
        # The asker goes on awaiting; the actor answers the next ask.
        await anyio.lowlevel.checkpoint()
        assert await ref.ask("after") == "after"
        [letter] = engine.dead_letters.list()
        assert_stray_letter(letter)
        await assert_alive(engine)


async def test_a_stray_cancel_on_the_first_attempt_is_retried_and_the_ask_answered() -> None:
    log: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Journal(log), name="journal")
        assert await ref.ask("once") == "once"
        assert log == ["once", "once"]
        assert ref.statistics().restarts == 1
        assert engine.dead_letters.count() == 0


# -------------------------------------------------------------- subscriptions


async def test_a_function_handler_that_strays_is_retried_then_dead_lettered() -> None:
    calls: list[int] = []
    steady: list[int] = []
    last = anyio.Event()

    async def flaky(event: Ping) -> None:
        calls.append(event.n)
        if event.n == 2:
            await stray_cancel()
        if event.n == 4:
            last.set()

    async def record(event: Ping) -> None:
        steady.append(event.n)

    async with Engine() as engine:
        sub = engine.subscribe(Ping, handler=flaky, name="flaky", max_attempts=3)
        engine.subscribe(Ping, handler=record, name="steady")
        events = [Ping(n=n) for n in range(5)]
        for event in events:
            await engine.publish(event)
        await last.wait()
        # Stateless: retried in place with backoff, never restarted.
        [stats] = sub.statistics()
        assert (stats.failed, stats.restarts, stats.state) == (3, 0, ActorState.RUNNING)
        await assert_alive(engine)
    # Retried in place, then dead-lettered; the later events are handled in order.
    assert calls == [0, 1, 2, 2, 2, 3, 4]
    assert steady == [0, 1, 2, 3, 4]
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.message, letter.attempts) == ("flaky", events[2], 3)
    assert_stray_letter(letter)
    assert engine.metrics().backpressure.depth == 0


class Fragile(Actor):
    """An actor handler that strays on ``n == 2``."""

    def __init__(self, seen: list[int], last: anyio.Event) -> None:
        self.seen = seen
        self.last = last

    async def receive(self, message: Ping) -> None:
        self.seen.append(message.n)
        if message.n == 2:
            await stray_cancel()
        if message.n == 4:
            self.last.set()


async def test_an_actor_handler_that_strays_is_restarted_retried_then_dead_lettered() -> None:
    seen: list[int] = []
    last = anyio.Event()
    async with Engine() as engine:
        sub = engine.subscribe(Ping, handler=lambda: Fragile(seen, last), name="fragile")
        events = [Ping(n=n) for n in range(5)]
        for event in events:
            await engine.publish(event)
        await last.wait()
        await assert_alive(engine)
        [stats] = sub.statistics()
        assert (stats.failed, stats.restarts) == (3, 3)
    assert seen == [0, 1, 2, 2, 2, 3, 4]
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.message, letter.attempts) == ("fragile", events[2], 3)
    assert_stray_letter(letter)
    assert engine.metrics().backpressure.depth == 0


# ------------------------------------------------------------------ resolver


async def test_a_loader_that_strays_fails_its_waiters_and_the_resolver_keeps_working() -> None:
    gate = anyio.Event()
    calls: list[str] = []

    async def loader(key: TenantKey) -> str:
        calls.append(str(key.value))
        await gate.wait()
        if len(calls) == 1:
            await stray_cancel()
        return f"tenant {key.value}"

    caught: list[BaseException] = []

    async def waiter(resolver: Any) -> None:
        try:
            await resolver.resolve("acme")
        except StrayCancellation as exc:
            caught.append(exc)

    async with Engine() as engine:
        resolver = await engine.tenant_resolver(loader)
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(waiter, resolver)
            await anyio.wait_all_tasks_blocked()
            assert resolver.statistics().misses == 5
            gate.set()
        # One load, one error object for every waiter, nothing cached.
        assert len(caught) == 5
        assert all(error is caught[0] for error in caught)
        assert type(caught[0].__cause__) is asyncio.CancelledError
        statistics = resolver.statistics()
        assert (statistics.loads, statistics.errors, statistics.entries) == (1, 1, 0)
        # The resolver is still there: the next resolve loads again, and succeeds.
        assert await resolver.resolve("acme") == "tenant acme"
        assert await resolver.resolve("globex") == "tenant globex"
        assert calls == ["acme", "acme", "globex"]
        await assert_alive(engine)


# -------------------------------------------------------- real cancellations


async def test_a_real_cancellation_after_a_stray_one_still_cuts_the_shutdown_short() -> None:
    # The first attempt strays; the retry then waits forever: the engine's
    # cut-short shutdown cancels it for real, and that is not one more failure.
    entered = anyio.Event()
    calls: list[int] = []

    async def stuck(event: Ping) -> None:
        calls.append(event.n)
        if len(calls) == 1:
            await stray_cancel()
        entered.set()
        await anyio.sleep_forever()

    async with Engine(shutdown_timeout=0.05) as engine:
        engine.subscribe(Ping, handler=stuck, name="stuck", max_attempts=3)
        await engine.publish(Ping(n=1))
        await entered.wait()
    assert calls == [1, 1]
    # Cut short in its retry: a shutdown letter, and the real cancellation is no failure.
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.reason, letter.attempts, letter.error) == (
        "stuck",
        "shutdown",
        0,
        None,
    )
    assert engine.metrics().backpressure.depth == 0


async def test_the_callers_cancel_scope_around_ask_and_publish_still_cancels_the_caller() -> None:
    gate = anyio.Event()
    entered = anyio.Event()
    log: list[Any] = []

    class Held(Actor):
        async def receive(self, message: Any) -> Any:
            entered.set()
            await gate.wait()
            log.append(message)
            return message

    held: list[int] = []

    async def slow(event: Ping) -> None:
        await gate.wait()
        held.append(event.n)

    # max_depth=4: the third event in flight makes the engine CRITICAL, the fourth waits.
    async with Engine(backpressure=BackpressureConfig(max_depth=4)) as engine:
        ref = await engine.spawn(Held, name="held")
        engine.subscribe(Ping, handler=slow, name="slow")
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(ref.ask, "asked")
                await entered.wait()
                for n in range(3):
                    await engine.publish(Ping(n=n))
                tg.start_soon(engine.publish, Ping(n=3))
                await anyio.wait_all_tasks_blocked()
                assert engine.metrics().backpressure.state is BackpressureState.CRITICAL
                scope.cancel()
        assert scope.cancelled_caught
        # Neither the actor nor the subscription was disturbed by their callers giving up.
        gate.set()
        assert await ref.ask("next") == "next"
        assert log == ["asked", "next"]
    assert held == [0, 1, 2]
    assert engine.dead_letters.count() == 0


async def test_an_outside_cancel_scope_around_the_engine_is_still_not_swallowed() -> None:
    entered = anyio.Event()

    class Blocked(Actor):
        async def receive(self, message: Any) -> Any:
            entered.set()
            await anyio.sleep_forever()

    with anyio.CancelScope() as scope:
        async with Engine() as engine:
            ref = await engine.spawn(Blocked, name="blocked")
            await ref.tell("x")
            await entered.wait()
            scope.cancel()
            await anyio.sleep_forever()
    assert scope.cancelled_caught
    # Cut short, not failed: no attempt counted, no error recorded.
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.reason, letter.attempts, letter.error) == (
        "blocked",
        "shutdown",
        0,
        None,
    )


async def test_a_shutdown_racing_a_stray_cancel_still_raises_the_blocks_error() -> None:
    # The pool gives up on the handler's connection in the same instant the
    # block is left with an error (the engine then cancels its actors at once).
    entered = anyio.Event()
    connection: list[Any] = []

    class Pooled(Actor):
        async def receive(self, message: Any) -> Any:
            if on_asyncio():
                future = asyncio.get_running_loop().create_future()
                connection.append(future)
                entered.set()
                await future
            else:
                given_up = anyio.Event()
                connection.append(given_up)
                entered.set()
                await given_up.wait()
                raise asyncio.CancelledError("the pool gave up on this connection")

    with pytest.raises(Abort):
        async with Engine() as engine:
            ref = await engine.spawn(Pooled, name="pooled")
            await ref.tell("x")
            await entered.wait()
            if on_asyncio():
                connection[0].cancel("the pool gave up on this connection")
            else:
                connection[0].set()
            raise Abort
    # Nothing lost: the stray attempt counted as a failure, then the shutdown
    # took the message before its retry.
    [letter] = engine.dead_letters.list()
    assert (letter.actor, letter.reason, letter.attempts) == ("pooled", "shutdown", 1)
    assert letter.error is not None
    assert letter.error.startswith("StrayCancellation: CancelledError")
    assert engine.metrics().in_flight == 0


# ------------------------------------------------------------- the classifier


async def test_the_classifier_tells_a_stray_cancel_from_a_real_one() -> None:
    assert as_failure(error := ValueError("x")) is error
    assert as_failure(KeyboardInterrupt()) is None

    with pytest.raises(asyncio.CancelledError) as info:
        await stray_cancel()
    assert is_stray_cancellation(info.value)
    failure = as_failure(info.value)
    assert isinstance(failure, StrayCancellation)
    assert failure.__cause__ is info.value
    assert str(failure).startswith("CancelledError: the pool gave up on this connection")

    # A real one is classified where it is caught: inside the cancelled scope.
    verdicts: list[tuple[bool, Exception | None]] = []
    with anyio.CancelScope() as scope:
        scope.cancel()
        try:
            await anyio.sleep_forever()
        except BaseException as exc:
            verdicts.append((is_stray_cancellation(exc), as_failure(exc)))
            raise
    assert scope.cancelled_caught
    assert verdicts == [(False, None)]


class TestOnAsyncio:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return "asyncio"

    async def test_a_cancel_of_the_task_itself_is_real(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        verdicts: list[bool] = []
        task.cancel()
        try:
            await anyio.lowlevel.checkpoint()
        except asyncio.CancelledError as exc:
            verdicts.append(is_stray_cancellation(exc))
        finally:
            task.uncancel()
        assert verdicts == [False]


class TestBackoffOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_a_stray_function_handler_is_retried_after_the_backoff(self) -> None:
        at: list[float] = []

        async def flaky(event: Ping) -> None:
            at.append(anyio.current_time())
            await stray_cancel()

        async with Engine() as engine:
            engine.subscribe(Ping, handler=flaky, name="flaky", max_attempts=3)
            await engine.publish(Ping(n=1))
        # Backoff() is 0.01 then 0.02 s, each +-10% jitter.
        assert len(at) == 3
        assert 0.009 <= at[1] - at[0] <= 0.011
        assert 0.018 <= at[2] - at[1] <= 0.022
        [letter] = engine.dead_letters.list()
        assert_stray_letter(letter)


# ------------------------------------------------------ lifecycle hooks, breaker


class StraysInHooks(Actor):
    """Strays in ``on_start`` (when told to) and always in ``on_stop``."""

    def __init__(self, starts: list[int], strays: bool) -> None:
        self.starts = starts
        self.strays = strays

    async def on_start(self) -> None:
        self.starts.append(1)
        if self.strays:
            await stray_cancel()

    async def on_stop(self) -> None:
        await stray_cancel()

    async def receive(self, message: Any) -> Any:
        if message == "crash":
            raise ValueError("restart me")
        return message


async def test_a_stray_cancel_in_a_first_on_start_is_raised_from_spawn_as_a_typed_error() -> None:
    starts: list[int] = []
    async with Engine() as engine:
        with pytest.raises(StrayCancellation):
            await engine.spawn(lambda: StraysInHooks(starts, strays=True), name="hooks")
        await assert_alive(engine)


async def test_a_stray_cancel_in_on_stop_or_a_restarts_on_start_leaves_the_engine_running() -> None:
    starts: list[int] = []
    # The second instance (the first restart) strays in on_start: a crash, restarted again.
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: StraysInHooks(starts, len(starts) == 1), name="hooks", max_attempts=1
        )
        await ref.tell("crash")  # on_stop strays too: logged, never raised
        assert await ref.ask("still here") == "still here"
        assert len(starts) == 3
        assert ref.statistics().restarts == 2
        assert ref.statistics().state is ActorState.RUNNING
        await assert_alive(engine)


async def test_a_stray_cancel_from_a_dependency_counts_as_a_breaker_failure() -> None:
    from engine import CircuitBreakerConfig, CircuitOpenError, CircuitState

    calls: list[int] = []

    async def dependency() -> None:
        calls.append(1)
        await stray_cancel()

    async with Engine() as engine:
        breaker = engine.breaker("pool", CircuitBreakerConfig(failure_threshold=2))
        for _ in range(2):
            with pytest.raises(asyncio.CancelledError):
                await breaker.call(dependency)
        assert breaker.state is CircuitState.OPEN
        with pytest.raises(CircuitOpenError):
            await breaker.call(dependency)
        assert len(calls) == 2
        assert breaker.metrics().failures == 2
