"""One engine per database file: an advisory lock on a file beside the database.

The lock is ``flock`` on ``<database>-actorbus.lock`` (``msvcrt.locking`` on
Windows), taken before the engine reads or changes anything in the database
and held for the engine's whole life. The kernel drops it when the holder's
process ends, however it ends (a SIGKILL included), so a dead holder never
blocks the next start. ``flock`` locks belong to one open file, not to the
process: a second engine in the same process is refused as well. The holder
writes who it is (pid, host, start time) into the file, for the refusal
message. The operator CLI does not take this lock: it works beside a running
engine through SQLite's own locking.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from typing import Final

__all__ = ["EngineLock", "EngineLockHeld", "lock_path"]

SUFFIX: Final = "-actorbus.lock"


class EngineLockHeld(Exception):
    """Another live engine holds the database; ``holder`` says who, as it wrote it."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


def lock_path(database: str) -> str:
    return database + SUFFIX


if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
    import msvcrt

    def _try_lock(fd: int) -> bool:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    # The locked first byte cannot be read by others on Windows: the holder's
    # description starts after it.
    _INFO_OFFSET = 1
else:
    import fcntl

    def _try_lock(fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)

    _INFO_OFFSET = 0


class EngineLock:
    """The held lock of one database file; ``release()`` (idempotent) gives it up."""

    __slots__ = ("_fd", "path")

    def __init__(self, path: str, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, database: str) -> EngineLock:
        """Take the lock of ``database`` without waiting.

        Raises ``EngineLockHeld`` when another engine holds it and ``OSError``
        when the lock file cannot be created (a read-only directory).
        """
        path = lock_path(database)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if not _try_lock(fd):
                raise EngineLockHeld(_read_holder(fd))
            _write_holder(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        # The file stays: removing it would let a third engine lock a new file
        # while a second one still waits on the old one.
        with contextlib.suppress(OSError):
            _unlock(fd)
        os.close(fd)


def _write_holder(fd: int) -> None:
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info = f"pid {os.getpid()} on {socket.gethostname()}, since {started}\n".encode()
    with contextlib.suppress(OSError):  # the description is for messages only
        os.ftruncate(fd, _INFO_OFFSET)
        os.lseek(fd, _INFO_OFFSET, os.SEEK_SET)
        os.write(fd, info)


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, _INFO_OFFSET, os.SEEK_SET)
        text = os.read(fd, 512).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    # What another process wrote is shown in an error message: printable only.
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text or "an unknown process"
