"""System events: the engine's own state changes, as events users subscribe to.

``engine.subscribe(BreakerStateChanged, handler=..., name=...)`` takes them like any
event, with these differences, so that watching the engine can never slow or stop it:

- they live in memory only: never in the outbox, never in a cluster's streams, and a
  subscription to them is never durable (in a cluster it is the node's own);
- a subscription takes system events only (``SystemEvent`` or its subclasses, named
  explicitly): a subscription to ``Event`` does not get them, and one that mixes them
  with other events is refused;
- they hold no backpressure slot, and a subscriber that lags loses its oldest:
  when its mailbox is full the oldest system event in it is dropped and counted
  (``engine.metrics().system_events_dropped``), whatever its ``overflow`` says;
- the engine publishes them, users cannot (``publish`` refuses them); a system
  subscription's own restarts and dead letters raise no system event (no loops).

The parts that change state (breakers, the backpressure controller, cells,
dead letters, the cluster link) each hold an ``emit`` callable: a no-op until the
engine wires them to its bus (``EventBus.emit``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NoReturn

from ._events import Event

__all__ = [
    "ActorRestarted",
    "BackpressureStateChanged",
    "BreakerStateChanged",
    "DeadLettered",
    "Emit",
    "PartitionsRebalanced",
    "SystemEvent",
    "refuse_unpublishable",
    "ignore",
    "is_system",
]


class SystemEvent(Event, abstract=True):
    """The base of the engine's own events (subscribe to it to get every kind)."""


class BreakerStateChanged(SystemEvent, tag="actorbus.breaker_state_changed"):
    """Circuit breaker ``breaker`` moved from ``old`` to ``new`` (``closed``, ``open``,
    ``half_open``)."""

    breaker: str
    old: str
    new: str


class BackpressureStateChanged(SystemEvent, tag="actorbus.backpressure_state_changed"):
    """The in-flight budget moved from ``old`` to ``new`` (``normal``, ``warning``,
    ``critical``) at ``depth`` events in flight."""

    old: str
    new: str
    depth: int


class ActorRestarted(SystemEvent, tag="actorbus.actor_restarted"):
    """Actor ``actor`` runs a fresh instance; ``reason`` is what ended the last one."""

    actor: str
    reason: str


class DeadLettered(SystemEvent, tag="actorbus.dead_lettered"):
    """A dead letter was recorded (stored, with a database) for ``actor``."""

    actor: str
    reason: str
    dead_letter_id: int


class PartitionsRebalanced(SystemEvent, tag="actorbus.partitions_rebalanced"):
    """In a cluster, this node now holds partitions ``owned`` of ``subscription``."""

    subscription: str
    owned: list[int]


Emit = Callable[[SystemEvent], None]


def ignore(event: SystemEvent) -> None:
    """The ``emit`` of a part the engine has not wired (yet)."""


def is_system(event_type: type) -> bool:
    return issubclass(event_type, SystemEvent)


def refuse_unpublishable(event: object, call: str) -> NoReturn:
    """The error of ``publish``/``try_publish``/``tx.publish`` (``call``) for what it does
    not take: anything but an Event, and system events (only the engine publishes those).
    Callers test ``not isinstance(event, Event) or isinstance(event, SystemEvent)`` inline."""
    if isinstance(event, SystemEvent):
        raise TypeError(
            f"{call} refuses {type(event).__name__}: system events are published by the engine only"
        )
    raise TypeError(f"{call} takes an Event, got {type(event).__name__}")
