"""Telling a stray ``CancelledError`` from a real cancellation.

On asyncio, code that awaits a future another task cancelled (connection pools
do this) gets ``CancelledError`` although nothing cancelled the awaiting task.
Left alone it would end an actor's task and, through the task group, the whole
engine; it is a failure of the work that raised it, like any exception. A real
cancellation (a cancel scope around the task, ``task.cancel()``) keeps its
meaning and is never turned into a failure.
"""

from __future__ import annotations

import anyio

from ._errors import EngineError

__all__ = ["StrayCancellation", "as_failure", "is_stray_cancellation"]


class StrayCancellation(EngineError):
    """User code raised a ``CancelledError`` while nothing cancelled its task.

    It is that message's (or load's) failure: retried, then dead-lettered, and
    raised in an asker. The original ``CancelledError`` is chained as the cause.
    """


def is_stray_cancellation(error: BaseException) -> bool:
    """True when ``error`` is an asyncio ``CancelledError`` no cancellation of the
    current task explains.

    Library code imports no backend module: asyncio is imported here, lazily,
    and only on the path of an exception.
    """
    import asyncio

    if not isinstance(error, asyncio.CancelledError):
        return False  # not a cancellation, or trio's Cancelled: trio raises it for real scopes only
    if anyio.get_cancelled_exc_class() is not asyncio.CancelledError:
        # Another backend (trio) never cancels through asyncio's class: user code raised it.
        return True
    task = asyncio.current_task()
    # Every real cancellation of the task, anyio's cancel scopes included, goes
    # through task.cancel(), which counts; a cancelled future someone else owns does not.
    return task is not None and task.cancelling() == 0


def as_failure(error: BaseException) -> Exception | None:
    """What to handle as a failure of the work that raised ``error``.

    An ``Exception`` is itself; a stray cancellation is wrapped in
    ``StrayCancellation`` (the dead letter and the asker then say what happened);
    anything else (a real cancellation, ``KeyboardInterrupt``) is None: re-raise it.
    """
    if isinstance(error, Exception):
        return error
    if not is_stray_cancellation(error):
        return None
    detail = str(error)
    name = type(error).__name__
    failure = StrayCancellation(
        f"{name}{f': {detail}' if detail else ''} (stray: nothing cancelled the task "
        "it was raised in, so it is handled as a failure like any other error)"
    )
    failure.__cause__ = error
    return failure
