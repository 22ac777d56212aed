"""Small actors shared by the tests."""

from __future__ import annotations

from typing import Any

import anyio

from engine import Actor, ActorStatistics, Engine


class Recorder(Actor):
    """Records every message it receives; replies with the message."""

    def __init__(self, log: list[Any] | None = None) -> None:
        self.log = log if log is not None else []

    async def receive(self, message: Any) -> Any:
        self.log.append(message)
        return message


class Gate(Actor):
    """Blocks on its first message until the gate opens: keeps a mailbox full."""

    def __init__(self, gate: anyio.Event, log: list[Any], entered: anyio.Event | None = None):
        self.gate = gate
        self.log = log
        self.entered = entered

    async def receive(self, message: Any) -> Any:
        if self.entered is not None:
            self.entered.set()
        await self.gate.wait()
        self.log.append(message)
        return message


class Poison(Actor):
    """Fails on messages equal to 'poison'; journals lifecycle calls."""

    def __init__(self, journal: list[str], name: str = "p") -> None:
        self.journal = journal
        self.name = name

    async def on_start(self) -> None:
        self.journal.append(f"{self.name}:start")

    async def on_restart(self, error: BaseException) -> None:
        self.journal.append(f"{self.name}:restart:{type(error).__name__}")

    async def on_stop(self) -> None:
        self.journal.append(f"{self.name}:stop")

    async def receive(self, message: Any) -> Any:
        if message == "poison":
            raise ValueError("cannot digest")
        self.journal.append(f"{self.name}:got:{message}")
        return message


def user_actors(engine: Engine) -> dict[str, ActorStatistics]:
    """The application's actors: every actor but the engine's own (``actorbus.*``)."""
    return {
        name: stats
        for name, stats in engine.metrics().actors.items()
        if not name.startswith("actorbus.")
    }
