"""One cluster node in a child process, for ``tests/test_cluster.py``.

    python tests/cluster_node.py --db DB --url URL --namespace NS --node NAME \
        --workdir DIR [--backend asyncio|trio] [--partitions P] [--lease-ttl SECONDS]

The node runs an engine on a real SQLite file joined to a real Redis with a
cluster-scope subscription (``jobs``) and a projection (``tally``, node scope)
of ``Job`` events, prints ``ready`` and then obeys commands read from stdin,
one a line:

- ``produce COUNT PACE KEYS [HOLD]``: commit COUNT jobs, one ``transact`` at a
  time, ``PACE`` seconds apart, on keys ``{node}-0`` .. ``{node}-{KEYS-1}`` in turn
  (``n`` counts them from 0, so ``n`` grows along each key), each taking its
  handler ``HOLD`` seconds (0 by default); prints ``produced``;
- ``quit`` (or end of input): leave the engine normally; prints ``stopped``.

What the node did is recorded in WORKDIR, one line per fact, each line one
``os.write`` on a file opened with O_APPEND, so a SIGKILL loses no whole line:

- ``{node}.handled``: ``PID EVENT_ID KEY N`` per job the ``jobs`` handler finished;
- ``{node}.begun``: ``PID EVENT_ID`` when the handler starts a job that holds;
- ``{node}.acked``: ``EVENT_ID KEY N`` per job whose ``transact`` returned;
- ``{node}.log``: ``LEVEL MESSAGE`` per record of the ``actorbus.cluster`` logger.

The projection writes one row per job it applies into table ``applied`` of the
node's database (no UNIQUE constraint: a job applied twice shows as two rows).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import anyio

from engine import Engine, Event, Transaction
from engine.cluster import RedisStreams

JOBS = "jobs"
TALLY = "tally"


class Job(Event, tag="cluster.job"):
    """A unit of work on ``key``; ``n`` counts its producer's jobs, ``hold`` is how long
    its handler takes."""

    key: str
    n: int
    hold: float = 0.0

    def partition_key(self) -> str:
        # Jobs of one key share a partition, so they keep their order cluster-wide.
        return self.key


class Records:
    """The node's record files: one ``os.write`` per line, O_APPEND."""

    def __init__(self, workdir: Path, node: str) -> None:
        self.fds: dict[str, int] = {}
        for kind in ("handled", "begun", "acked", "log"):
            path = workdir / f"{node}.{kind}"
            self.fds[kind] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, kind: str, line: str) -> None:
        os.write(self.fds[kind], (line + "\n").encode())

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)


class RecordHandler(logging.Handler):
    def __init__(self, records: Records) -> None:
        super().__init__(logging.DEBUG)
        self.records = records

    def emit(self, record: logging.LogRecord) -> None:
        self.records.write("log", f"{record.levelname} {record.getMessage()}")


def setup(tx: Transaction) -> None:
    tx.conn.execute(
        "CREATE TABLE IF NOT EXISTS applied (event_id TEXT NOT NULL, key TEXT NOT NULL, "
        "n INTEGER NOT NULL)"
    )


def apply(tx: Transaction, job: Job) -> None:
    tx.conn.execute(
        "INSERT INTO applied (event_id, key, n) VALUES (?, ?, ?)", (str(job.id), job.key, job.n)
    )


class Node:
    def __init__(self, options: argparse.Namespace) -> None:
        self.options = options
        self.name: str = options.node
        self.records = Records(Path(options.workdir), self.name)
        self.pid = os.getpid()

    async def handle(self, job: Job) -> None:
        if job.hold:
            self.records.write("begun", f"{self.pid} {job.id}")
            await anyio.sleep(job.hold)
        self.records.write("handled", f"{self.pid} {job.id} {job.key} {job.n}")

    async def commit(self, engine: Engine, job: Job) -> None:
        await engine.transact(lambda tx: tx.publish(job))
        self.records.write("acked", f"{job.id} {job.key} {job.n}")

    async def produce(
        self, engine: Engine, count: int, pace: float, keys: int, hold: float
    ) -> None:
        for n in range(count):
            await self.commit(engine, Job(key=f"{self.name}-{n % keys}", n=n, hold=hold))
            await anyio.sleep(pace)
        print("produced", flush=True)

    async def main(self) -> None:
        options = self.options
        cluster = RedisStreams(
            options.url,
            namespace=options.namespace,
            partitions=options.partitions,
            node=self.name,
            lease_ttl=options.lease_ttl,
        )
        async with Engine(options.db, cluster=cluster) as engine, anyio.create_task_group() as tg:
            await engine.transact(setup)
            engine.subscribe(Job, handler=self.handle, name=JOBS)
            engine.project(Job, projector=apply, name=TALLY)
            print("ready", flush=True)
            while True:
                line = await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
                words = line.split()
                if not words or words[0] == "quit":
                    break
                if words[0] == "produce":
                    count, pace, keys = int(words[1]), float(words[2]), int(words[3])
                    hold = float(words[4]) if len(words) > 4 else 0.0
                    tg.start_soon(self.produce, engine, count, pace, keys, hold)
                else:
                    raise SystemExit(f"unknown command {line!r}")
            tg.cancel_scope.cancel()
        print("stopped", flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="one cluster node for the tests")
    parser.add_argument("--db", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--node", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--lease-ttl", type=float, default=1.0)
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    options = parse(argv)
    node = Node(options)
    logger = logging.getLogger("actorbus.cluster")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(RecordHandler(node.records))
    try:
        anyio.run(node.main, backend=options.backend)
    finally:
        node.records.close()


if __name__ == "__main__":
    main(sys.argv[1:])
