"""Real storage faults for the tests: another process holding SQLite's write lock,
a small tmpfs that fills up or turns read-only, a child process running an engine.

Nothing here is a mock: the lock is a real ``BEGIN EXCLUSIVE`` in another process,
the full disk a real ``ENOSPC`` from a real file system.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# How long a child may take to say it is ready (it imports the engine).
READY_BOUND = 30.0

_HOLDER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
conn.execute("COMMIT")
conn.close()
print("released", flush=True)
"""

_ENGINE = """
import sys
import anyio
from engine import Engine

async def main() -> None:
    async with Engine(sys.argv[1]):
        print("ready", flush=True)
        await anyio.to_thread.run_sync(sys.stdin.readline)
    print("stopped", flush=True)

anyio.run(main)
"""

ROOT = Path(__file__).resolve().parent.parent


class Child:
    """A child Python process that reports what it did one line at a time."""

    def __init__(self, script: str, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def expect(self, line: str, bound: float = READY_BOUND) -> None:
        """Block until the child prints ``line`` (bounded; a child that dies fails the test)."""
        stdout = self.proc.stdout
        assert stdout is not None
        deadline = time.monotonic() + bound
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"child {self.pid} printed no {line!r} line in {bound} s")
            readable, _, _ = select.select([stdout], [], [], remaining)
            if not readable:
                continue
            got = stdout.readline()
            if not got:
                self.proc.wait()
                stderr = self.proc.stderr.read().decode() if self.proc.stderr else ""
                pytest.fail(f"child exited with {self.proc.returncode} before {line!r}:\n{stderr}")
            if got.decode().strip() == line:
                return

    def tell(self) -> None:
        """Send the child the line it waits for."""
        stdin = self.proc.stdin
        assert stdin is not None
        stdin.write(b"go\n")
        stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@contextlib.contextmanager
def _running(script: str, path: str, ready: str) -> Iterator[Child]:
    child = Child(script, path)
    try:
        child.expect(ready)
        yield child
    finally:
        child.close()


def lock_held(path: str) -> contextlib.AbstractContextManager[Child]:
    """Another process holds ``BEGIN EXCLUSIVE`` on ``path`` until ``release(child)``."""
    return _running(_HOLDER, path, "locked")


def release(child: Child) -> None:
    child.tell()
    child.expect("released")


def engine_process(path: str) -> contextlib.AbstractContextManager[Child]:
    """Another process runs an engine on ``path`` until ``child.tell()`` or a kill."""
    return _running(_ENGINE, path, "ready")


class SmallDisk:
    """A small tmpfs mounted for one test (root only; the test is skipped elsewhere)."""

    def __init__(self, where: Path, size: str) -> None:
        self.path = where
        self.path.mkdir()
        mount = shutil.which("mount")
        if mount is None or os.geteuid() != 0:
            pytest.skip("a full or read-only disk needs a tmpfs mounted as root")
        done = subprocess.run(
            [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
            capture_output=True,
            check=False,
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        self.filler = where / "filler"

    def fill(self) -> None:
        """Write a file until the disk is full."""
        chunk = b"\0" * 65536
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            while True:
                try:
                    os.write(fd, chunk)
                except OSError:
                    if len(chunk) == 1:
                        break
                    chunk = chunk[: len(chunk) // 2]  # the last bytes too
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def read_only(self, on: bool) -> None:
        """Remount the whole disk read-only (nothing may be open for writing) or back."""
        mode = "ro" if on else "rw"
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.path)], check=True)

    @contextlib.contextmanager
    def read_only_file(self, path: str) -> Iterator[None]:
        """``path`` read-only in a writable directory (what chmod does to anyone but root)."""
        done = subprocess.run(["mount", "--bind", path, path], capture_output=True, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot bind-mount a file here: {done.stderr.decode().strip()}")
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", path], check=True)
            yield
        finally:
            subprocess.run(["umount", path], check=False)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.path)], check=False)
