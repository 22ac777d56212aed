"""Bad arguments are refused at the call with an error naming the argument and the rule."""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from engine import (
    Actor,
    ActorRef,
    Backoff,
    Engine,
    Overflow,
    Restart,
    Strategy,
    SupervisorRef,
)
from tests.helpers import Recorder, user_actors

pytestmark = pytest.mark.anyio

Spawn = Callable[..., Awaitable[ActorRef[Any]]]


class Counted(Actor):
    """An actor whose instances are counted, to show a refused spawn built none."""

    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1

    async def receive(self, message: Any) -> Any:
        return message


@pytest.fixture(params=["engine", "supervisor"])
def where(request: pytest.FixtureRequest) -> str:
    """Spawn through ``engine.spawn`` or through a nested supervisor's ``spawn``."""
    param: str = request.param
    return param


async def spawner(engine: Engine, where: str) -> tuple[Spawn, SupervisorRef | None]:
    if where == "engine":
        return engine.spawn, None
    sup = await engine.supervisor("sup")
    return sup.spawn, sup


async def assert_spawn_refused(
    where: str,
    error: type[Exception] | tuple[type[Exception], ...],
    match: str,
    factory: Any = Counted,
    **kwargs: Any,
) -> None:
    """Spawn with bad arguments: refused at the call, nothing built or registered."""
    kwargs.setdefault("name", "a")
    Counted.instances = 0
    async with Engine() as engine:
        spawn, sup = await spawner(engine, where)
        with pytest.raises(error, match=match):
            await spawn(factory, **kwargs)
        assert Counted.instances == 0
        assert user_actors(engine) == {}
        if sup is not None:
            assert sup.children == []
        # Nothing half-registered: a good spawn under any name still works.
        ref = await spawn(Counted, name="a")
        assert await ref.ask("ok") == "ok"


# ------------------------------------------------------------------- spawn


@pytest.mark.parametrize("capacity", [0, -1])
async def test_capacity_below_one_is_refused(where: str, capacity: int) -> None:
    await assert_spawn_refused(
        where, ValueError, rf"capacity must be >= 1, got {capacity}", capacity=capacity
    )


@pytest.mark.parametrize("capacity", [1.5, "10", True, None])
async def test_capacity_that_is_not_an_int_is_refused(where: str, capacity: object) -> None:
    await assert_spawn_refused(where, TypeError, r"capacity must be an int", capacity=capacity)


@pytest.mark.parametrize(
    "factory",
    [None, 42, "Recorder", Recorder()],
    # Stable ids (no object address), the same in every worker of a parallel run.
    ids=lambda value: type(value).__name__ if isinstance(value, Recorder) else repr(value),
)
async def test_factory_that_is_not_callable_is_refused(where: str, factory: object) -> None:
    await assert_spawn_refused(where, TypeError, r"factory must be callable", factory=factory)


@pytest.mark.parametrize("name", ["", "   ", "\t\n"])
async def test_blank_name_is_refused(where: str, name: str) -> None:
    await assert_spawn_refused(where, ValueError, r"name must not be empty", name=name)


@pytest.mark.parametrize("name", [None, 5, b"a"])
async def test_name_that_is_not_a_str_is_refused(where: str, name: object) -> None:
    await assert_spawn_refused(where, TypeError, r"name must be a str", name=name)


@pytest.mark.parametrize("max_attempts", [0, -3])
async def test_max_attempts_below_one_is_refused(where: str, max_attempts: int) -> None:
    await assert_spawn_refused(
        where,
        ValueError,
        rf"max_attempts must be >= 1, got {max_attempts}",
        max_attempts=max_attempts,
    )


@pytest.mark.parametrize("max_attempts", [2.0, "3", False])
async def test_max_attempts_that_is_not_an_int_is_refused(where: str, max_attempts: object) -> None:
    await assert_spawn_refused(
        where, TypeError, r"max_attempts must be an int", max_attempts=max_attempts
    )


@pytest.mark.parametrize("overflow", ["block", "BLOCK", 0, None, Restart.PERMANENT], ids=repr)
async def test_overflow_that_is_not_an_overflow_member_is_refused(
    where: str, overflow: object
) -> None:
    await assert_spawn_refused(
        where, (ValueError, TypeError), r"overflow must be .*Overflow\.BLOCK", overflow=overflow
    )


@pytest.mark.parametrize("restart", ["permanent", 1, None, Strategy.ONE_FOR_ONE], ids=repr)
async def test_restart_that_is_not_a_restart_member_is_refused(where: str, restart: object) -> None:
    await assert_spawn_refused(
        where, (ValueError, TypeError), r"restart must be .*Restart\.PERMANENT", restart=restart
    )


# -------------------------------------------------------------- supervisor


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"max_restarts": -1}, ValueError, r"max_restarts must be >= 0, got -1"),
        ({"max_restarts": 1.5}, TypeError, r"max_restarts must be an int"),
        ({"within": -1}, ValueError, r"within must be >= 0, got -1"),
        ({"within": math.nan}, ValueError, r"within must be >= 0, got nan"),
        ({"within": "5"}, TypeError, r"within must be a number of seconds"),
        ({"strategy": "one_for_one"}, (ValueError, TypeError), r"strategy must be .*Strategy"),
        ({"strategy": Restart.PERMANENT}, (ValueError, TypeError), r"strategy must be"),
        ({"backoff": 0.5}, TypeError, r"backoff must be a Backoff"),
        ({"backoff": {"initial": 1}}, TypeError, r"backoff must be a Backoff"),
    ],
    ids=repr,
)
async def test_bad_supervisor_arguments_are_refused(
    kwargs: dict[str, Any], error: type[Exception] | tuple[type[Exception], ...], match: str
) -> None:
    async with Engine() as engine:
        parent = await engine.supervisor("parent")
        for make in (engine.supervisor, parent.supervisor):
            with pytest.raises(error, match=match):
                await make("sup", **kwargs)
        assert engine.root.children == ["actorbus.dispatcher", "parent"]
        assert parent.children == []
        # The name was not taken by the refused call.
        await engine.supervisor("sup")


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("", ValueError, r"name must not be empty"),
        ("   ", ValueError, r"name must not be empty"),
        (None, TypeError, r"name must be a str"),
        (5, TypeError, r"name must be a str"),
    ],
)
async def test_bad_supervisor_name_is_refused(
    name: object, error: type[Exception], match: str
) -> None:
    async with Engine() as engine:
        with pytest.raises(error, match=match):
            await engine.supervisor(name)  # type: ignore[arg-type]
        assert engine.root.children == ["actorbus.dispatcher"]


# ---------------------------------------------------------------------- ask


@pytest.mark.parametrize(
    ("bad_timeout", "error", "match"),
    [
        (-1, ValueError, r"timeout must be >= 0, got -1"),
        (-0.5, ValueError, r"timeout must be >= 0"),
        (math.nan, ValueError, r"timeout must be >= 0, got nan"),
        ("5", TypeError, r"timeout must be a number of seconds"),
        (True, TypeError, r"timeout must be a number of seconds"),
    ],
    ids=repr,
)
async def test_bad_ask_timeout_is_refused_before_the_message_is_queued(
    bad_timeout: object, error: type[Exception], match: str
) -> None:
    log: list[Any] = []
    async with Engine() as engine:
        ref = await engine.spawn(lambda: Recorder(log), name="r")
        with pytest.raises(error, match=match):
            await ref.ask("bad", timeout=bad_timeout)  # type: ignore[arg-type]
        await ref.ask("good")
        assert log == ["good"]
        assert engine.metrics().in_flight == 0


# ------------------------------------------------------------------ Backoff


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial": -1}, r"Backoff\.initial must be a finite number >= 0, got -1"),
        ({"initial": math.inf}, r"Backoff\.initial must be a finite number >= 0, got inf"),
        ({"initial": math.nan}, r"Backoff\.initial must be a finite number"),
        ({"maximum": -1, "initial": 0}, r"Backoff\.maximum must be a finite number >= 0"),
        ({"initial": 2.0, "maximum": 1.0}, r"Backoff\.maximum must be >= initial \(2\.0\)"),
        ({"multiplier": 0.5}, r"Backoff\.multiplier must be >= 1, got 0\.5"),
        ({"multiplier": math.nan}, r"Backoff\.multiplier must be >= 1"),
        ({"jitter": 2}, r"Backoff\.jitter must be between 0 and 1, got 2"),
        ({"jitter": -0.1}, r"Backoff\.jitter must be between 0 and 1"),
        ({"initial": "1"}, r"Backoff\.initial must be a finite number"),
    ],
    ids=repr,
)
def test_bad_backoff_is_refused_when_built(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)


def test_edge_backoffs_are_accepted() -> None:
    assert Backoff(initial=0, maximum=0, jitter=0).delay(5) == 0
    assert Backoff(initial=1, maximum=1, multiplier=1, jitter=1).maximum == 1


# ------------------------------------------------------------------- Engine


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shutdown_timeout": -1}, ValueError, r"shutdown_timeout must be >= 0, got -1"),
        ({"shutdown_timeout": math.nan}, ValueError, r"shutdown_timeout must be >= 0"),
        ({"shutdown_timeout": None}, TypeError, r"shutdown_timeout must be a number"),
        ({"shutdown_timeout": "10"}, TypeError, r"shutdown_timeout must be a number"),
        ({"durability": "fast"}, ValueError, r"durability must be 'full' or 'normal'"),
        ({"durability": None}, ValueError, r"durability must be 'full' or 'normal'"),
        ({"dead_letter_limit": 0}, ValueError, r"dead_letter_limit must be >= 1, got 0"),
        ({"dead_letter_limit": -5}, ValueError, r"dead_letter_limit must be >= 1"),
        ({"dead_letter_limit": 2.5}, TypeError, r"dead_letter_limit must be an int"),
    ],
    ids=repr,
)
def test_bad_engine_arguments_are_refused_when_built(
    kwargs: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Engine(**kwargs)


def test_database_that_is_not_a_path_is_refused() -> None:
    with pytest.raises(TypeError, match=r"database must be a path or None, got int"):
        Engine(42)  # type: ignore[arg-type]


# ------------------------------------------------------------- dead letters


@pytest.mark.parametrize("limit", [-1, 1.5, "10", None], ids=repr)
async def test_bad_dead_letter_list_limit_is_refused(limit: object) -> None:
    async with Engine() as engine:
        with pytest.raises((ValueError, TypeError), match=r"limit must be an int >= 0"):
            engine.dead_letters.list(limit=limit)  # type: ignore[arg-type]


async def test_replay_of_an_unknown_dead_letter_raises_key_error() -> None:
    async with Engine() as engine:
        with pytest.raises(KeyError, match=r"no dead letter with id 999"):
            await engine.dead_letters.replay(999)
        with pytest.raises(KeyError, match=r"no dead letter with id 'x'"):
            await engine.dead_letters.replay("x")  # type: ignore[arg-type]


# ----------------------------------------------------------- at the call


async def test_refusals_happen_in_the_caller_not_later_in_a_task() -> None:
    # A refused spawn raises synchronously in the caller's own task: a task group
    # around the engine sees nothing, and the engine keeps running.
    async with anyio.create_task_group(), Engine() as engine:
        refused: list[dict[str, Any]] = [{"capacity": 0}, {"max_attempts": 0}, {"name": ""}]
        for kwargs in refused:
            with pytest.raises(ValueError, match=next(iter(kwargs))):
                await engine.spawn(Counted, **{"name": "a", **kwargs})
        ref = await engine.spawn(Counted, name="a")
        assert await ref.ask("still running") == "still running"
    assert user_actors(engine) == {}


async def test_good_edge_values_are_accepted() -> None:
    async with Engine(shutdown_timeout=0, dead_letter_limit=1, durability="normal") as engine:
        ref = await engine.spawn(
            Counted,
            name="edge",
            capacity=1,
            max_attempts=1,
            overflow=Overflow.DROP_OLDEST,
            restart=Restart.TEMPORARY,
        )
        assert await ref.ask("x", timeout=60) == "x"
        assert await ref.ask("y", timeout=None) == "y"
        await engine.supervisor("sup", max_restarts=0, within=0)
        assert engine.dead_letters.list(limit=0) == []
