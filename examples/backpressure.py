"""Backpressure: a fast publisher, a slow subscriber and the in-flight budget.

Run: python3 examples/backpressure.py [asyncio|trio]

With ``BackpressureConfig(max_depth=100)`` the engine is WARNING from 70 events
in flight and CRITICAL from 90; it leaves CRITICAL at 85 and WARNING at 65
(hysteresis 5). A publisher bursts events with ``try_publish`` until it is
refused, then ``publish(timeout=...)`` waits for room while the slow
subscriber catches up, and the state walks back to NORMAL.
"""

from __future__ import annotations

import sys

import anyio

from engine import BackpressureConfig, BackpressureError, BackpressureState, Engine, Event

HANDLING = 0.004  # seconds the slow subscriber spends on each event


class Tick(Event, tag="example.backpressure.tick"):
    n: int


class StateLog:
    """Prints every change of the backpressure state, with the depth it happened at."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.state = BackpressureState.NORMAL
        self.seen = [self.state.name]

    def check(self, where: str) -> None:
        bp = self.engine.metrics().backpressure
        if bp.state is not self.state:
            print(f"   {where}: depth {bp.depth:3} -> {self.state.name} to {bp.state.name}")
            self.state = bp.state
            self.seen.append(bp.state.name)


async def main() -> None:
    handled: list[int] = []

    async def slow(event: Tick) -> None:
        await anyio.sleep(HANDLING)
        handled.append(event.n)

    async with Engine(backpressure=BackpressureConfig(max_depth=100)) as engine:
        engine.subscribe(Tick, handler=slow, name="slow")
        log = StateLog(engine)

        print("1. a burst of try_publish (never waits) into a slow subscriber")
        n = 0
        while True:
            try:
                engine.try_publish(Tick(n=n))
            except BackpressureError as exc:
                depth = engine.metrics().backpressure.depth
                print(f"   event {n} refused at depth {depth}: BackpressureError: {exc}")
                break
            n += 1
            log.check(f"after event {n - 1}")

        print("2. publish(timeout=...) waits while CRITICAL")
        try:
            await engine.publish(Tick(n=n), timeout=0.001)
        except BackpressureError:
            print("   publish(timeout=0.001) gave up: BackpressureError")
        started = anyio.current_time()
        await engine.publish(Tick(n=n), timeout=5)
        waited = anyio.current_time() - started
        print(f"   publish(timeout=5) waited {waited * 1000:.0f} ms, until the state fell")
        log.check("after the waiting publish")
        n += 1

        print("3. the subscriber catches up")
        for _ in range(2000):
            log.check(f"handled {len(handled):3}")
            if engine.metrics().backpressure.depth == 0:
                break
            await anyio.sleep(0.001)

        bp = engine.metrics().backpressure
        print(f"   states seen: {' -> '.join(log.seen)}")
        print(
            f"   metrics: depth={bp.depth} peak_depth={bp.peak_depth} accepted={bp.accepted} "
            f"rejected={bp.rejected} transitions={bp.transitions}"
        )
        print(f"   handled {len(handled)} of {n} published, in order: {handled == sorted(handled)}")
    print("done")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
