"""OpenTelemetry tracing (the ``otel`` extra): spans, and the trace an event carries.

The only module that imports opentelemetry. An engine traces when opentelemetry's
API is installed and a real tracer provider is there when it starts: the one given
as ``Engine(tracer_provider=...)``, else the global one (``trace.set_tracer_provider``).
Otherwise (no extra, or the API's proxy and no-op providers: no SDK) ``Tracing.on``
is False and the engine's paths pay one attribute check.

When it traces, publishing (``publish``, ``try_publish``, ``transact`` with its
``tx.publish``) runs in a span, and the trace context current there is captured in
W3C form (``traceparent``, and ``tracestate`` if any) and kept with the event: in
its ``Delivery`` in memory, in the outbox row with a database. A handler then runs
in a span whose parent is that context, so one trace runs from the request that
published an event through ``transact``, the relay and the dispatcher to every
handler and projection, also across a restart (the context waits in the outbox).

Spans: ``publish``, ``transact``, ``handle {subscription}``, ``project {projection}``
and ``breaker {name}``, with ``actorbus.*`` attributes (event type and id, outbox seq,
partition, attempt, outcome); an error is recorded on the span that saw it, and a
dead letter is an event (``actorbus.dead_letter``) on the span of its last attempt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

try:
    from opentelemetry import trace as _trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # no otel extra: nothing is traced
    _trace = None  # type: ignore[assignment]

from ._extras import missing_extra

__all__ = ["Tracing", "event_attributes", "finish_span"]

_PROPAGATOR: Any = TraceContextTextMapPropagator() if _trace is not None else None
# Between traceparent and tracestate in a stored context: never in either.
_SEPARATOR = "\n"

Attributes = Mapping[str, str | int | bool]


def event_attributes(event: Any, seq: int | None = None) -> dict[str, str | int | bool]:
    """The attributes every event span carries: its type, id and outbox seq."""
    attributes: dict[str, str | int | bool] = {
        "actorbus.event.type": type(event).event_type,
        "actorbus.event.id": str(event.id),
    }
    if seq is not None:
        attributes["actorbus.outbox.seq"] = seq
    return attributes


def finish_span(
    span: Any, attempts: int, error: BaseException | None = None, *, failed: bool = False
) -> None:
    """A handler's span at its end: how many attempts, and the outcome (a dead letter,
    after the last attempt's ``error``, is an event on it and fails it; ``failed``: an
    actor's attempt that failed and is retried in a span of its own)."""
    span.set_attribute("actorbus.attempt", attempts)
    if error is None:
        span.set_attribute("actorbus.outcome", "failed" if failed else "handled")
        return
    span.set_attribute("actorbus.outcome", "dead-lettered")
    span.add_event(
        "actorbus.dead_letter", {"actorbus.reason": "failed", "actorbus.attempts": attempts}
    )
    span.set_status(_trace.Status(_trace.StatusCode.ERROR, f"{type(error).__name__}: {error}"))


class Tracing:
    """An engine's tracer: ``on`` once ``start`` found a real tracer provider."""

    __slots__ = ("_provider", "_tracer", "on")

    def __init__(self, provider: object | None = None) -> None:
        if provider is not None and not callable(getattr(provider, "get_tracer", None)):
            raise TypeError(
                f"tracer_provider must be an OpenTelemetry TracerProvider, got {provider!r}"
            )
        if provider is not None and _trace is None:
            raise missing_extra("Engine(tracer_provider=...)", "opentelemetry-api", "otel")
        self._provider = provider
        self._tracer: Any = None
        self.on = False

    def start(self) -> None:
        """Look for a real provider (the engine starts): trace with it, or not at all
        (also not when ``OTEL_SDK_DISABLED=true``, OpenTelemetry's own switch)."""
        if _trace is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
            return
        provider: Any = self._provider or _trace.get_tracer_provider()
        if isinstance(provider, _trace.ProxyTracerProvider | _trace.NoOpTracerProvider):
            return  # the API alone, no SDK: nothing would be recorded
        self._tracer = provider.get_tracer("actorbus")
        self.on = True

    @contextlib.contextmanager
    def publishing(self, name: str, attributes: Attributes) -> Iterator[str | None]:
        """A ``publish``/``transact`` span; yields its context, to store with the events."""
        with self.span(name, attributes):
            yield self.context()

    @contextlib.contextmanager
    def handling(self, subscription: str, partition: str, delivery: Any) -> Iterator[Any]:
        """The ``handle {subscription}`` span of ``delivery`` in ``partition``, child of
        the context it was published in."""
        attributes = event_attributes(delivery.event, delivery.seq)
        attributes["actorbus.partition"] = partition
        with self.span(f"handle {subscription}", attributes, delivery.trace) as span:
            yield span

    def undecodable(self, name: str, entry: str, trace: str | None, error: BaseException) -> None:
        """The span of a stream entry that does not decode (no event to name it by),
        ``name`` as a handler's or projection's: dead-lettered at once."""
        with self.span(name, {"actorbus.stream.entry": entry}, trace) as span:
            span.record_exception(error)
            finish_span(span, 1, error)

    def context(self) -> str | None:
        """The current trace context as stored with an event, or None without one."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier)
        parent = carrier.get("traceparent")
        if parent is None:
            return None
        state = carrier.get("tracestate")
        return parent if not state else f"{parent}{_SEPARATOR}{state}"

    @contextlib.contextmanager
    def span(self, name: str, attributes: Attributes, parent: str | None = None) -> Iterator[Any]:
        """A span named ``name``, current inside the block, child of ``parent`` (a
        stored context) or else of the current span; an exception is recorded on it."""
        context = None
        if parent is not None:
            traceparent, _, tracestate = parent.partition(_SEPARATOR)
            carrier = {"traceparent": traceparent}
            if tracestate:
                carrier["tracestate"] = tracestate
            context = _PROPAGATOR.extract(carrier)
        with self._tracer.start_as_current_span(
            name, context=context, attributes=attributes
        ) as span:
            yield span
