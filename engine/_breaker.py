"""Circuit breakers: the configuration, the caller's handle and its published state.

A breaker publishes one ``Generation`` object per state; callers read it, take
permits from it synchronously and write their outcomes into it, so the closed
path costs no mailbox round trip and no clock read. The caller whose outcome
crosses a threshold (the failure that reaches ``failure_threshold``, any
half-open failure, the ``success_threshold``-th probe success) publishes the
next generation itself before its call returns: on one event loop a
synchronous swap is atomic, so the state never lags an outcome. It then tells
the breaker actor (actors/_breaker.py), which owns what takes time or must be
serialised: the open timer, ``reset``/``force_open`` and the log. An outcome
written into a generation that is no longer published changes nothing.
"""

from __future__ import annotations

import contextlib
import enum
import math
from collections.abc import Awaitable, Callable, Generator
from typing import Any, NoReturn, TypeVar

import anyio
import msgspec

from ._actor import Actor, ActorRef
from ._cancel import is_stray_cancellation
from ._errors import EngineError
from ._runtime import RESERVED_PREFIX, Runtime
from ._system import BreakerStateChanged, Emit, ignore
from ._tracing import Tracing

__all__ = [
    "BreakerMetrics",
    "BreakerRegistry",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "CircuitState",
]

_T = TypeVar("_T")


class CircuitState(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


_CLOSED = CircuitState.CLOSED
_OPEN = CircuitState.OPEN
_HALF_OPEN = CircuitState.HALF_OPEN


class _CallTimedOut(TimeoutError):
    """A call slower than ``call_timeout`` (always a failure)."""


class CircuitOpenError(EngineError):
    """The breaker is open (or its half-open probes are all taken): ``fn`` was not called."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"circuit {name!r} is open; retry after {retry_after:.3f} s")
        self.name = name
        self.retry_after = retry_after
        """Seconds until the breaker admits probes again (0 while its probes are all taken)."""


def _exception_types(value: object, field: str) -> tuple[type[BaseException], ...]:
    if isinstance(value, type):
        value = (value,)
    if not isinstance(value, tuple) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in value
    ):
        raise TypeError(f"{field} must be a tuple of exception types, got {value!r}")
    return value


class CircuitBreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a breaker counts: thresholds, the open timeout, probes and what is a failure."""

    failure_threshold: int = 5
    """Consecutive failures that open a closed breaker."""
    success_threshold: int = 2
    """Successful probes that close a half-open breaker."""
    timeout: float = 60.0
    """Seconds a breaker stays open before it admits probes."""
    half_open_max_requests: int = 3
    """Probes admitted at the same time while half-open."""
    call_timeout: float | None = None
    """A call slower than this fails (the caller gets a ``TimeoutError``)."""
    record: tuple[type[BaseException], ...] = (Exception,)
    """Errors that count as failures..."""
    ignore: tuple[type[BaseException], ...] = ()
    """...unless they are one of these (neither success nor failure)."""

    def __post_init__(self) -> None:
        for field in ("failure_threshold", "success_threshold", "half_open_max_requests"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an int >= 1, got {value!r}")
        if (
            isinstance(self.timeout, bool)
            or not isinstance(self.timeout, int | float)
            or not math.isfinite(self.timeout)
            or self.timeout <= 0
        ):
            raise ValueError(f"timeout must be a finite number > 0, got {self.timeout!r}")
        timeout = self.call_timeout
        if timeout is not None and (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout <= 0
        ):
            raise ValueError(f"call_timeout must be a finite number > 0 or None, got {timeout!r}")
        msgspec.structs.force_setattr(self, "record", _exception_types(self.record, "record"))
        msgspec.structs.force_setattr(self, "ignore", _exception_types(self.ignore, "ignore"))


class BreakerMetrics(msgspec.Struct, frozen=True, kw_only=True):
    """A breaker's counters (``breaker.metrics()``)."""

    name: str
    state: CircuitState
    total_requests: int
    """Calls admitted or rejected."""
    successes: int
    failures: int
    rejected: int
    """Calls refused with CircuitOpenError (fn not called)."""
    transitions: int
    success_rate: float
    """successes / (successes + failures); 1.0 before any outcome."""
    rejection_rate: float
    """rejected / total_requests; 0.0 before any request."""


class Generation:
    """One published state of a breaker; callers write their outcomes into it."""

    __slots__ = (
        "announced",
        "failures",
        "number",
        "opened_at",
        "permits",
        "previous",
        "state",
        "successes",
    )

    def __init__(
        self,
        state: CircuitState,
        number: int,
        opened_at: float = 0.0,
        previous: CircuitState | None = None,
    ) -> None:
        self.state = state
        self.number = number
        self.opened_at = opened_at
        # The state this generation replaced (itself for the first one).
        self.previous = state if previous is None else previous
        # Consecutive failures (CLOSED) or successful probes (HALF_OPEN).
        self.failures = 0
        self.successes = 0
        # Probes in flight (HALF_OPEN).
        self.permits = 0
        # The actor has logged this generation (and armed its timer if OPEN).
        self.announced = previous is None


# Messages to the breaker actor.


class Moved(msgspec.Struct, frozen=True, tag="breaker.moved"):
    """``generation`` was published outside the actor: log it, arm its timer if it is OPEN."""

    generation: Generation


class Reset(msgspec.Struct, frozen=True, tag="breaker.reset"):
    """``breaker.reset()``: close now."""


class ForceOpen(msgspec.Struct, frozen=True, tag="breaker.force_open"):
    """``breaker.force_open()``: open now (the timeout starts over)."""


class CircuitBreaker:
    """The caller's handle to a dependency's breaker (``engine.breaker(name)``)."""

    __slots__ = (
        "_actor",
        "_failures",
        "_fast",
        "_rejected",
        "_requests",
        "_successes",
        "_timeout",
        "_tracing",
        "config",
        "emit",
        "generation",
        "name",
        "transitions",
    )

    def __init__(self, name: str, config: CircuitBreakerConfig) -> None:
        self.name = name
        self.config = config
        self.generation = Generation(_CLOSED, 0)
        # No call_timeout: a closed breaker's call takes the short path.
        self._fast = config.call_timeout is None
        self._timeout: float = config.call_timeout or 0.0
        self.transitions = 0
        # Each change of state goes out as a BreakerStateChanged (engine._system).
        self.emit: Emit = ignore
        # Set when the engine traces (engine._tracing): every call runs in a span.
        self._tracing: Tracing | None = None
        self._actor: ActorRef[Any] | None = None
        self._requests = 0
        self._successes = 0
        self._failures = 0
        self._rejected = 0

    @property
    def state(self) -> CircuitState:
        return self.generation.state

    def __await__(self) -> Generator[Any, None, CircuitBreaker]:
        """``await engine.breaker(...)`` works as well as the plain call."""
        return self
        yield  # pragma: no cover - makes this a generator

    def __repr__(self) -> str:
        return f"<CircuitBreaker {self.name!r} {self.generation.state.value}>"

    def trace(self, tracing: Tracing) -> None:
        """The engine traces: each call runs in a ``breaker {name}`` span (off the fast path)."""
        if tracing.on:
            self._tracing = tracing
            self._fast = False

    # ------------------------------------------------------------- calls

    async def call(self, fn: Callable[..., Awaitable[_T]], *args: Any, **kwargs: Any) -> _T:
        """Await ``fn(*args, **kwargs)`` under the breaker.

        Raises ``CircuitOpenError`` without calling ``fn`` while open (or when
        every half-open probe is taken). A failure is an error of a ``record``
        type that is not an ``ignore`` type, or a call slower than
        ``call_timeout`` (the caller then gets a ``TimeoutError``); the
        caller's own cancellation is neither success nor failure.
        """
        generation = self.generation
        if generation.state is _CLOSED and self._fast:
            # The closed path's whole cost: two counts (and a report after failures).
            self._requests += 1
            try:
                result = await (fn(*args, **kwargs) if args or kwargs else fn())
            except BaseException as error:
                self._outcome(generation, error)
                raise
            self._successes += 1
            if generation.failures:
                generation.failures = 0
            return result
        tracing = self._tracing
        if tracing is not None:
            attributes = {"actorbus.breaker.state": generation.state.value}
            with tracing.span(f"breaker {self.name}", attributes):
                return await self._guarded(generation, fn, args, kwargs)
        return await self._guarded(generation, fn, args, kwargs)

    async def _guarded(
        self,
        generation: Generation,
        fn: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _T:
        """A call off the closed fast path: with a ``call_timeout`` or a span, or not closed."""
        if generation.state is _CLOSED:
            # The fast path's work; with a call_timeout under a cancel scope with a deadline.
            self._requests += 1
            try:
                if self.config.call_timeout is None:
                    result = await fn(*args, **kwargs)
                else:
                    deadline = anyio.current_time() + self._timeout
                    with anyio.CancelScope(deadline=deadline) as scope:
                        result = await fn(*args, **kwargs)
                    if scope.cancelled_caught:
                        self._too_slow()
            except BaseException as error:
                self._outcome(generation, error)
                raise
            self._successes += 1
            if generation.failures:
                generation.failures = 0
            return result
        return await self._call(generation, fn, args, kwargs)

    async def _call(
        self,
        generation: Generation,
        fn: Callable[..., Awaitable[_T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _T:
        """An open breaker rejects; a half-open one admits a probe while a permit is left."""
        self._requests += 1
        config = self.config
        if generation.state is _OPEN or generation.permits >= config.half_open_max_requests:
            self._reject(generation)
        generation.permits += 1
        timeout = config.call_timeout
        try:
            if timeout is None:
                result = await fn(*args, **kwargs)
            else:
                with anyio.CancelScope(deadline=anyio.current_time() + timeout) as scope:
                    result = await fn(*args, **kwargs)
                if scope.cancelled_caught:
                    self._too_slow()
        except BaseException as error:
            generation.permits -= 1  # a probe gives its permit back, whatever happened
            self._outcome(generation, error)
            raise
        self._successes += 1
        generation.permits -= 1
        generation.successes += 1
        if generation.successes >= config.success_threshold and generation is self.generation:
            self._move(_CLOSED)
        return result

    def _too_slow(self) -> NoReturn:
        raise _CallTimedOut(
            f"call through breaker {self.name!r} took longer than {self.config.call_timeout} s"
        )

    def _reject(self, generation: Generation) -> None:
        self._rejected += 1
        retry_after = 0.0
        if generation.state is _OPEN:
            elapsed = anyio.current_time() - generation.opened_at
            retry_after = max(0.0, self.config.timeout - elapsed)
        raise CircuitOpenError(self.name, retry_after)

    def _outcome(self, generation: Generation, error: BaseException) -> None:
        config = self.config
        if not isinstance(error, Exception):
            if not is_stray_cancellation(error):
                return  # the caller gave up (or an interrupt): not the dependency's fault
            # A CancelledError nothing of the caller's explains came from the
            # dependency (a pool cancelling its future): a failure, like a timeout.
        elif not isinstance(error, _CallTimedOut) and (
            not isinstance(error, config.record) or isinstance(error, config.ignore)
        ):
            return
        self._failures += 1
        if generation is not self.generation:
            return  # admitted before a transition: it does not move the new state
        if generation.state is _CLOSED:
            generation.failures += 1
            if generation.failures < config.failure_threshold:
                return
        self._move(_OPEN)

    def attach(self, actor: ActorRef[Any]) -> None:
        """Its breaker actor runs: transitions and controls go to it from now on."""
        self._actor = actor

    def _move(self, state: CircuitState) -> None:
        """A caller's outcome crossed a threshold: publish ``state`` now, then tell the actor."""
        generation = self.publish(state)
        actor = self._actor
        if actor is None:
            return  # not running in an engine yet: its actor announces it when it starts
        with contextlib.suppress(EngineError):  # stopping: the state no longer matters
            actor.try_tell(Moved(generation))

    def publish(self, state: CircuitState) -> Generation:
        """Publish a new generation in ``state`` (counts start over) and return it.

        The one place a breaker's state changes, for the callers whose outcome
        crosses a threshold and for the breaker actor; a change of state counts
        as one transition. Users move a breaker with ``reset``/``force_open``:
        this neither logs nor arms the open timer.
        """
        old = self.generation
        generation = Generation(state, old.number + 1, anyio.current_time(), old.state)
        self.generation = generation
        if state is not old.state:
            self.transitions += 1
            self.emit(BreakerStateChanged(breaker=self.name, old=old.state.value, new=state.value))
        return generation

    # ---------------------------------------------------------- controls

    async def reset(self) -> None:
        """Close the breaker now (counts start over)."""
        await self._ask(Reset())

    async def force_open(self) -> None:
        """Open the breaker now (it admits probes after ``timeout``)."""
        await self._ask(ForceOpen())

    async def _ask(self, command: Reset | ForceOpen) -> None:
        actor = self._actor
        if actor is None:
            raise EngineError(f"breaker {self.name!r} is not running in an engine")
        await actor.ask(command)

    def metrics(self) -> BreakerMetrics:
        outcomes = self._successes + self._failures
        return BreakerMetrics(
            name=self.name,
            state=self.generation.state,
            total_requests=self._requests,
            successes=self._successes,
            failures=self._failures,
            rejected=self._rejected,
            transitions=self.transitions,
            success_rate=self._successes / outcomes if outcomes else 1.0,
            rejection_rate=self._rejected / self._requests if self._requests else 0.0,
        )


class BreakerRegistry:
    """One breaker per dependency name, each backed by a breaker actor.

    Breakers asked for before the engine runs start their actors with it.
    """

    def __init__(
        self, runtime: Runtime, make_actor: Callable[[CircuitBreaker], Callable[[], Actor]]
    ) -> None:
        self._runtime = runtime
        self._make_actor = make_actor
        self._breakers: dict[str, CircuitBreaker] = {}
        # Given to every breaker it makes (``CircuitBreaker.emit``).
        self.emit: Emit = ignore
        self.tracing = Tracing()

    def get(self, name: str, config: CircuitBreakerConfig | None) -> CircuitBreaker:
        """The breaker for ``name`` (made on first use; ``ValueError`` for another config)."""
        if config is None:
            config = CircuitBreakerConfig()
        elif not isinstance(config, CircuitBreakerConfig):
            raise TypeError(f"config must be a CircuitBreakerConfig, got {type(config).__name__}")
        existing = self._breakers.get(name)
        if existing is not None:
            if existing.config != config:
                raise ValueError(
                    f"breaker {name!r} exists with another config: {existing.config!r}"
                )
            return existing
        runtime = self._runtime
        if runtime.closing:
            runtime.refuse()
        breaker = CircuitBreaker(name, config)
        breaker.emit = self.emit
        if runtime.running:
            self._start(breaker)
        self._breakers[name] = breaker
        return breaker

    def start(self) -> None:
        """The engine runs: start the actors of the breakers made before."""
        for breaker in self._breakers.values():
            self._start(breaker)

    def _start(self, breaker: CircuitBreaker) -> None:
        if not breaker.name.startswith(RESERVED_PREFIX):  # the engine's own calls: no spans
            breaker.trace(self.tracing)
        cell = self._runtime.start_builtin_soon(
            self._make_actor(breaker), name=f"{RESERVED_PREFIX}breaker.{breaker.name}", capacity=64
        )
        breaker.attach(cell.ref)

    def metrics(self) -> dict[str, BreakerMetrics]:
        return {name: breaker.metrics() for name, breaker in self._breakers.items()}
