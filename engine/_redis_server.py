"""A throwaway ``redis-server``: loopback only, no persistence, its own port.

``RedisServer`` starts ``redis-server`` on a free 127.0.0.1 port in a temporary
directory and knows it is ready when the server reports ``READY=1`` on a
systemd-style notify socket (no polling) and then answers ``PING``. It can be
stopped, paused (SIGSTOP: connections hang, for timeouts) and restarted on the
same port. It never touches a Redis on the default port 6379. The pytest plugin
(``engine.testing``) and the project's own tests run theirs with it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

__all__ = ["BINARY_VARIABLE", "MISSING", "RedisServer", "RedisServerError", "find_redis_server"]

# Bounds for a server that will not come up or go down: generous, never reached normally.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0

BINARY_VARIABLE = "ACTORBUS_REDIS_SERVER"
"""An environment variable naming the ``redis-server`` to run, if not the one on PATH."""

MISSING = (
    "redis-server, which is not installed (Debian/Ubuntu: apt-get install redis-server; "
    f"or set {BINARY_VARIABLE} to its path)"
)
"""What to say when ``find_redis_server`` finds nothing."""


def find_redis_server() -> str | None:
    """The path of an executable ``redis-server`` (``$ACTORBUS_REDIS_SERVER`` when set),
    or None."""
    binary = os.environ.get(BINARY_VARIABLE) or (
        shutil.which("redis-server") or "/usr/bin/redis-server"
    )
    return binary if os.access(binary, os.X_OK) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class RedisServerError(RuntimeError):
    """The server did not start or stop as asked; the message has its log's tail."""


class RedisServer:
    """One ``redis-server`` process on 127.0.0.1; use as a context manager (always stops)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.port = 0
        self._directory: tempfile.TemporaryDirectory[str] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self._process is not None

    def __enter__(self) -> Self:
        # A short path: the notify socket's path must fit in sockaddr_un (108 bytes).
        self._directory = tempfile.TemporaryDirectory(prefix="actorbus-redis-")
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        try:
            self.stop()
        finally:
            if self._directory is not None:
                self._directory.cleanup()
                self._directory = None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the server (on a new free port the first time, on the same port after)."""
        if self._process is not None:
            raise RedisServerError("the server is already running")
        if self.port:
            self._launch(self.port)
            return
        # The port is free when picked but someone may take it before Redis binds
        # it: then Redis exits at once and another port is tried.
        for _attempt in range(3):
            self.port = _free_port()
            assert self.port != 6379, "never the machine's shared Redis"
            try:
                self._launch(self.port)
            except RedisServerError:
                self.port = 0
                continue
            return
        raise RedisServerError("redis-server did not start on any of 3 free ports")

    def stop(self) -> None:
        """Terminate the server and wait for it (killed if it does not exit in time)."""
        process, self._process = self._process, None
        if process is not None:
            try:
                if self._paused:
                    process.send_signal(signal.SIGCONT)
                    self._paused = False
                process.terminate()
                try:
                    process.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            finally:
                if self._log is not None:
                    self._log.close()
                    self._log = None

    def restart(self) -> None:
        """Stop (if running) and start again on the same port (an empty dataset)."""
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP the server: it accepts connections but answers nothing (a hung Redis)."""
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        assert self._process is not None, "the server is not running"
        self._process.send_signal(signal.SIGCONT)
        self._paused = False

    # ------------------------------------------------------------ inspection

    def command(self, *args: str) -> bytes:
        """One command over a raw RESP socket; the reply's raw bytes (tests parse them)."""
        request = b"".join(
            [f"*{len(args)}\r\n".encode()]
            + [f"${len(arg.encode())}\r\n".encode() + arg.encode() + b"\r\n" for arg in args]
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=5.0) as connection:
            connection.sendall(request)
            reply = b""
            while not _complete(reply):
                chunk = connection.recv(65536)
                if not chunk:
                    raise RedisServerError(f"connection closed after {reply!r}")
                reply += chunk
        return reply

    def keys(self) -> set[str]:
        """Every key in database 0 (``KEYS *``)."""
        reply = self.command("KEYS", "*")
        lines = reply.split(b"\r\n")
        # *N, then $len / value pairs.
        return {line.decode() for line in lines[2::2] if line}

    def pttl(self, key: str) -> int:
        """``PTTL key``: milliseconds to live, -1 without expiry, -2 when absent."""
        reply = self.command("PTTL", key)
        assert reply.startswith(b":"), reply
        return int(reply[1:].strip())

    # ------------------------------------------------------------ internals

    def _launch(self, port: int) -> None:
        assert self._directory is not None, "use RedisServer as a context manager"
        directory = Path(self._directory.name)
        notify_path = directory / "notify"
        notify_path.unlink(missing_ok=True)
        log_path = directory / "redis.log"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(notify_path))
            log = log_path.open("ab")
            try:
                process = self._popen(port, directory, notify_path, log)
            except BaseException:
                log.close()
                raise
            self._process, self._log = process, log
            try:
                self._wait_ready(notify, process, log_path)
            except BaseException:
                self.stop()
                raise

    def _popen(
        self, port: int, directory: Path, notify_path: Path, log: IO[bytes]
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(directory),
                "--supervised",
                "systemd",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NOTIFY_SOCKET": str(notify_path)},
            cwd=directory,
        )

    def _wait_ready(
        self, notify: socket.socket, process: subprocess.Popen[bytes], log_path: Path
    ) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        # Redis sends READY=1 once it listens. The short receive timeout lets a
        # server that died at start (port taken) be noticed promptly, and a
        # build without notify support be found ready by PING instead.
        while True:
            remaining = deadline - time.monotonic()
            if process.poll() is not None or remaining <= 0:
                tail = log_path.read_bytes()[-2000:].decode(errors="replace")
                raise RedisServerError(f"redis-server did not become ready:\n{tail}")
            notify.settimeout(min(remaining, 0.5))
            try:
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
            except TimeoutError:
                with contextlib.suppress(OSError, RedisServerError):
                    if self.command("PING") == b"+PONG\r\n":
                        break
        reply = self.command("PING")
        if reply != b"+PONG\r\n":
            raise RedisServerError(f"PING answered {reply!r}")


def _complete(reply: bytes) -> bool:
    """Whether ``reply`` holds one whole RESP2 reply of the kinds the tests ask for."""
    if not reply.endswith(b"\r\n"):
        return False
    if reply[:1] in (b"+", b"-", b":"):
        return True
    lines = reply.split(b"\r\n")[:-1]
    if reply[:1] == b"$":
        return int(lines[0][1:]) == -1 or len(lines) >= 2
    if reply[:1] == b"*":
        return len(lines) >= 1 + 2 * int(lines[0][1:])
    return True
