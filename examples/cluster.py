"""Cluster mode: three worker processes share one billing subscription through Redis Streams.

Run: python3 examples/cluster.py [asyncio|trio] [--redis URL]

Starts a throwaway ``redis-server`` on a free port (or uses ``--redis URL``; the
example works in a namespace of its own and deletes it at the end), three worker
processes (this script, ``worker`` mode) and a producer (this process). Each is an
engine with its own SQLite outbox in one namespace of 6 partitions. Billing is a
cluster-scope subscription: each partition is leased to one worker at a time and
its orders are billed there, in order. Once a third of the orders are billed, one
worker is killed (SIGKILL, mid-payment perhaps); a lease_ttl later the survivors
take its partitions and bill what it left unacknowledged. At the end: who billed
what, the takeover, and whether every order was billed. Billing is at least once:
an order the killed worker billed but had not acknowledged is billed again, and
the example counts such duplicates.
"""

from __future__ import annotations

import argparse
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import anyio
import coredis
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from engine import Engine, Event
from engine.cluster import RedisStreams

PARTITIONS = 6
LEASE_TTL = 1.0  # a killed worker's partitions move after this long
WORKERS = ("w1", "w2", "w3")
VICTIM = "w2"
ORDERS = 60
KILL_AFTER = ORDERS // 3  # orders billed before the victim is killed
PAYMENT_SECONDS = 0.02  # what one call to the payment service takes
DEADLINE = 20.0  # for each wait on the cluster: a bound, never reached normally
SCRIPT = str(Path(__file__).resolve())  # workers run this same script


class OrderPlaced(Event, tag="example.cluster.order_placed"):
    order: str
    amount: int

    def partition_key(self) -> str:
        # Every event of one order goes to one partition, so they stay in order.
        return self.order


def node_config(url: str, namespace: str, node: str) -> RedisStreams:
    return RedisStreams(
        url, namespace=namespace, partitions=PARTITIONS, node=node, lease_ttl=LEASE_TTL
    )


# --------------------------------------------------------------------- a worker


async def work(url: str, namespace: str, node: str, database: str) -> None:
    """One worker: bills the orders of the partitions it holds, says so on stdout
    (one line each), and leaves the cluster when its stdin closes."""

    def say(*words: object) -> None:
        print(*words, flush=True)

    async def bill(event: OrderPlaced) -> None:
        await anyio.sleep(PAYMENT_SECONDS)  # the payment service
        say("billed", event.order)

    async with Engine(database, cluster=node_config(url, namespace, node)) as engine:
        engine.subscribe(OrderPlaced, handler=bill, name="billing")
        say("ready")

        async def report_leases() -> None:
            # Metrics are the public view of what this node holds; polled for the demo.
            held: list[int] | None = None
            while True:
                cluster = engine.metrics().cluster
                now = cluster.owned.get("billing", []) if cluster is not None else []
                if now != held:
                    held = now
                    say("holds", ",".join(map(str, now)))
                await anyio.sleep(0.05)

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(report_leases)
            # The coordinator closes our stdin to make us leave (and so does its death).
            await anyio.to_thread.run_sync(sys.stdin.buffer.read, abandon_on_cancel=True)
            tasks.cancel_scope.cancel()
    say("left")


# ---------------------------------------------------------------- the coordinator


class Stopped(Exception):
    """The demo cannot go on: no redis-server to start, or the cluster did not do
    something in time (the message says what)."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def answers_ping(port: int) -> bool:
    try:
        async with await anyio.connect_tcp("127.0.0.1", port) as stream:
            await stream.send(b"PING\r\n")
            return (await stream.receive()).startswith(b"+PONG")
    except OSError:
        return False


@asynccontextmanager
async def local_redis(directory: Path) -> AsyncIterator[str]:
    """A redis-server on a free loopback port, without persistence, for this run only."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise Stopped(
            "this example needs Redis: redis-server is not installed (Debian/Ubuntu: "
            "apt-get install redis-server), or pass --redis redis://host:port/0"
        )
    port = free_port()
    log = directory / "redis.log"
    command = [binary, "--port", str(port), "--bind", "127.0.0.1"]
    command += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    with log.open("wb") as output:
        process = await anyio.open_process(command, stdout=output, stderr=subprocess.STDOUT)
    try:
        for _ in range(200):  # a fresh server listens within milliseconds; 10 s at most
            if process.returncode is not None or await answers_ping(port):
                break
            await anyio.sleep(0.05)
        if not await answers_ping(port):
            raise Stopped(f"redis-server did not start:\n{log.read_text()[-2000:]}")
        version = (await anyio.run_process([binary, "--version"])).stdout.decode().split()
        print(f"started {' '.join(version[:3])} on 127.0.0.1:{port} (no persistence)")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        with anyio.move_on_after(5):
            await process.wait()
        if process.returncode is None:
            process.kill()


class Cluster:
    """What the workers said: who is ready, who holds which partitions, who billed what."""

    def __init__(self) -> None:
        self.ready: set[str] = set()
        self.holds: dict[str, list[int]] = {}
        self.billed: dict[str, list[str]] = {}  # order -> the workers that billed it
        self.by_worker: dict[str, list[str]] = {name: [] for name in WORKERS}
        self.left: set[str] = set()
        self._changed = anyio.Event()

    def heard(self, node: str, line: str) -> None:
        word, _, rest = line.partition(" ")
        if word == "ready":
            self.ready.add(node)
        elif word == "holds":
            self.holds[node] = [int(p) for p in rest.split(",") if p]
        elif word == "billed":
            self.billed.setdefault(rest, []).append(node)
            self.by_worker[node].append(rest)
        elif word == "left":
            self.left.add(node)
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        with anyio.move_on_after(DEADLINE):
            while not condition():
                await self._changed.wait()
        if not condition():
            missing = [f"o-{i}" for i in range(ORDERS) if f"o-{i}" not in self.billed]
            raise Stopped(
                f"not within {DEADLINE:g} s: {what} (seen: {self.held() or 'no leases'}; "
                f"{len(self.billed)} of {ORDERS} orders billed, missing {missing[:10]})"
            )

    def held(self) -> str:
        return ", ".join(f"{node} holds {self.holds.get(node, [])}" for node in sorted(self.holds))


async def listen(process: Process, node: str, cluster: Cluster) -> None:
    assert process.stdout is not None
    lines = BufferedByteReceiveStream(process.stdout)
    while True:
        try:
            line = await lines.receive_until(b"\n", 1024)
        except (anyio.EndOfStream, anyio.IncompleteRead):
            return
        cluster.heard(node, line.decode())


async def coordinate(backend: str, redis: str | None) -> bool:
    """Run the demo; True when every order was billed."""
    with tempfile.TemporaryDirectory(prefix="actorbus-cluster-") as scratch:
        directory = Path(scratch)
        async with AsyncExitStack() as stack:
            if redis is None:
                url = await stack.enter_async_context(local_redis(directory))
            else:
                url = redis
                print("using the Redis given with --redis")
            namespace = f"example-{secrets.token_hex(3)}"
            print(
                f"namespace {namespace}: {PARTITIONS} partitions, lease_ttl {LEASE_TTL:g} s, "
                f"backend {backend}"
            )
            if redis is None:
                return await demo(backend, url, namespace, directory)
            every = False
            try:
                every = await demo(backend, url, namespace, directory)
            finally:
                if every:
                    await forget_namespace(url, namespace)
                else:
                    print(
                        f"kept namespace {namespace} in that Redis for a look: python -m "
                        f"engine cluster status URL --namespace {namespace}",
                        file=sys.stderr,
                    )
            return every


async def demo(backend: str, url: str, namespace: str, directory: Path) -> bool:
    cluster = Cluster()
    processes: dict[str, Process] = {}
    async with anyio.create_task_group() as listeners:
        try:
            for node in WORKERS:
                database = str(directory / f"{node}.db")
                process = await anyio.open_process(
                    [sys.executable, SCRIPT, "worker", backend, url, namespace, node, database],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=None,  # a worker's traceback goes straight to the terminal
                )
                processes[node] = process
                listeners.start_soon(listen, process, node, cluster)

            def spread() -> bool:
                held = [cluster.holds.get(node, []) for node in WORKERS]
                together = sorted(p for partitions in held for p in partitions)
                return together == list(range(PARTITIONS)) and all(len(h) == 2 for h in held)

            await cluster.until(
                lambda: cluster.ready == set(WORKERS) and spread(),
                "three workers ready, holding 2 partitions each",
            )
            print(f"1. three workers joined: {cluster.held()}")

            killed_at, victim_held = await produce(url, namespace, directory, cluster, processes)

            await cluster.until(lambda: len(cluster.billed) == ORDERS, "every order billed")
            survivors = [node for node in WORKERS if node != VICTIM]
            share = -(-PARTITIONS // len(survivors))  # leases spread evenly again
            await cluster.until(
                lambda: all(len(cluster.holds.get(n, [])) == share for n in survivors),
                f"the survivors hold {share} partitions each",
            )
            took = time.monotonic() - killed_at
            print(
                f"4. takeover: {VICTIM}'s partitions {victim_held} moved on, "
                f"{took:.1f} s after the kill (lease_ttl {LEASE_TTL:g} s): "
                + ", ".join(f"{node} holds {cluster.holds[node]}" for node in survivors)
            )
            print("5. who billed what:")
            for node in WORKERS:
                orders = cluster.by_worker[node]
                note = " (killed)" if node == VICTIM else ""
                print(f"   {node}{note}: {len(orders)} orders, {', '.join(orders[:6])} ...")
            duplicates = sum(len(nodes) - 1 for nodes in cluster.billed.values())
            every = all(f"o-{i}" in cluster.billed for i in range(ORDERS))
            print(
                f"6. every order billed: {every} ({len(cluster.billed)} of {ORDERS}; "
                f"billed twice: {duplicates}, as at-least-once allows)"
            )
        finally:
            for process in processes.values():
                if process.returncode is None and process.stdin is not None:
                    await process.stdin.aclose()  # leave the cluster
            with anyio.move_on_after(DEADLINE):
                for process in processes.values():
                    await process.wait()
            for process in processes.values():
                if process.returncode is None:
                    process.kill()
    print(f"7. {' and '.join(sorted(cluster.left))} left the cluster")
    return every


async def produce(
    url: str,
    namespace: str,
    directory: Path,
    cluster: Cluster,
    processes: dict[str, Process],
) -> tuple[float, list[int]]:
    """Commit the orders on a node of their own while the victim is killed once a third
    of them are billed; returns when it was killed and what it held."""
    killed: list[tuple[float, list[int]]] = []

    async def kill_midway() -> None:
        await cluster.until(lambda: len(cluster.billed) >= KILL_AFTER, "a third billed")
        held = cluster.holds.get(VICTIM, [])
        processes[VICTIM].kill()  # SIGKILL: no goodbye, its leases just run out
        killed.append((time.monotonic(), held))
        print(
            f"3. {len(cluster.billed)} orders billed: killed {VICTIM} (SIGKILL) holding "
            f"{held}, after it billed {len(cluster.by_worker[VICTIM])}"
        )

    producer = node_config(url, namespace, "producer")
    async with Engine(directory / "producer.db", cluster=producer) as engine:
        print(f"2. the producer commits {ORDERS} orders")
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(kill_midway)
            for i in range(ORDERS):
                await engine.publish(OrderPlaced(order=f"o-{i}", amount=10 + i))
                await anyio.sleep(0.025)  # a steady trickle, so the kill lands mid-run
        # Leave only once Redis has every order: the outbox would keep them otherwise.
        for _ in range(int(DEADLINE / 0.05)):
            view = engine.metrics().cluster
            if view is None or not view.forwarding_lag:
                break
            await anyio.sleep(0.05)  # the lag moves with the node's beat
        else:
            raise Stopped(f"not within {DEADLINE:g} s: every order forwarded to Redis")
    return killed[0]


async def forget_namespace(url: str, namespace: str) -> None:
    """Delete what the example wrote in Redis (it matters with --redis)."""
    client = coredis.Redis.from_url(url)
    with anyio.move_on_after(5):
        async with client:
            keys = [key async for key in client.scan_iter(match=f"{namespace}:*")]
            if keys:
                await client.delete(keys)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        backend, url, namespace, node, database = sys.argv[2:7]
        anyio.run(work, url, namespace, node, database, backend=backend)
        return 0
    parser = argparse.ArgumentParser(
        prog="examples/cluster.py", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("backend", nargs="?", default="asyncio", choices=["asyncio", "trio"])
    parser.add_argument("--redis", metavar="URL", help="a running Redis instead of a local one")
    args = parser.parse_args()
    if args.redis is not None:
        try:
            node_config(args.redis, "example", "check")
        except ValueError as exc:
            parser.error(str(exc))
    every = False
    try:
        every = anyio.run(coordinate, args.backend, args.redis, backend=args.backend)
    except* Stopped as stopped:  # raised in a task group or not
        for problem in stopped.exceptions:
            print(f"examples/cluster.py: {problem}", file=sys.stderr)
    else:
        print("done" if every else "NOT every order was billed")
    return 0 if every else 1


if __name__ == "__main__":
    sys.exit(main())
