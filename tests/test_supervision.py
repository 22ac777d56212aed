"""Supervision: retries, restarts, strategies, restart intensity, escalation."""

from __future__ import annotations

import functools
import logging
from typing import Any

import anyio
import pytest

from engine import (
    Actor,
    ActorStopped,
    Backoff,
    Engine,
    Restart,
    Strategy,
    SupervisorEscalation,
)
from tests.helpers import Poison, user_actors

pytestmark = pytest.mark.anyio

FAST = Backoff(initial=0.0, maximum=0.0, jitter=0.0)


async def test_failed_message_is_retried_on_a_fresh_instance_then_dead_lettered() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=FAST)
        ref = await sup.spawn(lambda: Poison(journal), name="p", max_attempts=3)
        ref.try_tell("poison")
        ref.try_tell("ok")
        assert await ref.ask("sync") == "sync"
        [letter] = engine.dead_letters.list()
        assert letter.message == "poison"
        assert letter.reason == "failed"
        assert letter.attempts == 3
        assert letter.error == "ValueError: cannot digest"
        assert letter.traceback is not None
        assert "cannot digest" in letter.traceback
        assert "receive" in letter.traceback
        stats = ref.statistics()
        assert (stats.failed, stats.restarts, stats.processed) == (3, 3, 2)
    assert journal == [
        "p:start",
        *["p:stop", "p:restart:ValueError", "p:start"] * 3,
        "p:got:ok",
        "p:got:sync",
        "p:stop",
    ]


async def test_a_burst_of_poison_messages_never_takes_the_engine_down() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=FAST, max_restarts=1, within=60)
        ref = await sup.spawn(lambda: Poison(journal), name="p", max_attempts=2)
        for _ in range(50):
            await ref.tell("poison")
        assert await ref.ask("alive") == "alive"
        assert engine.dead_letters.count() == 50
        assert ref.statistics().restarts == 100


async def test_queued_messages_survive_a_restart() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=FAST)
        ref = await sup.spawn(lambda: Poison(journal), name="p", max_attempts=1)
        for message in ["a", "poison", "b", "c"]:
            ref.try_tell(message)
        await ref.ask("sync")
    assert [j for j in journal if ":got:" in j] == ["p:got:a", "p:got:b", "p:got:c", "p:got:sync"]


class Crashy(Actor):
    """Fails in on_start of every restarted instance: a crash outside receive."""

    def __init__(self, journal: list[str], name: str, fail_restart_in: str = "on_start"):
        self.journal = journal
        self.name = name
        self.fail_restart_in = fail_restart_in
        self.restarted = False

    async def on_restart(self, error: BaseException) -> None:
        self.restarted = True
        self.journal.append(f"{self.name}:restart")
        if self.fail_restart_in == "on_restart":
            raise RuntimeError("on_restart broke")

    async def on_start(self) -> None:
        self.journal.append(f"{self.name}:start")
        if self.restarted and self.fail_restart_in == "on_start":
            raise RuntimeError("on_start broke")

    async def on_stop(self) -> None:
        self.journal.append(f"{self.name}:stop")

    async def receive(self, message: Any) -> None:
        raise ValueError("trigger")


@pytest.mark.parametrize("where", ["on_start", "on_restart"])
async def test_restart_storm_escalates_out_of_the_engine(where: str) -> None:
    journal: list[str] = []
    with pytest.raises(SupervisorEscalation, match="'root' gave up") as info:
        async with Engine() as engine:
            ref = await engine.spawn(lambda: Crashy(journal, "c", where), name="c")
            await ref.tell("go")
            await anyio.sleep_forever()
    assert isinstance(info.value.__cause__, RuntimeError)
    assert str(info.value.__cause__) == f"{where} broke"
    # One restart after the message failure, then one after each of the 3
    # allowed crashes; the 4th crash within 5 s exceeds the intensity.
    assert journal.count("c:restart") == 4


async def test_message_failures_do_not_count_toward_intensity_but_crashes_do() -> None:
    journal: list[str] = []
    escalated = anyio.Event()

    class Watcher(Poison):
        async def on_restart(self, error: BaseException) -> None:
            await super().on_restart(error)
            if isinstance(error, SupervisorEscalation):
                escalated.set()

    class CrashOnce(Crashy):
        crashes = 1

        async def on_start(self) -> None:
            self.journal.append(f"{self.name}:start")
            if self.restarted and CrashOnce.crashes:
                CrashOnce.crashes -= 1
                raise RuntimeError("on_start broke")

    async with Engine() as engine:
        sup = await engine.supervisor("sup", backoff=FAST, max_restarts=0, within=60)
        watcher = await sup.spawn(lambda: Watcher(journal, "p"), name="p", max_attempts=3)
        for _ in range(5):
            await watcher.tell("poison")
        assert await watcher.ask("ok") == "ok"
        assert not escalated.is_set()
        assert engine.dead_letters.count() == 5
        crashy = await sup.spawn(lambda: CrashOnce(journal, "c"), name="c", max_attempts=1)
        await crashy.tell("go")
        # One crash exceeds max_restarts=0: sup gives up, the root restarts it
        # and with it both children.
        await escalated.wait()
        assert await watcher.ask("again") == "again"
        assert sup.children == ["p", "c"]
        assert watcher.statistics().restarts == 16


async def test_one_for_all_restarts_every_sibling_in_order() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", strategy=Strategy.ONE_FOR_ALL, backoff=FAST)
        refs = [
            await sup.spawn(functools.partial(Poison, journal, n), name=n, max_attempts=1)
            for n in ("a", "b", "c")
        ]
        journal.clear()
        await refs[1].tell("poison")
        for ref in refs[1:]:
            assert await ref.ask("x") == "x"
    lifecycle = [entry for entry in journal if ":got:" not in entry]
    assert lifecycle[:9] == [
        "b:stop",
        "c:stop",
        "a:stop",
        "a:restart:ValueError",
        "a:start",
        "b:restart:ValueError",
        "b:start",
        "c:restart:ValueError",
        "c:start",
    ]


async def test_rest_for_one_restarts_the_failed_child_and_those_after_it() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", strategy=Strategy.REST_FOR_ONE, backoff=FAST)
        refs = [
            await sup.spawn(functools.partial(Poison, journal, n), name=n, max_attempts=1)
            for n in ("a", "b", "c")
        ]
        journal.clear()
        await refs[1].tell("poison")
        for ref in refs[1:]:
            await ref.ask("x")
        assert [r.statistics().restarts for r in refs] == [0, 1, 1]
    assert [entry for entry in journal if ":got:" not in entry][:6] == [
        "b:stop",
        "c:stop",
        "b:restart:ValueError",
        "b:start",
        "c:restart:ValueError",
        "c:start",
    ]


async def test_temporary_siblings_are_stopped_not_restarted_in_a_group_restart() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup", strategy=Strategy.ONE_FOR_ALL, backoff=FAST)
        a = await sup.spawn(lambda: Poison(journal, "a"), name="a", max_attempts=1)
        t = await sup.spawn(lambda: Poison(journal, "t"), name="t", restart=Restart.TEMPORARY)
        await a.tell("poison")
        assert await a.ask("x") == "x"
        with pytest.raises(ActorStopped):
            await t.ask("x")
        assert sup.children == ["a"]


async def test_failing_temporary_actor_is_not_restarted() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Poison(journal, "t"), name="t", restart=Restart.TEMPORARY, max_attempts=3
        )
        ref.try_tell("poison")
        ref.try_tell("after")
        with pytest.raises(ActorStopped):
            await ref.ask("x")
        letters = engine.dead_letters.list()
        assert [(d.message, d.reason, d.attempts) for d in letters] == [
            ("poison", "failed", 1),
            ("after", "stopped", 0),
            ("x", "stopped", 0),
        ]


async def test_transient_actor_is_restarted_after_a_failure() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        ref = await engine.spawn(
            lambda: Poison(journal, "t"), name="t", restart=Restart.TRANSIENT, max_attempts=1
        )
        await ref.tell("poison")
        assert await ref.ask("x") == "x"
        assert ref.statistics().restarts == 1


async def test_on_stop_errors_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    class BadStop(Actor):
        async def receive(self, message: Any) -> Any:
            return message

        async def on_stop(self) -> None:
            raise OSError("cleanup failed")

    with caplog.at_level(logging.ERROR, logger="actorbus"):
        async with Engine() as engine:
            ref = await engine.spawn(BadStop, name="bad")
            await ref.ask(1)
            await ref.stop()
            await engine.spawn(BadStop, name="bad2")
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "on_stop of actor 'bad' raised",
        "on_stop of actor 'bad2' raised",
    ]


async def test_stopping_a_supervisor_stops_its_children_in_reverse_order() -> None:
    journal: list[str] = []
    async with Engine() as engine:
        sup = await engine.supervisor("sup")
        for n in ("a", "b", "c"):
            await sup.spawn(functools.partial(Poison, journal, n), name=n)
        await sup.stop()
        assert user_actors(engine) == {}
        with pytest.raises(ActorStopped):
            await sup.spawn(lambda: Poison(journal), name="late")
        # Its name is free again.
        await engine.supervisor("sup")
    assert journal[3:] == ["c:stop", "b:stop", "a:stop"]


async def test_on_start_failure_of_a_child_under_a_nested_supervisor_raises_at_spawn() -> None:
    class Fails(Actor):
        async def on_start(self) -> None:
            raise LookupError("missing")

    async with Engine() as engine:
        sup = await engine.supervisor("sup")
        with pytest.raises(LookupError):
            await sup.spawn(Fails, name="f")
        assert sup.children == []
