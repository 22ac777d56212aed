"""A circuit breaker in front of a flaky dependency: CLOSED -> OPEN -> HALF_OPEN -> CLOSED.

Run: python3 examples/circuit_breaker.py [asyncio|trio]

The payment service answers its first two calls, fails the next three (an
outage), then recovers. The breaker opens after three consecutive failures,
refuses calls without touching the service while open, admits probes after its
0.2 s timeout and closes again after two successful probes.
"""

from __future__ import annotations

import sys

import anyio

from engine import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, CircuitState, Engine

OUTAGE = range(3, 6)  # the service fails its calls number 3, 4 and 5


class PaymentService:
    """A dependency that fails on a schedule: by the number of the call it receives."""

    def __init__(self) -> None:
        self.calls = 0

    async def charge(self, order: str, amount: int) -> str:
        self.calls += 1
        await anyio.sleep(0.001)
        if self.calls in OUTAGE:
            raise ConnectionError(f"payment service down (call {self.calls})")
        return f"receipt-{self.calls} for {order} ({amount} EUR)"


async def wait_for_probes(breaker: CircuitBreaker) -> None:
    """Wait (bounded) for the open timer: outcomes move the state at once, time does not."""
    for _ in range(500):
        if breaker.state is CircuitState.HALF_OPEN:
            return
        await anyio.sleep(0.002)
    raise AssertionError(f"breaker stayed {breaker.state.name}, expected HALF_OPEN")


async def main() -> None:
    service = PaymentService()
    async with Engine() as engine:
        payments = engine.breaker(
            "payments",
            CircuitBreakerConfig(
                failure_threshold=3, success_threshold=2, timeout=0.2, half_open_max_requests=1
            ),
        )

        async def attempt(order: str) -> None:
            before = service.calls
            try:
                receipt = await payments.call(service.charge, order, 30)
                outcome = f"ok: {receipt}"
            except CircuitOpenError as exc:
                called = "called" if service.calls > before else "not called"
                outcome = f"CircuitOpenError, retry_after={exc.retry_after:.2f} s, service {called}"
            except ConnectionError as exc:
                outcome = f"failed: {exc}"
            print(f"   {order}: {outcome}")

        def state() -> str:
            return payments.state.name

        async def step(title: str, orders: list[str], expected: CircuitState) -> None:
            print(title)
            for order in orders:
                await attempt(order)
            # Exact as soon as the call that moved it returned: nothing to wait for.
            assert payments.state is expected, (payments.state, expected)
            print(f"   state: {state()}")

        print(f"0. breaker 'payments' starts {state()}")
        await step("1. the service works", ["o-1", "o-2"], CircuitState.CLOSED)
        await step("2. an outage: 3 failures in a row", ["o-3", "o-4", "o-5"], CircuitState.OPEN)
        await step("3. while OPEN calls are refused at once", ["o-6", "o-7"], CircuitState.OPEN)
        print("4. after the 0.2 s timeout the breaker admits a probe")
        await wait_for_probes(payments)
        print(f"   state: {state()}")
        await step("5. two successful probes close it", ["o-8", "o-9"], CircuitState.CLOSED)
        m = payments.metrics()
        print(
            f"6. metrics: state={m.state.name} requests={m.total_requests} successes={m.successes} "
            f"failures={m.failures} rejected={m.rejected} transitions={m.transitions}\n"
            f"   success_rate={m.success_rate:.2f} rejection_rate={m.rejection_rate:.2f}"
        )
        print(f"   the service was called {service.calls} times for 9 orders")
    print("done")


if __name__ == "__main__":
    anyio.run(main, backend=sys.argv[1] if len(sys.argv) > 1 else "asyncio")
