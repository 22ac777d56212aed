"""Supervision: a poison message, restarts with backoff, REST_FOR_ONE and a dead letter.

Run: python3 examples/supervision.py [asyncio|trio]

Three actors under one REST_FOR_ONE supervisor, started in this order: a reader,
a parser and a writer. The parser crashes on a poison message; each crash
restarts the parser and the writer (started after it) with a growing backoff,
while the reader (started before it) keeps running. After three attempts the
poison becomes a dead letter and the parser goes on with the next message.
"""

from __future__ import annotations

import itertools
import sys
from typing import Any

import anyio

from engine import Actor, ActorState, Backoff, Engine, Strategy

BACKOFF = Backoff(initial=0.05, maximum=1.0, multiplier=2.0, jitter=0.0)


class Announcing(Actor):
    """Prints its lifecycle so the restarts show."""

    label = "actor"

    async def on_start(self) -> None:
        print(f"  [{self.label}] on_start")

    async def on_restart(self, error: BaseException) -> None:
        print(f"  [{self.label}] on_restart after {type(error).__name__}: {error}")


class Reader(Announcing):
    label = "reader"

    async def receive(self, message: Any) -> Any:
        return message


class Writer(Announcing):
    """Counts what it wrote; the count is lost when it is restarted."""

    label = "writer"

    def __init__(self) -> None:
        self.written: list[str] = []

    async def receive(self, message: Any) -> Any:
        if message == "get":
            return list(self.written)
        self.written.append(message)
        return len(self.written)


class Parser(Announcing):
    label = "parser"

    def __init__(self, engine: Engine, attempts: list[float]) -> None:
        self.engine = engine
        self.attempts = attempts

    async def receive(self, message: Any) -> Any:
        if message == "poison":
            self.attempts.append(anyio.current_time())
            raise ValueError("cannot parse 'poison'")
        # The writer is started after the parser, so it is looked up by name.
        return await self.engine.actor("writer").ask(message.upper())


async def main() -> None:
    attempts: list[float] = []
    async with Engine() as engine:
        sup = await engine.supervisor(
            "pipeline", strategy=Strategy.REST_FOR_ONE, max_restarts=5, backoff=BACKOFF
        )
        print("1. start reader, parser, writer under a REST_FOR_ONE supervisor")
        reader = await sup.spawn(Reader, name="reader")
        parser = await sup.spawn(lambda: Parser(engine, attempts), name="parser", max_attempts=3)
        writer = await sup.spawn(Writer, name="writer")

        print("2. two good messages")
        for message in ("a", "b"):
            await parser.ask(message)
        print(f"   writer has {await writer.ask('get')}")

        print("3. a poison message: 3 attempts, each failure restarts parser and writer")
        try:
            await parser.ask("poison")
        except ValueError as exc:
            print(f"   ask raised after 3 attempts: {exc}")
        gaps = [round((b - a) * 1000) for a, b in itertools.pairwise(attempts)]
        print(f"   attempts: {len(attempts)}, gaps between them (backoff) in ms: {gaps}")
        print(f"   backoff grows: {all(b > a for a, b in itertools.pairwise(gaps))}")
        # The last failure restarts both once more (after its backoff); wait for it.
        for _ in range(500):
            now = [ref.statistics() for ref in (parser, writer)]
            if all(s.restarts == 3 and s.state is ActorState.RUNNING for s in now):
                break
            await anyio.sleep(0.01)

        print("4. the parser goes on; the writer is a fresh instance")
        await parser.ask("c")
        print(f"   writer has {await writer.ask('get')}")
        print(f"   reader still answers: {await reader.ask('ping')}")

        print("5. the poison is a dead letter")
        for letter in engine.dead_letters.list():
            print(
                f"   #{letter.id} {letter.actor}: {letter.message!r} {letter.reason}, "
                f"{letter.error}, attempts={letter.attempts}"
            )

        print("6. engine.metrics(): restarts per actor")
        actors = engine.metrics().actors
        for name in ("reader", "parser", "writer"):
            stats = actors[name]
            print(
                f"   {name}: restarts={stats.restarts} processed={stats.processed} "
                f"failed={stats.failed}"
            )
    print("done")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
