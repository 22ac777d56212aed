"""A first look at actorbus: a few actors, an ask, a crash and its restart.

Run: python3 examples/quickstart.py [asyncio|trio]
"""

from __future__ import annotations

import sys
from typing import Any

import anyio

from engine import Actor, ActorRef, Backoff, Engine, Strategy


class Counter(Actor):
    """Keeps a count; its state is lost when it crashes and restarts fresh."""

    def __init__(self) -> None:
        self.count = 0

    async def on_start(self) -> None:
        print(f"  [counter] on_start (count={self.count})")

    async def on_restart(self, error: BaseException) -> None:
        print(f"  [counter] on_restart after {type(error).__name__}: {error}")

    async def on_stop(self) -> None:
        print(f"  [counter] on_stop (count={self.count})")

    async def receive(self, message: Any) -> Any:
        match message:
            case ("add", int(n)):
                self.count += n
                return self.count
            case "get":
                return self.count
            case "crash":
                raise RuntimeError("simulated crash")
            case _:
                raise ValueError(f"unknown message {message!r}")


class Greeter(Actor):
    """Talks to the counter through its ref: actors never hold each other."""

    def __init__(self, counter: ActorRef[Any]) -> None:
        self.counter = counter

    async def receive(self, name: str) -> str:
        visits = await self.counter.ask(("add", 1))
        return f"hello {name}, you are visitor #{visits}"


async def main() -> None:
    async with Engine() as engine:
        sup = await engine.supervisor(
            "app", strategy=Strategy.ONE_FOR_ONE, backoff=Backoff(initial=0.05)
        )
        counter = await sup.spawn(Counter, name="counter", max_attempts=2)
        greeter = await sup.spawn(lambda: Greeter(counter), name="greeter")

        print("1. tell and ask")
        await counter.tell(("add", 10))
        print(f"   count is {await counter.ask('get')}")
        print(f"   {await greeter.ask('ada')}")

        print("2. a crash: the counter is restarted with fresh state, the message retried")
        try:
            await counter.ask("crash")
        except RuntimeError as exc:
            print(f"   ask raised the handler's error after 2 attempts: {exc}")
        print(f"   count is {await counter.ask('get')} (a fresh instance)")
        print(f"   {await greeter.ask('grace')}")

        print("3. dead letters keep what could not be handled")
        for letter in engine.dead_letters.list():
            print(f"   #{letter.id} {letter.actor}: {letter.message!r} {letter.reason}")
            print(f"      {letter.error}, attempts={letter.attempts}")

        print("4. statistics")
        for stats in engine.metrics().actors.values():
            print(
                f"   {stats.name}: processed={stats.processed} failed={stats.failed} "
                f"restarts={stats.restarts} peak_depth={stats.peak_depth}"
            )
        print("5. leaving the engine: drain, then on_stop in reverse start order")
    print("done")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
