"""Circuit breakers: every transition and its edges, the filters, the controls and the metrics.

A state is exact the moment the call that moved it returns, so every state is
checked right after the call, with nothing in between. What the contract lets
lag is waited for on an event, never on a sleep: the log (the breaker actor
writes it) and the open timer. Timing (the open timeout, retry_after,
call_timeout) is checked on trio's virtual clock in ``TestOnTheVirtualClock``;
everything else runs on both backends, reaching HALF_OPEN through a short real
timeout and waiting for the transition on the breaker's log.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import anyio.lowlevel
import msgspec
import pytest
import trio.testing
from anyio.abc import TaskGroup

from engine import (
    BreakerMetrics,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    CircuitState,
    Engine,
    EngineError,
)

pytestmark = pytest.mark.anyio

CLOSED, OPEN, HALF_OPEN = CircuitState.CLOSED, CircuitState.OPEN, CircuitState.HALF_OPEN

# Long enough that an opened breaker stays open for the whole test on a real clock.
FOREVER = 3600.0
# Short enough that the semantics tests reach HALF_OPEN at once on a real clock.
BLINK = 0.01


class Boom(Exception):
    """The dependency's failure."""


async def ok(value: object = "ok") -> object:
    return value


async def fail(error: BaseException | None = None) -> object:
    raise error if error is not None else Boom("dependency failed")


async def callers_waiting() -> None:
    """Let the calls started in the background reach the dependency they wait in."""
    await anyio.wait_all_tasks_blocked()


async def fail_times(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(Boom):
            await breaker.call(fail)


class Counted:
    """A dependency that counts its calls and returns at once."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        return "counted"


class Slow:
    """A dependency call that waits until the test releases it, then returns or raises."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.error = error
        self.entered = anyio.Event()
        self.released = anyio.Event()
        self.calls = 0

    def release(self, error: BaseException | None = None) -> None:
        if error is not None:
            self.error = error
        self.released.set()

    async def __call__(self) -> str:
        self.calls += 1
        self.entered.set()
        await self.released.wait()
        if self.error is not None:
            raise self.error
        return "slow"


class Outcome:
    """What one background ``breaker.call`` ended with: its result, its error, or neither."""

    def __init__(self) -> None:
        self.result: object = None
        self.error: BaseException | None = None
        self.done = False
        self.scope = anyio.CancelScope()

    async def run(self, breaker: CircuitBreaker, fn: Callable[[], Awaitable[object]]) -> None:
        with self.scope:
            try:
                self.result = await breaker.call(fn)
            except Exception as error:
                self.error = error
            self.done = True


def in_background(
    tg: TaskGroup, breaker: CircuitBreaker, fn: Callable[[], Awaitable[object]]
) -> Outcome:
    outcome = Outcome()
    tg.start_soon(outcome.run, breaker, fn)
    return outcome


class Transitions(logging.Handler):
    """Records the breakers' logged transitions with the (virtual) time of each."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[tuple[str, CircuitState, float]] = []
        self._waiters: list[anyio.Event] = []

    def emit(self, record: logging.LogRecord) -> None:
        name, state = record.__dict__["breaker"], CircuitState(record.__dict__["state"])
        self.seen.append((name, state, anyio.current_time()))
        for event in self._waiters:
            event.set()

    def states(self, name: str) -> list[CircuitState]:
        return [state for seen_name, state, _ in self.seen if seen_name == name]

    async def _until(self, done: Callable[[], bool], within: float = 10) -> None:
        with anyio.fail_after(within):
            while not done():
                event = anyio.Event()
                self._waiters.append(event)
                try:
                    await event.wait()
                finally:
                    self._waiters.remove(event)

    async def reach(
        self, breaker: CircuitBreaker, state: CircuitState, *, within: float = 10
    ) -> None:
        """Wait for ``breaker``'s next logged move to ``state`` (none if it is there, logged).

        On the virtual clock ``within`` must exceed the open timeout being waited out.
        """
        name = breaker.name
        if breaker.state is state and self.states(name)[-1:] == [state]:
            return
        before = self.states(name).count(state)
        await self._until(lambda: self.states(name).count(state) > before, within)

    async def logged(self, name: str, count: int) -> list[CircuitState]:
        """The states logged for ``name`` once there are ``count`` (the actor logs them)."""
        await self._until(lambda: len(self.states(name)) >= count)
        return self.states(name)


@pytest.fixture
def transitions() -> Iterator[Transitions]:
    logger = logging.getLogger("actorbus.breaker")
    handler = Transitions()
    level = logger.level
    logger.setLevel(logging.INFO)  # HALF_OPEN and CLOSED are logged at INFO
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@asynccontextmanager
async def half_open_breaker(
    transitions: Transitions, **config: Any
) -> AsyncIterator[CircuitBreaker]:
    """An engine with breaker 'dep' already HALF_OPEN (opened, then its BLINK timeout ran out)."""
    config.setdefault("timeout", BLINK)
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(**config))
        await breaker.force_open()
        await transitions.reach(breaker, HALF_OPEN)
        yield breaker


# ------------------------------------------------------------------ CLOSED


async def test_a_closed_breaker_passes_arguments_results_and_errors_through() -> None:
    async def add(a: int, b: int, *, scale: int) -> int:
        return (a + b) * scale

    async with Engine() as engine:
        breaker = engine.breaker("dep")
        assert breaker.state is CLOSED
        assert await breaker.call(add, 1, 2, scale=10) == 30
        error = Boom("exactly this one")
        with pytest.raises(Boom) as info:
            await breaker.call(fail, error)
        assert info.value is error
        assert breaker.name == "dep"
        assert repr(breaker) == "<CircuitBreaker 'dep' closed>"


async def test_the_breaker_opens_exactly_at_the_failure_threshold() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3, timeout=FOREVER))
        await fail_times(breaker, 2)
        assert breaker.state is CLOSED
        assert await breaker.call(ok) == "ok"  # one below the threshold still admits calls
        await fail_times(breaker, 2)
        assert breaker.state is CLOSED
        await fail_times(breaker, 1)
        assert breaker.state is OPEN
        assert repr(breaker) == "<CircuitBreaker 'dep' open>"


class Dead:
    """A dependency that is down: counts its calls and fails, at once or after a checkpoint."""

    def __init__(self, awaits: bool) -> None:
        self.awaits = awaits
        self.calls = 0

    async def __call__(self) -> object:
        self.calls += 1
        if self.awaits:
            await anyio.lowlevel.checkpoint()
        raise Boom(f"call {self.calls} failed")


@pytest.mark.parametrize("awaits", [False, True], ids=["fails-at-once", "fails-after-await"])
@pytest.mark.parametrize("call_timeout", [None, FOREVER], ids=["no-call-timeout", "call-timeout"])
async def test_the_failure_that_reaches_the_threshold_has_opened_it_when_its_call_returns(
    awaits: bool, call_timeout: float | None
) -> None:
    # A loop of calls from one task gives the breaker actor no turn in between
    # when the dependency fails without awaiting: the caller opens it itself.
    config = CircuitBreakerConfig(failure_threshold=5, timeout=FOREVER, call_timeout=call_timeout)
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        dead = Dead(awaits)
        seen: list[tuple[str, CircuitState]] = []
        for _ in range(8):
            try:
                await breaker.call(dead)
            except Boom:
                seen.append(("failed", breaker.state))
            except CircuitOpenError:
                seen.append(("rejected", breaker.state))
        assert seen == [("failed", CLOSED)] * 4 + [("failed", OPEN)] + [("rejected", OPEN)] * 3
        assert dead.calls == 5
        metrics = breaker.metrics()
        assert (metrics.failures, metrics.rejected, metrics.transitions) == (5, 3, 1)


async def test_a_threshold_of_one_opens_on_the_first_failure() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=FOREVER))
        await fail_times(breaker, 1)
        assert breaker.state is OPEN


async def test_a_success_resets_the_consecutive_failure_count() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3, timeout=FOREVER))
        for _ in range(5):
            await fail_times(breaker, 2)
            assert await breaker.call(ok) == "ok"
        assert breaker.state is CLOSED
        assert breaker.metrics().failures == 10
        await fail_times(breaker, 3)
        assert breaker.state is OPEN


async def test_concurrent_failures_past_the_threshold_open_it_once(
    transitions: Transitions,
) -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
        slow = Slow(Boom("slow failure"))
        async with anyio.create_task_group() as tg:
            outcomes = [in_background(tg, breaker, slow) for _ in range(5)]
            await callers_waiting()
            slow.release()
        assert all(isinstance(outcome.error, Boom) for outcome in outcomes)
        assert breaker.state is OPEN
        assert breaker.metrics().transitions == 1
    # Leaving the engine drains the breaker actor: every log line is in.
    assert transitions.states("dep") == [OPEN]


# -------------------------------------------------------------------- OPEN


async def test_an_open_breaker_rejects_without_calling_the_function() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
        await fail_times(breaker, 2)
        dependency = Counted()
        for _ in range(3):
            with pytest.raises(CircuitOpenError) as info:
                await breaker.call(dependency)
            error = info.value
            assert isinstance(error, EngineError)
            assert error.name == "dep"
            assert 0 < error.retry_after <= FOREVER
            assert "'dep'" in str(error)
        assert dependency.calls == 0
        assert breaker.metrics().rejected == 3


async def test_an_open_breaker_rejects_on_the_same_tick_the_actor_opens_it() -> None:
    # No mailbox round trip on the caller's path: the published state decides.
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=FOREVER))
        await breaker.force_open()
        dependency = Counted()
        with pytest.raises(CircuitOpenError):
            await breaker.call(dependency)
        assert dependency.calls == 0


# --------------------------------------------------------------- HALF_OPEN


async def test_the_timeout_moves_an_open_breaker_to_half_open(transitions: Transitions) -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=BLINK))
        await fail_times(breaker, 1)
        await transitions.reach(breaker, HALF_OPEN)
        assert transitions.states("dep") == [OPEN, HALF_OPEN]
        assert breaker.metrics().transitions == 2


async def test_success_threshold_probe_successes_close_a_half_open_breaker(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(transitions, success_threshold=3) as breaker:
        for _ in range(2):
            assert await breaker.call(ok) == "ok"
            assert breaker.state is HALF_OPEN
        assert await breaker.call(ok) == "ok"
        assert breaker.state is CLOSED
        assert breaker.metrics().transitions == 3
        assert await transitions.logged("dep", 3) == [OPEN, HALF_OPEN, CLOSED]


async def test_a_half_open_failure_reopens_the_breaker_at_once(transitions: Transitions) -> None:
    async with half_open_breaker(transitions, success_threshold=3, failure_threshold=5) as breaker:
        assert await breaker.call(ok) == "ok"
        assert breaker.state is HALF_OPEN
        await fail_times(breaker, 1)  # one failure, far below failure_threshold
        assert breaker.state is OPEN
        dependency = Counted()
        with pytest.raises(CircuitOpenError):
            await breaker.call(dependency)
        assert dependency.calls == 0
        assert breaker.metrics().transitions == 3
        # (Its BLINK timer may have moved it on to HALF_OPEN again since.)
        assert (await transitions.logged("dep", 3))[:3] == [OPEN, HALF_OPEN, OPEN]


async def test_a_closed_breaker_after_half_open_counts_failures_from_zero(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(transitions, success_threshold=1, failure_threshold=2) as breaker:
        await breaker.call(ok)
        assert breaker.state is CLOSED
        await fail_times(breaker, 1)
        assert breaker.state is CLOSED
        await fail_times(breaker, 1)
        assert breaker.state is OPEN


async def test_half_open_admits_at_most_max_requests_concurrent_probes(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(
        transitions, half_open_max_requests=2, success_threshold=2
    ) as breaker:
        slow = Slow()
        extra = Counted()
        async with anyio.create_task_group() as tg:
            probes = [in_background(tg, breaker, slow) for _ in range(2)]
            await callers_waiting()
            assert slow.calls == 2
            for _ in range(3):
                with pytest.raises(CircuitOpenError) as info:
                    await breaker.call(extra)
                # The probes are all taken: retry as soon as one comes back.
                assert info.value.retry_after == 0.0
            assert extra.calls == 0
            slow.release()
        assert [probe.result for probe in probes] == ["slow", "slow"]
        assert breaker.state is CLOSED
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.rejected) == (2, 3)


async def test_a_finished_probe_frees_its_permit_for_the_next(transitions: Transitions) -> None:
    async with half_open_breaker(
        transitions, half_open_max_requests=1, success_threshold=3
    ) as breaker:
        for _ in range(2):
            assert await breaker.call(ok) == "ok"
        assert breaker.state is HALF_OPEN
        assert await breaker.call(ok) == "ok"
        assert breaker.state is CLOSED


async def test_a_cancelled_probe_gives_its_permit_back_and_is_not_a_failure(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(
        transitions, half_open_max_requests=1, success_threshold=1, record=(BaseException,)
    ) as breaker:
        slow = Slow()
        async with anyio.create_task_group() as tg:
            probe = in_background(tg, breaker, slow)
            await slow.entered.wait()
            with pytest.raises(CircuitOpenError):
                await breaker.call(ok)
            probe.scope.cancel()
        assert not probe.done
        assert breaker.state is HALF_OPEN
        assert breaker.metrics().failures == 0
        # The permit is back: the next probe is admitted (and closes the breaker).
        assert await breaker.call(ok) == "ok"
        assert breaker.state is CLOSED


async def test_an_ignored_error_in_a_probe_gives_the_permit_back_and_counts_as_neither(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(
        transitions, half_open_max_requests=1, success_threshold=1, ignore=(KeyError,)
    ) as breaker:
        for _ in range(3):
            with pytest.raises(KeyError):
                await breaker.call(fail, KeyError("ignored"))
        assert breaker.state is HALF_OPEN
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures, metrics.rejected) == (0, 0, 0)
        await breaker.call(ok)
        assert breaker.state is CLOSED


# ------------------------------------------------- stale (late) completions


async def test_a_late_failure_admitted_while_closed_does_not_reopen_a_reset_breaker() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
        slow = Slow()
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await fail_times(breaker, 2)
            assert breaker.state is OPEN
            await breaker.reset()
            assert breaker.state is CLOSED
            slow.release(Boom("late"))
        assert isinstance(late.error, Boom)
        assert breaker.state is CLOSED
        # Nor does it count toward the new generation's threshold.
        await fail_times(breaker, 1)
        assert breaker.state is CLOSED
        assert breaker.metrics().failures == 4  # every failure is counted in the metrics


async def test_a_late_success_does_not_reset_the_failure_count_of_a_later_closed_state() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
        slow = Slow()
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await fail_times(breaker, 2)
            await breaker.reset()
            await fail_times(breaker, 1)
            slow.release()
        assert late.result == "slow"
        assert breaker.state is CLOSED
        # The late success belonged to the first closed state: this failure is the second.
        await fail_times(breaker, 1)
        assert breaker.state is OPEN


async def test_a_late_success_admitted_while_closed_does_not_close_an_open_breaker() -> None:
    async with Engine() as engine:
        config = CircuitBreakerConfig(failure_threshold=1, success_threshold=1, timeout=FOREVER)
        breaker = engine.breaker("dep", config)
        slow = Slow()
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await fail_times(breaker, 1)
            assert breaker.state is OPEN
            slow.release()
        assert late.result == "slow"
        assert breaker.state is OPEN


async def test_a_late_success_admitted_before_open_does_not_close_a_half_open_breaker(
    transitions: Transitions,
) -> None:
    async with Engine() as engine:
        config = CircuitBreakerConfig(failure_threshold=1, success_threshold=1, timeout=BLINK)
        breaker = engine.breaker("dep", config)
        slow = Slow()
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await fail_times(breaker, 1)
            await transitions.reach(breaker, HALF_OPEN)
            slow.release()
        assert late.result == "slow"
        assert breaker.state is HALF_OPEN


async def test_a_late_probe_failure_does_not_reopen_a_breaker_closed_by_other_probes(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(
        transitions, half_open_max_requests=2, success_threshold=1, failure_threshold=1
    ) as breaker:
        slow = Slow(Boom("late probe"))
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            assert await breaker.call(ok) == "ok"
            assert breaker.state is CLOSED
            slow.release()
        assert isinstance(late.error, Boom)
        assert breaker.state is CLOSED


async def test_a_late_probe_success_does_not_close_the_next_half_open_generation(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(transitions, success_threshold=1) as breaker:
        slow = Slow()
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await breaker.force_open()
            assert breaker.state is OPEN
            await transitions.reach(breaker, HALF_OPEN)
            slow.release()
        assert late.result == "slow"
        # One success would close this generation: the late one is not it.
        assert breaker.state is HALF_OPEN
        assert transitions.states("dep") == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


async def test_a_late_probe_failure_does_not_reopen_a_reset_breaker(
    transitions: Transitions,
) -> None:
    async with half_open_breaker(transitions, failure_threshold=1) as breaker:
        slow = Slow(Boom("late probe"))
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await breaker.reset()
            slow.release()
        assert isinstance(late.error, Boom)
        assert breaker.state is CLOSED
        assert transitions.states("dep") == [OPEN, HALF_OPEN, CLOSED]


async def test_a_late_failure_from_a_generation_the_controls_ended_does_not_open_it() -> None:
    # That generation was never reported (force_open ended it, not failures).
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=FOREVER))
        slow = Slow(Boom("late"))
        async with anyio.create_task_group() as tg:
            late = in_background(tg, breaker, slow)
            await slow.entered.wait()
            await breaker.force_open()
            await breaker.reset()
            slow.release()
        assert isinstance(late.error, Boom)
        assert breaker.state is CLOSED


# ------------------------------------------------------- record and ignore


async def test_an_ignored_error_is_neither_success_nor_failure() -> None:
    config = CircuitBreakerConfig(
        failure_threshold=2,
        timeout=FOREVER,
        record=(ConnectionError,),
        ignore=(ConnectionResetError,),
    )
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        await fail_times_with(breaker, ConnectionRefusedError("recorded"))
        error = ConnectionResetError("ignored")
        with pytest.raises(ConnectionResetError) as info:
            await breaker.call(fail, error)
        assert info.value is error
        assert breaker.state is CLOSED
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures) == (0, 1)
        # Not a success either: the count of consecutive failures goes on.
        await fail_times_with(breaker, ConnectionRefusedError("recorded"))
        assert breaker.state is OPEN


async def test_an_error_outside_record_is_neither_success_nor_failure() -> None:
    single: Any = ConnectionError  # a single type is taken for a tuple of one
    config = CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER, record=single)
    assert config.record == (ConnectionError,)
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        await fail_times_with(breaker, ConnectionError("recorded"))
        for _ in range(5):
            with pytest.raises(ValueError, match="a bug of ours"):
                await breaker.call(fail, ValueError("a bug of ours"))
        assert breaker.state is CLOSED
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures, metrics.total_requests) == (0, 1, 6)
        await fail_times_with(breaker, ConnectionError("recorded"))
        assert breaker.state is OPEN


async def test_base_exceptions_outside_exception_are_not_recorded_by_default() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1))
        with pytest.raises(KeyboardInterrupt):
            await breaker.call(fail, KeyboardInterrupt())
        assert breaker.state is CLOSED
        assert breaker.metrics().failures == 0


async def fail_times_with(breaker: CircuitBreaker, error: BaseException) -> None:
    with pytest.raises(type(error)):
        await breaker.call(fail, error)


# ------------------------------------------------------------ call_timeout


async def test_a_call_slower_than_call_timeout_is_a_timeout_error_and_a_failure() -> None:
    config = CircuitBreakerConfig(
        failure_threshold=1, timeout=FOREVER, call_timeout=BLINK, record=(ConnectionError,)
    )
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        with pytest.raises(TimeoutError, match="'dep'"):
            await breaker.call(anyio.sleep_forever)
        # A failure although TimeoutError is not in `record`.
        assert breaker.state is OPEN
        assert breaker.metrics().failures == 1


async def test_a_call_within_call_timeout_returns_its_result() -> None:
    config = CircuitBreakerConfig(failure_threshold=1, call_timeout=FOREVER)
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        assert await breaker.call(ok, 42) == 42
        with pytest.raises(Boom):
            await breaker.call(fail)
        assert breaker.state is OPEN


async def test_exceeding_call_timeout_is_a_failure_even_when_timeout_errors_are_ignored() -> None:
    config = CircuitBreakerConfig(
        failure_threshold=1, timeout=FOREVER, call_timeout=BLINK, ignore=(TimeoutError,)
    )
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        # The function's own TimeoutError is ignored...
        with pytest.raises(TimeoutError):
            await breaker.call(fail, TimeoutError("its own"))
        assert breaker.state is CLOSED
        # ...being slower than call_timeout is not.
        with pytest.raises(TimeoutError):
            await breaker.call(anyio.sleep_forever)
        assert breaker.state is OPEN


async def test_a_slow_half_open_probe_reopens_the_breaker(transitions: Transitions) -> None:
    async with half_open_breaker(transitions, call_timeout=BLINK) as breaker:
        with pytest.raises(TimeoutError):
            await breaker.call(anyio.sleep_forever)
        assert breaker.state is OPEN
        assert (await transitions.logged("dep", 3))[:3] == [OPEN, HALF_OPEN, OPEN]


# --------------------------------------------------- the caller's cancellation


@pytest.mark.parametrize("call_timeout", [None, FOREVER])
# Even with every BaseException recorded: the cancellation is the caller's, not the dependency's.
@pytest.mark.parametrize("record", [(Exception,), (BaseException,)])
async def test_the_callers_cancellation_is_not_a_failure(
    call_timeout: float | None, record: tuple[type[BaseException], ...]
) -> None:
    config = CircuitBreakerConfig(
        failure_threshold=1, timeout=FOREVER, call_timeout=call_timeout, record=record
    )
    async with Engine() as engine:
        breaker = engine.breaker("dep", config)
        slow = Slow()
        for _ in range(3):
            async with anyio.create_task_group() as tg:
                call = in_background(tg, breaker, slow)
                await slow.entered.wait()
                call.scope.cancel()
            assert not call.done
            slow.entered = anyio.Event()
        with anyio.move_on_after(BLINK):
            await breaker.call(anyio.sleep_forever)
        assert breaker.state is CLOSED
        metrics = breaker.metrics()
        assert (metrics.successes, metrics.failures, metrics.total_requests) == (0, 0, 4)


# ----------------------------------------------------- reset and force_open


async def test_force_open_then_reset(transitions: Transitions) -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(timeout=FOREVER))
        await breaker.force_open()
        assert breaker.state is OPEN  # the actor answered: the state is published
        dependency = Counted()
        with pytest.raises(CircuitOpenError):
            await breaker.call(dependency)
        assert dependency.calls == 0
        await breaker.reset()
        assert breaker.state is CLOSED
        assert await breaker.call(dependency) == "counted"
        assert transitions.states("dep") == [OPEN, CLOSED]
        assert breaker.metrics().transitions == 2


async def test_reset_starts_the_failure_count_over() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3, timeout=FOREVER))
        await fail_times(breaker, 2)
        await breaker.reset()
        await fail_times(breaker, 2)
        assert breaker.state is CLOSED
        await fail_times(breaker, 1)
        assert breaker.state is OPEN


async def test_reset_and_force_open_in_the_state_they_ask_for_are_not_transitions(
    transitions: Transitions,
) -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(timeout=FOREVER))
        await breaker.reset()
        await breaker.force_open()
        await breaker.force_open()
        await breaker.reset()
        await breaker.reset()
        assert transitions.states("dep") == [OPEN, CLOSED]
        assert breaker.metrics().transitions == 2


async def test_reset_closes_a_half_open_breaker(transitions: Transitions) -> None:
    async with half_open_breaker(transitions, success_threshold=5) as breaker:
        await breaker.reset()
        assert breaker.state is CLOSED
        assert transitions.states("dep") == [OPEN, HALF_OPEN, CLOSED]


async def test_controls_need_a_running_engine() -> None:
    breaker = Engine().breaker("dep")
    with pytest.raises(EngineError, match="not running"):
        await breaker.reset()
    with pytest.raises(EngineError, match="not running"):
        await breaker.force_open()


# ------------------------------------------------------------------ metrics


async def test_metrics_count_requests_outcomes_rejections_and_rates() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
        assert breaker.metrics() == BreakerMetrics(
            name="dep",
            state=CLOSED,
            total_requests=0,
            successes=0,
            failures=0,
            rejected=0,
            transitions=0,
            success_rate=1.0,
            rejection_rate=0.0,
        )
        for _ in range(3):
            await breaker.call(ok)
        await fail_times(breaker, 2)
        for _ in range(3):
            with pytest.raises(CircuitOpenError):
                await breaker.call(ok)
        metrics = breaker.metrics()
        assert metrics == BreakerMetrics(
            name="dep",
            state=OPEN,
            total_requests=8,
            successes=3,
            failures=2,
            rejected=3,
            transitions=1,
            success_rate=3 / 5,
            rejection_rate=3 / 8,
        )
        assert engine.metrics().breakers == {"dep": metrics}
        with pytest.raises(AttributeError):
            metrics.failures = 0  # type: ignore[misc]


async def test_engine_metrics_list_every_breaker_by_name() -> None:
    async with Engine() as engine:
        assert engine.metrics().breakers == {}
        first = engine.breaker("first")
        second = await engine.breaker("second", CircuitBreakerConfig(failure_threshold=1))
        await first.call(ok)
        await fail_times(second, 1)
        breakers = engine.metrics().breakers
        assert set(breakers) == {"first", "second"}
        assert (breakers["first"].state, breakers["first"].successes) == (CLOSED, 1)
        assert (breakers["second"].state, breakers["second"].failures) == (OPEN, 1)
        assert breakers["second"].success_rate == 0.0


# -------------------------------------------------------- names and configs


async def test_the_same_name_returns_the_same_breaker() -> None:
    async with Engine() as engine:
        config = CircuitBreakerConfig(failure_threshold=3, record=(ConnectionError,))
        breaker = engine.breaker("dep", config)
        assert engine.breaker("dep", config) is breaker
        # An equal config is the same config.
        single: Any = ConnectionError
        same = CircuitBreakerConfig(failure_threshold=3, record=single)
        assert engine.breaker("dep", same) is breaker
        assert await engine.breaker("dep", config) is breaker
        assert engine.breaker("other") is not breaker


async def test_another_config_for_an_existing_name_is_a_value_error() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3))
        with pytest.raises(ValueError, match="'dep' exists with another config"):
            engine.breaker("dep", CircuitBreakerConfig(failure_threshold=4))
        # The documented default is CircuitBreakerConfig(): no config is another config here.
        with pytest.raises(ValueError, match="'dep'"):
            engine.breaker("dep")
        assert engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3)) is breaker


async def test_no_config_is_the_default_config() -> None:
    async with Engine() as engine:
        breaker = engine.breaker("dep")
        assert breaker.config == CircuitBreakerConfig()
        assert engine.breaker("dep", CircuitBreakerConfig()) is breaker


@pytest.mark.parametrize(
    ("name", "config", "error", "match"),
    [
        (None, None, TypeError, "name"),
        (42, None, TypeError, "name"),
        ("", None, ValueError, "name"),
        ("   ", None, ValueError, "name"),
        ("dep", {"failure_threshold": 1}, TypeError, "config"),
        ("dep", 5, TypeError, "config"),
    ],
)
async def test_bad_names_and_configs_are_refused(
    name: Any, config: Any, error: type[Exception], match: str
) -> None:
    async with Engine() as engine:
        with pytest.raises(error, match=match):
            engine.breaker(name, config)
        assert engine.metrics().breakers == {}


async def test_a_new_breaker_is_refused_once_the_engine_has_stopped() -> None:
    async with Engine() as engine:
        existing = engine.breaker("dep")
    with pytest.raises(EngineError):
        engine.breaker("new")
    assert engine.breaker("dep") is existing


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("failure_threshold", 0),
        ("failure_threshold", -1),
        ("failure_threshold", 2.5),
        ("failure_threshold", "5"),
        ("failure_threshold", True),
        ("failure_threshold", None),
        ("success_threshold", 0),
        ("success_threshold", 1.0),
        ("success_threshold", False),
        ("half_open_max_requests", 0),
        ("half_open_max_requests", True),
        ("timeout", 0),
        ("timeout", -1.0),
        ("timeout", math.nan),
        ("timeout", math.inf),
        ("timeout", -math.inf),
        ("timeout", True),
        ("timeout", "60"),
        ("timeout", None),
        ("call_timeout", 0),
        ("call_timeout", -0.5),
        ("call_timeout", math.nan),
        ("call_timeout", math.inf),
        ("call_timeout", False),
        ("call_timeout", "1"),
        ("record", [ValueError]),
        ("record", (ValueError, "KeyError")),
        ("record", (int,)),
        ("record", int),
        ("record", ValueError("an instance")),
        ("record", None),
        ("ignore", [KeyError]),
        ("ignore", (object,)),
        ("ignore", "KeyError"),
    ],
)
def test_hostile_configs_are_refused_naming_the_field(field: str, value: object) -> None:
    hostile: dict[str, Any] = {field: value}
    with pytest.raises((ValueError, TypeError), match=field):
        CircuitBreakerConfig(**hostile)


def test_a_config_cannot_be_changed_or_replaced_into_a_bad_one() -> None:
    config = CircuitBreakerConfig(failure_threshold=3)
    with pytest.raises(AttributeError):
        config.failure_threshold = 0  # type: ignore[misc]
    with pytest.raises((ValueError, TypeError), match="failure_threshold"):
        msgspec.structs.replace(config, failure_threshold=0)
    with pytest.raises((ValueError, TypeError, msgspec.ValidationError), match="timeout"):
        msgspec.convert({"timeout": -1.0}, CircuitBreakerConfig)


def test_a_config_takes_a_single_exception_type_or_a_tuple_of_them() -> None:
    single: Any = OSError
    config = CircuitBreakerConfig(record=single, ignore=(FileNotFoundError, PermissionError))
    assert config.record == (OSError,)
    assert config.ignore == (FileNotFoundError, PermissionError)
    assert CircuitBreakerConfig(call_timeout=2).call_timeout == 2
    assert CircuitBreakerConfig(timeout=1e-6).timeout == 1e-6


# ---------------------------------------------- before the engine runs


async def test_a_breaker_created_before_the_engine_runs_works_once_it_runs(
    transitions: Transitions,
) -> None:
    engine = Engine()
    breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
    assert breaker.state is CLOSED
    async with engine:
        assert engine.breaker("dep", breaker.config) is breaker
        assert await breaker.call(ok) == "ok"
        await fail_times(breaker, 2)
        assert breaker.state is OPEN
        with pytest.raises(CircuitOpenError):
            await breaker.call(ok)
        await breaker.reset()
        assert breaker.state is CLOSED
        assert engine.metrics().breakers["dep"].transitions == 2
    assert transitions.states("dep") == [OPEN, CLOSED]


async def test_failures_before_the_engine_runs_open_the_breaker_at_the_threshold(
    transitions: Transitions,
) -> None:
    # No actor to tell yet: the caller opens it all the same, and the actor
    # announces it (log, open timer) when it starts.
    engine = Engine()
    breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
    await fail_times(breaker, 1)
    assert breaker.state is CLOSED
    await fail_times(breaker, 1)
    assert breaker.state is OPEN
    dependency = Counted()
    with pytest.raises(CircuitOpenError):
        await breaker.call(dependency)
    assert dependency.calls == 0
    assert breaker.metrics().transitions == 1
    assert transitions.states("dep") == []
    async with engine:
        assert breaker.state is OPEN
        with pytest.raises(CircuitOpenError):
            await breaker.call(dependency)
        assert dependency.calls == 0
        assert await transitions.logged("dep", 1) == [OPEN]
        await breaker.reset()
        assert breaker.metrics().transitions == 2
    assert transitions.states("dep") == [OPEN, CLOSED]


async def test_failures_before_and_after_the_start_count_together() -> None:
    engine = Engine()
    breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=3, timeout=FOREVER))
    await fail_times(breaker, 2)
    async with engine:
        assert breaker.state is CLOSED
        await fail_times(breaker, 1)
        assert breaker.state is OPEN


async def test_a_success_before_the_engine_runs_resets_the_count() -> None:
    engine = Engine()
    breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=2, timeout=FOREVER))
    await fail_times(breaker, 1)
    assert await breaker.call(ok) == "ok"  # the count starts over
    await fail_times(breaker, 1)
    assert breaker.state is CLOSED
    async with engine:
        assert breaker.state is CLOSED
        # The breaker still works: the next failure reaches the threshold and opens it.
        await fail_times(breaker, 1)
        assert breaker.state is OPEN
        assert breaker.metrics().failures == 3


# ------------------------------------------------------------------ logging


async def test_state_changes_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="actorbus.breaker")
    async with Engine() as engine:
        breaker = engine.breaker("payments", CircuitBreakerConfig(failure_threshold=1))
        await breaker.call(ok)
        await fail_times(breaker, 1)
        await breaker.reset()
        await breaker.reset()  # already closed: nothing to log
    records = [r for r in caplog.records if r.name == "actorbus.breaker"]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, "breaker 'payments': closed -> open"),
        (logging.INFO, "breaker 'payments': open -> closed"),
    ]
    assert [(r.breaker, r.state) for r in records] == [  # type: ignore[attr-defined]
        ("payments", "open"),
        ("payments", "closed"),
    ]


async def test_the_breaker_actor_is_named_after_the_dependency() -> None:
    async with Engine() as engine:
        engine.breaker("payments")
        assert "actorbus.breaker.payments" in engine.metrics().actors


# ----------------------------------------------------- the virtual clock


class TestOnTheVirtualClock:
    @pytest.fixture
    def anyio_backend(self) -> Any:
        # autojump: when every task is blocked the clock jumps to the next
        # deadline, so the timeouts take no wall time and the times are exact.
        return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})

    async def test_the_breaker_goes_half_open_exactly_at_timeout_not_before(
        self, transitions: Transitions
    ) -> None:
        async with Engine() as engine:
            config = CircuitBreakerConfig(failure_threshold=1, timeout=30)
            breaker = engine.breaker("dep", config)
            await fail_times(breaker, 1)
            opened = anyio.current_time()
            assert breaker.state is OPEN
            await anyio.sleep_until(opened + 30 - 1e-6)
            assert breaker.state is OPEN
            with pytest.raises(CircuitOpenError) as info:
                await breaker.call(ok)
            assert info.value.retry_after == pytest.approx(1e-6, abs=1e-9)
            await transitions.reach(breaker, HALF_OPEN)
            assert anyio.current_time() == opened + 30
            assert breaker.state is HALF_OPEN
            assert [(state, at - opened) for _, state, at in transitions.seen] == [
                (OPEN, 0.0),
                (HALF_OPEN, 30.0),
            ]

    async def test_retry_after_counts_down_with_the_clock(self, transitions: Transitions) -> None:
        async with Engine() as engine:
            breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=10))
            await fail_times(breaker, 1)
            opened = anyio.current_time()
            seen: list[float] = []
            for elapsed in (0.0, 2.5, 7.0, 9.75):
                await anyio.sleep_until(opened + elapsed)
                with pytest.raises(CircuitOpenError) as info:
                    await breaker.call(ok)
                seen.append(info.value.retry_after)
            assert seen == pytest.approx([10.0, 7.5, 3.0, 0.25])
            await transitions.reach(breaker, HALF_OPEN)
            assert anyio.current_time() == opened + 10
            assert await breaker.call(ok) == "ok"  # a probe

    async def test_a_reopened_breaker_waits_a_whole_timeout_from_the_reopening(
        self, transitions: Transitions
    ) -> None:
        async with Engine() as engine:
            breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=10))
            await fail_times(breaker, 1)
            start = anyio.current_time()
            await anyio.sleep_until(start + 13)
            assert breaker.state is HALF_OPEN
            await fail_times(breaker, 1)  # the probe fails at 13
            assert breaker.state is OPEN
            with pytest.raises(CircuitOpenError) as info:
                await breaker.call(ok)
            assert info.value.retry_after == pytest.approx(10)
            await anyio.sleep_until(start + 22.5)
            assert breaker.state is OPEN
            await transitions.reach(breaker, HALF_OPEN)
            assert anyio.current_time() == start + 23
            assert breaker.state is HALF_OPEN
            assert [(state, at - start) for _, state, at in transitions.seen] == [
                (OPEN, 0.0),
                (HALF_OPEN, 10.0),
                (OPEN, 13.0),
                (HALF_OPEN, 23.0),
            ]

    async def test_force_open_while_open_restarts_the_timeout(
        self, transitions: Transitions
    ) -> None:
        async with Engine() as engine:
            breaker = engine.breaker("dep", CircuitBreakerConfig(timeout=10))
            start = anyio.current_time()
            await breaker.force_open()
            await anyio.sleep_until(start + 4)
            await breaker.force_open()
            await anyio.sleep_until(start + 13.5)
            assert breaker.state is OPEN
            await transitions.reach(breaker, HALF_OPEN)
            assert anyio.current_time() == start + 14
            assert breaker.state is HALF_OPEN
            assert breaker.metrics().transitions == 2

    async def test_a_breaker_opened_before_the_engine_runs_admits_probes_a_timeout_after(
        self, transitions: Transitions
    ) -> None:
        # Its actor starts the open timer when it starts, counting from the opening,
        # so the retry_after its callers were told holds.
        engine = Engine()
        breaker = engine.breaker("dep", CircuitBreakerConfig(failure_threshold=1, timeout=10))
        await fail_times(breaker, 1)
        opened = anyio.current_time()
        assert breaker.state is OPEN
        await anyio.sleep(4)
        with pytest.raises(CircuitOpenError) as info:
            await breaker.call(ok)
        assert info.value.retry_after == pytest.approx(6)
        async with engine:
            assert breaker.state is OPEN
            await transitions.reach(breaker, HALF_OPEN)
            assert anyio.current_time() == opened + 10
            assert await breaker.call(ok) == "ok"
            assert await breaker.call(ok) == "ok"
            assert breaker.state is CLOSED
        assert transitions.states("dep") == [OPEN, HALF_OPEN, CLOSED]
        assert breaker.metrics().transitions == 3

    async def test_every_transition_is_counted_and_logged_once_whoever_made_it(
        self, transitions: Transitions
    ) -> None:
        config = CircuitBreakerConfig(failure_threshold=1, success_threshold=1, timeout=30)
        async with Engine() as engine:
            breaker = engine.breaker("dep", config)
            counts: list[tuple[CircuitState, int]] = []

            def step() -> None:
                counts.append((breaker.state, breaker.metrics().transitions))

            await breaker.force_open()  # the actor
            step()
            await transitions.reach(breaker, HALF_OPEN, within=60)  # the timer
            step()
            await breaker.call(ok)  # a caller
            step()
            await fail_times(breaker, 1)  # a caller
            step()
            await breaker.reset()  # the actor
            step()
            assert counts == [(OPEN, 1), (HALF_OPEN, 2), (CLOSED, 3), (OPEN, 4), (CLOSED, 5)]
        assert transitions.states("dep") == [OPEN, HALF_OPEN, CLOSED, OPEN, CLOSED]
        assert engine.metrics().breakers["dep"].transitions == 5

    async def test_reset_cancels_the_open_timer(self, transitions: Transitions) -> None:
        async with Engine() as engine:
            breaker = engine.breaker("dep", CircuitBreakerConfig(timeout=10))
            await breaker.force_open()
            start = anyio.current_time()
            await anyio.sleep_until(start + 5)
            await breaker.reset()
            await anyio.sleep(60)
            assert breaker.state is CLOSED
            assert transitions.states("dep") == [OPEN, CLOSED]

    async def test_half_open_stays_half_open_until_its_probes_decide(self) -> None:
        async with Engine() as engine:
            config = CircuitBreakerConfig(timeout=10, success_threshold=2)
            breaker = engine.breaker("dep", config)
            await breaker.force_open()
            await anyio.sleep(10)
            await anyio.sleep(3600)
            assert breaker.state is HALF_OPEN
            await breaker.call(ok)
            await breaker.call(ok)
            assert breaker.state is CLOSED

    async def test_a_slow_call_times_out_exactly_at_call_timeout(self) -> None:
        config = CircuitBreakerConfig(failure_threshold=2, timeout=60, call_timeout=1.5)
        async with Engine() as engine:
            breaker = engine.breaker("dep", config)
            start = anyio.current_time()
            await breaker.call(anyio.sleep, 1.4)  # within call_timeout: a success
            assert anyio.current_time() - start == pytest.approx(1.4)
            start = anyio.current_time()
            with pytest.raises(TimeoutError):
                await breaker.call(anyio.sleep, 30)
            assert anyio.current_time() - start == pytest.approx(1.5)
            with pytest.raises(TimeoutError):
                await breaker.call(anyio.sleep_forever)
            assert breaker.state is OPEN
            assert breaker.metrics().failures == 2

    async def test_a_caller_deadline_before_call_timeout_is_not_a_failure(self) -> None:
        config = CircuitBreakerConfig(failure_threshold=1, timeout=60, call_timeout=10)
        async with Engine() as engine:
            breaker = engine.breaker("dep", config)
            start = anyio.current_time()
            with pytest.raises(TimeoutError):
                with anyio.fail_after(2):
                    await breaker.call(anyio.sleep, 30)
            assert anyio.current_time() - start == pytest.approx(2)
            assert breaker.state is CLOSED
            assert breaker.metrics().failures == 0

    async def test_state_changes_are_logged_with_their_levels(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG, logger="actorbus.breaker")
        async with Engine() as engine:
            breaker = engine.breaker("db", CircuitBreakerConfig(timeout=5, success_threshold=1))
            await breaker.force_open()
            await anyio.sleep(6)  # the timer ran out at 5
            await breaker.call(ok)
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            ("WARNING", "breaker 'db': closed -> open"),
            ("INFO", "breaker 'db': open -> half_open"),
            ("INFO", "breaker 'db': half_open -> closed"),
        ]
