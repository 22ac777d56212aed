"""Time-based behaviour on trio's virtual clock: backoff, intensity windows, timeouts."""

from __future__ import annotations

import itertools
from typing import Any

import anyio
import pytest
import trio.testing

from engine import (
    Actor,
    AskTimeout,
    Backoff,
    Engine,
    Strategy,
    SupervisorEscalation,
)
from tests.helpers import Poison

pytestmark = pytest.mark.anyio

EXACT = Backoff(initial=1.0, maximum=8.0, multiplier=2.0, jitter=0.0)


@pytest.fixture
def anyio_backend() -> Any:
    # autojump: when every task is blocked the clock jumps to the next deadline,
    # so a 60 s timeout takes no wall time and timings are exact.
    return ("trio", {"clock": trio.testing.MockClock(autojump_threshold=0)})


class Timed(Actor):
    """Journals the virtual time of each (re)start; fails on 'poison' and 'crash'."""

    def __init__(self, times: list[float], crash_on_restart: list[bool]) -> None:
        self.times = times
        self.crash_on_restart = crash_on_restart

    async def on_restart(self, error: BaseException) -> None:
        self.times.append(anyio.current_time())
        if self.crash_on_restart and self.crash_on_restart.pop(0):
            raise RuntimeError("restart failed")

    async def receive(self, message: Any) -> Any:
        if message == "poison":
            raise ValueError("poison")
        return message


def gaps(times: list[float], start: float) -> list[float]:
    points = [start, *times]
    return [round(b - a, 6) for a, b in itertools.pairwise(points)]


async def test_message_failure_backoff_grows_per_attempt_and_starts_over() -> None:
    times: list[float] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=EXACT)
        ref = await sup.spawn(lambda: Timed(times, []), name="t", max_attempts=3)
        start = anyio.current_time()
        ref.try_tell("poison")
        ref.try_tell("poison")
        await ref.ask("ok", timeout=None)
    # Per message: 1 s, 2 s, 4 s (the third failure dead-letters it), then the
    # next poison message starts over at 1 s.
    assert gaps(times, start) == [1.0, 2.0, 4.0, 1.0, 2.0, 4.0]
    assert engine.dead_letters.count() == 2


async def test_crash_backoff_grows_with_consecutive_crashes_and_is_capped() -> None:
    times: list[float] = []
    crashes = [True, True, True, True, True, False]
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=EXACT, max_restarts=10, within=100)
        ref = await sup.spawn(lambda: Timed(times, crashes), name="t", max_attempts=1)
        start = anyio.current_time()
        await ref.tell("poison")
        await ref.ask("ok", timeout=None)
    # The message failure costs 1 s; then each crash of the restart doubles
    # the delay up to the 8 s maximum.
    assert gaps(times, start) == [1.0, 1.0, 2.0, 4.0, 8.0, 8.0]


async def test_crash_backoff_starts_over_after_a_quiet_period() -> None:
    times: list[float] = []
    crashes = [True, False, True, False]
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=EXACT, max_restarts=10, within=10)
        ref = await sup.spawn(lambda: Timed(times, crashes), name="t", max_attempts=1)
        start = anyio.current_time()
        await ref.tell("poison")
        await ref.ask("ok", timeout=None)
        await anyio.sleep(30)  # longer than `within` without a crash
        start_again = anyio.current_time()
        await ref.tell("poison")
        await ref.ask("ok", timeout=None)
    assert gaps(times[:2], start) == [1.0, 1.0]
    assert gaps(times[2:], start_again) == [1.0, 1.0]


async def test_crashes_spread_wider_than_within_do_not_escalate() -> None:
    times: list[float] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=EXACT, max_restarts=1, within=5)
        crashes = [True, False] * 5
        ref = await sup.spawn(lambda: Timed(times, crashes), name="t", max_attempts=1)
        for _ in range(5):
            await ref.tell("poison")
            await ref.ask("ok", timeout=None)
            await anyio.sleep(10)
    assert len(times) == 10


async def test_crashes_within_the_window_escalate_with_the_cause() -> None:
    times: list[float] = []
    with pytest.raises(SupervisorEscalation) as info:
        async with Engine() as engine:
            quick = Backoff(initial=0.1, maximum=0.1, jitter=0.0)
            sup = await engine.supervisor("sup", backoff=quick, max_restarts=2, within=60)
            ref = await sup.spawn(lambda: Timed(times, [True] * 10), name="t")
            await ref.tell("poison")
            await anyio.sleep_forever()
    # 'sup' gave up; root restarted it 3 times (its own intensity), then gave up.
    assert "'root' gave up" in str(info.value)
    assert isinstance(info.value.__cause__, SupervisorEscalation)
    assert "'sup' gave up" in str(info.value.__cause__)
    assert isinstance(info.value.__cause__.__cause__, RuntimeError)


async def test_nested_supervisor_escalates_to_its_parent_which_restarts_it() -> None:
    journal: list[str] = []

    class CrashOnce(Poison):
        restarted = 0

        async def on_restart(self, error: BaseException) -> None:
            await super().on_restart(error)
            CrashOnce.restarted += 1
            if CrashOnce.restarted <= 1:
                raise RuntimeError("restart failed")

    async with Engine() as engine:
        outer = await engine.supervisor("outer", backoff=EXACT, max_restarts=5, within=60)
        inner = await outer.supervisor("inner", backoff=EXACT, max_restarts=0, within=60)
        worker = await inner.spawn(lambda: Poison(journal, "w"), name="w")
        crashy = await inner.spawn(lambda: CrashOnce(journal, "c"), name="c", max_attempts=1)
        journal.clear()
        await crashy.tell("poison")
        await anyio.sleep(60)
        assert await worker.ask("x") == "x"
        assert await crashy.ask("y") == "y"
        assert outer.children == ["inner"]
        assert inner.children == ["w", "c"]
    lifecycle = [entry for entry in journal if ":got:" not in entry]
    # c's message failure restarts c, whose on_restart fails: inner (0 crashes
    # allowed) stops its children in reverse order and escalates; outer
    # restarts inner, which restarts its children in start order.
    assert lifecycle[:8] == [
        "c:stop",
        "c:restart:ValueError",
        "w:stop",
        "w:restart:SupervisorEscalation",
        "w:start",
        "c:restart:SupervisorEscalation",
        "c:start",
        "c:stop",
    ]


async def test_one_for_all_waits_one_backoff_for_the_whole_group() -> None:
    times: list[float] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", strategy=Strategy.ONE_FOR_ALL, backoff=EXACT)
        a = await sup.spawn(lambda: Timed(times, []), name="a")
        b = await sup.spawn(lambda: Timed(times, []), name="b", max_attempts=1)
        start = anyio.current_time()
        await b.tell("poison")
        await a.ask("x", timeout=None)
        await b.ask("x", timeout=None)
    assert gaps(times, start) == [1.0, 0.0]


async def test_ask_times_out_after_exactly_its_timeout() -> None:
    class Never(Actor):
        async def receive(self, message: Any) -> None:
            await anyio.sleep_forever()

    async with Engine(shutdown_timeout=1) as engine:
        ref = await engine.spawn(Never, name="n")
        start = anyio.current_time()
        with pytest.raises(AskTimeout):
            await ref.ask("x", timeout=30)
        assert anyio.current_time() - start == 30
        with pytest.raises(AskTimeout):
            await ref.ask("queued", timeout=0)


async def test_shutdown_timeout_dead_letters_what_could_not_finish() -> None:
    stopped: list[str] = []

    class Slow(Actor):
        async def receive(self, message: Any) -> None:
            await anyio.sleep(100)

        async def on_stop(self) -> None:
            stopped.append("slow")

    async with Engine(shutdown_timeout=5) as engine:
        ref = await engine.spawn(Slow, name="slow")
        for i in range(3):
            ref.try_tell(i)
        await anyio.wait_all_tasks_blocked()
        start = anyio.current_time()
    assert anyio.current_time() - start == 5
    assert stopped == ["slow"]
    assert [(d.message, d.reason) for d in engine.dead_letters.list()] == [
        (0, "shutdown"),
        (1, "shutdown"),
        (2, "shutdown"),
    ]
    assert engine.metrics().in_flight == 0


async def test_on_stop_that_hangs_is_cut_off_at_the_shutdown_timeout() -> None:
    class Hangs(Actor):
        async def receive(self, message: Any) -> None:
            return None

        async def on_stop(self) -> None:
            await anyio.sleep_forever()

    start = anyio.current_time()
    async with Engine(shutdown_timeout=3) as engine:
        await engine.spawn(Hangs, name="h")
    assert anyio.current_time() - start == 3


async def test_a_subscription_whose_factory_fails_midway_does_not_hold_up_shutdown() -> None:
    from engine.catalog import TagCreated

    made: list[int] = []

    class Handler(Actor):
        async def receive(self, message: Any) -> None:
            return None

    def factory() -> Actor:
        made.append(1)
        if len(made) == 2:
            raise OSError("second partition cannot be built")
        return Handler()

    async with Engine(shutdown_timeout=30) as engine:
        with pytest.raises(OSError, match="second partition"):
            engine.subscribe(TagCreated, handler=factory, name="half", partitions=2)
        assert "half#0" not in engine.metrics().actors
        assert "subscription:half" not in engine.root.children
        start = anyio.current_time()
    # Nothing was left counted as busy: the drain ended at once, not after 30 s.
    assert anyio.current_time() - start == 0
