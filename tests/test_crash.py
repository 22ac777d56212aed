"""Crash safety: a real child process on a real SQLite file, killed with SIGKILL.

The child (``tests/crash_child.py``) runs writers (``transact`` with a domain
write and ``tx.publish``, some raising on purpose after publishing), a plain
subscription, a partitioned one and a projection. The parent kills it at random
moments, restarts it, alternating asyncio and trio, and lets a last clean child
catch up. Then it reads the database and the children's record files directly
and checks atomicity, at-least-once delivery, exactly-once projection and order.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import select
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest

from engine import Engine
from engine._store import Transaction
from engine.events import decode
from tests.crash_child import BURST, KEYED, KEYED_PARTITIONS, PLAIN, PROJECTION, Paid

ROOT = Path(__file__).resolve().parent.parent
CHILD = Path(__file__).resolve().with_name("crash_child.py")
KILLS = 24
KILL_MODES = ("writes", "handlers", "projection", "mixed")
BACKENDS = ("asyncio", "trio")
# Bounds for a child to say "ready" and for the clean child to finish: they
# only turn a hang into a clear failure before the 60 s test timeout.
READY_BOUND = 15.0
FINAL_BOUND = 40.0


def crash_seed() -> int:
    """CRASH_SEED=N reproduces a run's choices (kill delays, modes, children's seeds)."""
    return int(os.environ.get("CRASH_SEED", random.randrange(2**32)))


# ------------------------------------------------------------ the children


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), *filter(None, [env.get("PYTHONPATH")])]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def describe(proc: subprocess.Popen[bytes]) -> str:
    return " ".join(map(str, proc.args)) if isinstance(proc.args, list) else str(proc.args)


@contextlib.contextmanager
def child(
    db: Path, workdir: Path, mode: str, seed: int, backend: str, index: int
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """A running child; on the way out (also on failure) killed if still running and reaped."""
    stderr_path = workdir / f"child-{index}-{mode}-{backend}.stderr"
    args = [str(CHILD), str(db), str(workdir), mode, str(seed), backend]
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-W", "error", *args],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=child_env(),
            cwd=ROOT,
        )
    try:
        yield proc, stderr_path
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def wait_for_line(proc: subprocess.Popen[bytes], stderr: Path, expected: str) -> None:
    """Block until the child prints ``expected`` (bounded; a child that dies is a failure)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_BOUND
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"child {describe(proc)} printed no {expected!r} line in {READY_BOUND} s")
        readable, _, _ = select.select([proc.stdout], [], [], remaining)
        if not readable:
            continue
        line = proc.stdout.readline()
        if not line:
            proc.wait()
            pytest.fail(
                f"child {describe(proc)} exited with {proc.returncode} before {expected!r}:\n"
                + stderr.read_text()
            )
        if line.decode().strip() == expected:
            return


def kill_at_random(
    db: Path, workdir: Path, mode: str, seed: int, backend: str, index: int, delay: float
) -> None:
    """Start a child, wait for "ready", sleep ``delay`` and SIGKILL it."""
    with child(db, workdir, mode, seed, backend, index) as (proc, stderr):
        wait_for_line(proc, stderr, "ready")
        time.sleep(delay)
        if proc.poll() is not None:
            pytest.fail(
                f"child {index} ({mode}, {backend}) exited on its own with {proc.returncode}:\n"
                + stderr.read_text()
            )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def run_clean(db: Path, workdir: Path, mode: str, seed: int, backend: str, index: int) -> str:
    """Run a child to its normal exit; returns its stdout."""
    with child(db, workdir, mode, seed, backend, index) as (proc, stderr):
        try:
            out, _ = proc.communicate(timeout=FINAL_BOUND)
        except subprocess.TimeoutExpired:
            pytest.fail(f"clean child ({backend}) did not finish in {FINAL_BOUND} s")
        assert proc.returncode == 0, stderr.read_text()
    return out.decode()


# --------------------------------------------------------- reading it back


@dataclass
class Row:
    seq: int
    event: Paid


@dataclass
class Handled:
    run: int
    event_id: str
    order: str
    part: int


@dataclass
class History:
    outbox: list[Row]
    orders: dict[str, tuple[int, int]]
    """Order id -> (amount, parts) as the domain table has it."""
    applied: list[tuple[str, str, int, int]]
    totals: tuple[int, int]
    tracking: dict[tuple[str, int], int]
    dead_letters: int
    logs: dict[str, list[str]] = field(default_factory=dict)

    @property
    def by_id(self) -> dict[str, Row]:
        return {str(row.event.id): row for row in self.outbox}


def read_history(db: Path, workdir: Path) -> History:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        outbox = []
        for seq, type_, payload in conn.execute(
            "SELECT seq, type, payload FROM outbox ORDER BY seq"
        ):
            event = decode(payload)
            assert type_ == "crash.paid"
            assert isinstance(event, Paid)
            outbox.append(Row(seq, event))
        orders = {
            str(oid): (int(amount), int(parts))
            for oid, amount, parts in conn.execute("SELECT id, amount, parts FROM orders")
        }
        applied = [
            (str(e), str(o), int(p), int(n))
            for e, o, p, n in conn.execute(
                "SELECT event_id, order_id, part, nth FROM applied ORDER BY rowid"
            )
        ]
        total, events = conn.execute(
            "SELECT total, events FROM totals WHERE name = 'all'"
        ).fetchone()
        tracking = {
            (str(s), int(p)): int(pos)
            for s, p, pos in conn.execute("SELECT subscriber, partition, position FROM tracking")
        }
        dead_letters = conn.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    logs = {}
    for name in ("plain", "keyed", "failed", "acked"):
        path = workdir / f"{name}.log"
        text = path.read_text() if path.exists() else ""
        # A kill cannot tear a line (one write each), so every line is whole.
        assert not text or text.endswith("\n"), f"{name}.log ends in a partial line"
        logs[name] = text.splitlines()
    return History(outbox, orders, applied, (int(total), int(events)), tracking, dead_letters, logs)


def handled(history: History, log: str) -> list[Handled]:
    out = []
    for line in history.logs[log]:
        run, event_id, order, part = line.split()
        out.append(Handled(int(run), event_id, order, int(part)))
    return out


def check_outbox_and_atomicity(history: History) -> None:
    """Outbox order is commit order; domain rows and events committed together or not at all."""
    seqs = [row.seq for row in history.outbox]
    assert seqs, "nothing was committed"
    # Rolled-back work gives its seq back (SQLite undoes the AUTOINCREMENT step
    # with the savepoint) and nothing was pruned: 1..head with no gap.
    assert seqs == list(range(1, len(seqs) + 1)), "outbox seqs are not 1..head without gaps"
    by_order: dict[str, list[Paid]] = collections.defaultdict(list)
    for row in history.outbox:
        by_order[row.event.order].append(row.event)
    assert set(by_order) == set(history.orders), (
        "orders without events: "
        f"{sorted(set(history.orders) - set(by_order))[:5]}, events without an order: "
        f"{sorted(set(by_order) - set(history.orders))[:5]}"
    )
    for order, events in by_order.items():
        amount, parts = history.orders[order]
        # Payments on one order come from concurrent writers; each read `parts`
        # in its transaction, so seq order must be the order they committed in.
        assert [e.part for e in events] == list(range(len(events))), (order, events)
        assert parts == len(events), order
        assert amount == sum(e.amount for e in events), order
    ids = [str(row.event.id) for row in history.outbox]
    assert len(set(ids)) == len(ids), "an event id is in the outbox twice"
    # Every transact that returned was durable (SIGKILL loses no commit).
    acked = {line.split()[0] for line in history.logs["acked"]}
    assert acked <= set(ids), f"acknowledged but lost: {sorted(acked - set(ids))[:5]}"


def check_failed_left_no_trace(history: History) -> None:
    failed = [line.split() for line in history.logs["failed"]]
    assert failed, "no transaction failed on purpose: the check would be empty"
    failed_ids = {event_id for event_id, _ in failed}
    ids = set(history.by_id)
    assert not failed_ids & ids, "an event of a rolled-back transaction is in the outbox"
    for log in ("plain", "keyed"):
        seen = {h.event_id for h in handled(history, log)}
        assert not failed_ids & seen, f"{log} handled an event of a rolled-back transaction"
    assert not failed_ids & {a[0] for a in history.applied}, "a rolled-back event was projected"
    # A failed transaction that created its order created no order.
    new_orders = {order for _, order in failed if order not in history.orders}
    assert not {e.event.order for e in history.outbox} & new_orders


def check_at_least_once(history: History) -> dict[str, int]:
    """Every committed event handled by each subscription; nothing else. Returns duplicates."""
    by_id = history.by_id
    committed = set(by_id)
    duplicates = {}
    for log in ("plain", "keyed"):
        records = handled(history, log)
        seen = [h.event_id for h in records]
        missing = committed - set(seen)
        assert not missing, f"{log} never handled {len(missing)} committed events"
        unknown = set(seen) - committed
        assert not unknown, f"{log} handled {len(unknown)} events that never committed"
        for h in records:
            event = by_id[h.event_id].event
            assert (h.order, h.part) == (event.order, event.part)
        duplicates[log] = len(seen) - len(committed)
    return duplicates


def check_order(history: History) -> None:
    """Within one run, the plain subscription sees seq order, the keyed one per-key order."""
    by_id = history.by_id
    plain_runs: dict[int, list[int]] = collections.defaultdict(list)
    for h in handled(history, "plain"):
        plain_runs[h.run].append(by_id[h.event_id].seq)
    for run, seqs in plain_runs.items():
        assert seqs == sorted(set(seqs)), f"run {run}: plain saw seqs out of order"
    keyed: dict[tuple[int, str], list[int]] = collections.defaultdict(list)
    for h in handled(history, "keyed"):
        keyed[h.run, h.order].append(by_id[h.event_id].seq)
    for (run, order), seqs in keyed.items():
        assert seqs == sorted(set(seqs)), f"run {run}: keyed saw {order}'s events out of order"


def check_projection(history: History) -> None:
    """Applied exactly once, each order's events in order, and the total adds up."""
    by_id = history.by_id
    counts = collections.Counter(a[0] for a in history.applied)
    twice = [event_id for event_id, n in counts.items() if n > 1]
    assert not twice, f"{len(twice)} events applied more than once, e.g. {twice[:3]}"
    assert set(counts) == set(by_id), "the projection missed committed events"
    for event_id, order, part, nth in history.applied:
        assert (order, part) == (by_id[event_id].event.order, by_id[event_id].event.part)
        assert nth == part, f"{order}: payment {part} applied as number {nth}"
    amounts = sum(row.event.amount for row in history.outbox)
    assert history.totals == (amounts, len(history.outbox))


def check_positions(history: History) -> None:
    head = history.outbox[-1].seq
    expected = {(PLAIN, 0), (PROJECTION, 0)} | {(KEYED, p) for p in range(KEYED_PARTITIONS)}
    assert set(history.tracking) == expected
    assert all(position == head for position in history.tracking.values()), history.tracking
    assert history.dead_letters == 0


# ------------------------------------------------------------------- tests


def test_sigkill_at_random_moments_loses_nothing_and_duplicates_nothing_exactly_once(
    tmp_path: Path,
) -> None:
    seed = crash_seed()
    print(f"CRASH_SEED={seed}")
    rng = random.Random(seed)
    db = tmp_path / "crash.db"
    seeds = rng.sample(range(1, 2**40), KILLS + 1)
    kills = 0
    for index in range(KILLS):
        backend = BACKENDS[index % 2]
        mode = KILL_MODES[(index // 2) % len(KILL_MODES)]
        kill_at_random(db, tmp_path, mode, seeds[index], backend, index, rng.uniform(0, 0.3))
        kills += 1
    out = run_clean(db, tmp_path, "final", seeds[KILLS], rng.choice(BACKENDS), KILLS)
    assert "caught up at" in out
    assert kills >= 20

    history = read_history(db, tmp_path)
    check_outbox_and_atomicity(history)
    check_failed_left_no_trace(history)
    duplicates = check_at_least_once(history)
    check_order(history)
    check_projection(history)
    check_positions(history)
    print(f"{kills} kills, {len(history.outbox)} events, redelivered after kills: {duplicates}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_sigkill_during_concurrent_transacts_leaves_a_gapless_outbox_a_restart_reads(
    tmp_path: Path, backend: str
) -> None:
    seed = crash_seed()
    print(f"CRASH_SEED={seed}")
    rng = random.Random(seed)
    db = tmp_path / "burst.db"
    kill_at_random(db, tmp_path, "burst", rng.randrange(1, 2**40), backend, 0, rng.uniform(0, 0.3))

    seen: list[Paid] = []

    def rows(tx: Transaction) -> tuple[list[tuple[int, str, str]], list[str]]:
        conn = tx.conn
        outbox = conn.execute("SELECT seq, id, payload FROM outbox ORDER BY seq").fetchall()
        orders = [row[0] for row in conn.execute("SELECT id FROM orders")]
        return [(s, i, bytes(p).decode()) for s, i, p in outbox], orders

    async def restart() -> tuple[list[tuple[int, str, str]], list[str], int]:
        async with Engine(db) as engine:
            outbox, orders = await engine.transact(rows)
            read_all = anyio.Event()

            async def read(event: Paid) -> None:
                seen.append(event)
                if len(seen) >= len(outbox):
                    read_all.set()

            engine.subscribe(Paid, handler=read, name="reader")
            with anyio.fail_after(20):
                await read_all.wait()
            return outbox, orders, engine.metrics().outbox_head

    outbox, orders, head = anyio.run(restart, backend=backend)
    failed = {line.split()[0] for line in (tmp_path / "failed.log").read_text().splitlines()}
    acked = {line.split()[0] for line in (tmp_path / "acked.log").read_text().splitlines()}

    seqs = [seq for seq, _, _ in outbox]
    # The child said "ready" after a first round of BURST calls had returned.
    assert len(seqs) >= len(acked) >= BURST // 2, "the first round is missing"
    assert seqs == list(range(1, len(seqs) + 1)), "seqs not strictly increasing without gaps"
    assert head == seqs[-1]
    events = [decode(payload) for _, _, payload in outbox]
    assert all(isinstance(e, Paid) for e in events)
    per_order = collections.Counter(e.order for e in events if isinstance(e, Paid))
    assert set(per_order) == set(orders), "an order and its event did not commit together"
    assert all(n == 1 for n in per_order.values()), "an order has more than one outbox row"
    ids = [event_id for _, event_id, _ in outbox]
    assert not failed & set(ids)
    assert acked <= set(ids), "a transact returned but its commit was lost"
    # A new subscription starts at the oldest event: it reads the whole outbox, in order.
    assert [str(e.id) for e in seen] == ids
