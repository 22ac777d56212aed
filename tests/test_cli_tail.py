"""``python -m engine tail``: outbox events as they commit, read-only, on real files.

The databases are written by a real ``Engine``; ``--follow`` runs in a real child
process while an engine in the test process commits, and a real ``SQLITE_BUSY`` comes
from a connection holding SQLite's exclusive lock.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, closing
from datetime import UTC, datetime
from pathlib import Path
from uuid import UUID, uuid4

import anyio
import pytest
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from engine import Engine, Event
from engine._cli import main
from engine.catalog import NodeCreated, OrderPlaced
from engine.events import encode

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).resolve().parent.parent
TENANT = UUID("0190a3c4-0000-7000-8000-000000000001")
HOSTILE = "\x1b[31mred\x1b[0m\rspoofed \x9b2J\u202eevil\u2028x\x00"
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x061C, 0x202E, 0x2066, 0x2028]}
# Generous: the child imports the engine and polls every 0.2 s.
BOUND = 30.0


class Note(Event, tag="t15.tail.note"):
    text: str


def order(total: int, *, tenant: UUID | None = None) -> OrderPlaced:
    return OrderPlaced(order_id=uuid4(), total=total, currency="EUR", tenant_id=tenant)


def node() -> NodeCreated:
    return NodeCreated(node_id=uuid4(), kind="page")


async def commit(path: Path, events: Sequence[Event]) -> None:
    """Each event published (so committed) by a real engine on ``path``."""
    async with Engine(path) as engine:
        for event in events:
            await engine.publish(event)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tail(capsys: pytest.CaptureFixture[str], *argv: str) -> list[str]:
    code, out, err = run(capsys, "tail", *argv)
    assert (code, err) == (0, "")
    return out.splitlines()


def created_at(path: Path) -> dict[int, float]:
    with closing(sqlite3.connect(path)) as conn:
        return dict(conn.execute("SELECT seq, created_at FROM outbox").fetchall())


@pytest.fixture
async def shop(tmp_path: Path) -> tuple[Path, list[Event]]:
    """Five events of two types (one with a tenant), committed by a real engine."""
    path = tmp_path / "app.db"
    events: list[Event] = [order(1), node(), order(2, tenant=TENANT), node(), order(3)]
    await commit(path, events)
    return path, events


# ------------------------------------------------------------------ printing


async def test_tail_prints_every_event_oldest_first_one_line_each(
    shop: tuple[Path, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, events = shop
    lines = tail(capsys, str(path))
    committed = created_at(path)
    assert len(lines) == len(events)
    for seq, (line, event) in enumerate(zip(lines, events, strict=True), start=1):
        shown_seq, when, tag, event_id, tenant, payload = line.split(" ", 5)
        assert int(shown_seq) == seq
        assert when.endswith("Z")
        stored = datetime.fromtimestamp(committed[seq], UTC)
        assert datetime.fromisoformat(when) == stored.replace(
            microsecond=stored.microsecond // 1000 * 1000
        )
        assert tag == event.event_type
        assert event_id == str(event.id)
        assert tenant == (str(TENANT) if event.tenant_id else "-")
        assert payload == encode(event).decode()


async def test_tail_type_keeps_only_the_events_of_those_tags(
    shop: tuple[Path, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = shop

    def seqs(*argv: str) -> list[int]:
        return [int(line.split(" ", 1)[0]) for line in tail(capsys, str(path), *argv)]

    assert seqs("--type", "order.placed") == [1, 3, 5]
    assert seqs("--type", "node.created") == [2, 4]
    assert seqs("--type", "node.created", "--type", "order.placed") == [1, 2, 3, 4, 5]
    # A well-formed tag that no event has: nothing, and no error.
    assert seqs("--type", "order.cancelled") == []
    assert seqs("--type", "order.placed", "--from-seq", "2") == [3, 5]
    assert seqs("--from-seq", "5") == [5]
    assert seqs("--from-seq", "6") == []


async def test_tail_json_prints_one_object_per_line_with_the_payload_decoded(
    shop: tuple[Path, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, events = shop
    lines = tail(capsys, str(path), "--json")
    committed = created_at(path)
    assert len(lines) == len(events)
    for seq, (line, event) in enumerate(zip(lines, events, strict=True), start=1):
        row = json.loads(line)
        assert row == {
            "seq": seq,
            "type": event.event_type,
            "id": str(event.id),
            "tenant_id": str(TENANT) if event.tenant_id else None,
            "committed_at": row["committed_at"],
            "payload": json.loads(encode(event)),
            "undecodable": False,
        }
        assert datetime.fromisoformat(row["committed_at"]) == datetime.fromtimestamp(
            committed[seq], UTC
        )


async def test_an_empty_outbox_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    await commit(path, [])
    assert tail(capsys, str(path)) == []
    assert tail(capsys, str(path), "--json") == []


async def test_a_backlog_longer_than_a_page_is_printed_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    events = [order(n) if n % 3 else node() for n in range(1201)]
    await commit(path, events)
    lines = tail(capsys, str(path))
    assert [int(line.split(" ", 1)[0]) for line in lines] == list(range(1, 1202))
    nodes = tail(capsys, str(path), "--type", "node.created")
    assert [int(line.split(" ", 1)[0]) for line in nodes] == list(range(1, 1202, 3))


# ------------------------------------------------------------------ escaping


def assert_safe(out: str) -> None:
    """No character a terminal acts on, but the newline ending each line."""
    assert {c for c in out if c in UNSAFE} <= {"\n"}


async def test_control_and_bidi_characters_in_a_payload_never_reach_the_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "app.db"
    note = Note(text=HOSTILE)
    await commit(path, [note])

    (line,) = tail(capsys, str(path))
    assert_safe(line + "\n")
    # The payload stays JSON: every control character as a JSON escape.
    payload = line.split(" ", 5)[5]
    assert (
        '"text":"\\u001b[31mred\\u001b[0m\\rspoofed \\u009b2J\\u202eevil\\u2028x\\u0000"' in payload
    )
    assert json.loads(payload)["text"] == HOSTILE

    code, out, err = run(capsys, "tail", str(path), "--json")
    assert (code, err) == (0, "")
    assert_safe(out)
    assert out.count("\n") == 1
    assert json.loads(out)["payload"]["text"] == HOSTILE  # escaped, not changed


async def test_a_row_another_tool_wrote_is_shown_escaped_and_flagged_undecodable(
    shop: tuple[Path, list[Event]], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = shop
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(
            "INSERT INTO outbox (id, type, tenant_id, payload, created_at) VALUES (?, ?, ?, ?, ?)",
            ("id\x1b[2J", "evil\rtype", "t\u202e", b"not json \x1b[31m \xff", "not a time"),
        )

    lines = tail(capsys, str(path), "--from-seq", "6")
    assert lines == ["6 ? evil\\rtype id\\x1b[2J t\\u202e not json \\x1b[31m \\xff"]

    code, out, err = run(capsys, "tail", str(path), "--json", "--from-seq", "6")
    assert (code, err) == (0, "")
    assert_safe(out)
    assert json.loads(out) == {
        "seq": 6,
        "type": "evil\rtype",
        "id": "id\x1b[2J",
        "tenant_id": "t\u202e",
        "committed_at": None,
        "payload": "not json \x1b[31m \\xff",
        "undecodable": True,
    }


# ------------------------------------------------------------ refused input


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("", "a type tag is not empty or blank, got ''"),
        ("   ", "a type tag is not empty or blank"),
        (" order.placed", "a type tag has no white space at either end"),
        ("order.placed\n", "a type tag has no white space at either end"),
        ("order\x1b[2J", "a type tag has no control or bidirectional characters"),
        ("order\rplaced", "a type tag has no control or bidirectional characters"),
        ("order\u202edecalp", "a type tag has no control or bidirectional characters"),
        ("o" * 256, "a type tag is at most 255 characters, got 256"),
        ("\x1b" * 100_000, "a type tag is at most 255 characters, got 100000"),
    ],
)
def test_a_garbage_type_is_a_usage_error_naming_the_value_and_the_rule(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str, rule: str
) -> None:
    # Refused before the database is even looked at (there is none here).
    with pytest.raises(SystemExit) as exc:
        main(["tail", str(tmp_path / "app.db"), "--type", value])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    message = err.splitlines()[-1]
    assert message.startswith("python -m engine tail: error: argument --type: ")
    assert rule in message
    assert_safe(err)
    assert len(message) < 300  # a huge value is shown cut


@pytest.mark.parametrize("value", ["0", "-1", "x", "1.5", str(2**63)])
def test_a_bad_from_seq_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["tail", str(tmp_path / "app.db"), "--from-seq", value])
    assert exc.value.code == 2
    assert f"a seq is an integer >= 1, got {value!r}" in capsys.readouterr().err


@pytest.mark.parametrize("follow", [[], ["--follow"]], ids=["once", "follow"])
def test_a_missing_file_is_an_error_and_is_never_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], follow: list[str]
) -> None:
    path = tmp_path / "nothing.db"
    assert run(capsys, "tail", str(path), *follow) == (1, "", f"error: no database at {path}\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("follow", [[], ["--follow"]], ids=["once", "follow"])
def test_a_file_that_is_not_an_actorbus_database_is_an_error_and_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], follow: list[str]
) -> None:
    notes = tmp_path / "notes.db"
    notes.write_bytes(b"not a database\n" * 100)
    code, out, err = run(capsys, "tail", str(notes), *follow)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: cannot read {notes} as an SQLite database: ")
    assert err.count("\n") == 1

    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn, conn:
        conn.execute("CREATE TABLE outbox (seq INTEGER)")
    before = other.read_bytes()
    assert run(capsys, "tail", str(other), *follow) == (
        1,
        "",
        f"error: {other} is not an actorbus database\n",
    )
    assert other.read_bytes() == before
    assert sorted(tmp_path.iterdir()) == [notes, other]


# ------------------------------------------------------------------- follow


class Tailing:
    """A real ``python -m engine tail PATH --follow ...`` child and its output."""

    def __init__(self, process: Process) -> None:
        assert process.stdout is not None
        assert process.stderr is not None
        self.process = process
        self.stdout = BufferedByteReceiveStream(process.stdout)
        self.stderr = BufferedByteReceiveStream(process.stderr)

    async def line(self) -> str:
        """The next line on stdout, without its newline."""
        return (await self.stdout.receive_until(b"\n", 1 << 20)).decode()

    async def note(self) -> str:
        """The next line on stderr, without its newline."""
        return (await self.stderr.receive_until(b"\n", 1 << 20)).decode()

    async def stop(self, signum: signal.Signals) -> tuple[int, str, str]:
        """Send ``signum``; the exit status and what is left on stdout and stderr."""
        self.process.send_signal(signum)
        code = await self.process.wait()
        return code, await rest(self.stdout), await rest(self.stderr)


async def rest(stream: BufferedByteReceiveStream) -> str:
    data = bytearray()
    while True:
        try:
            data += await stream.receive()
        except anyio.EndOfStream:
            return data.decode()


@asynccontextmanager
async def following(path: Path, *argv: str) -> AsyncIterator[Tailing]:
    # Its stdout is a pipe, block-buffered unless told otherwise: tail must flush itself.
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    process = await anyio.open_process(
        [sys.executable, "-m", "engine", "tail", str(path), "--follow", *argv], cwd=ROOT, env=env
    )
    async with process:
        try:
            yield Tailing(process)
        finally:
            if process.returncode is None:
                process.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_follow_prints_events_as_a_running_engine_commits_them(
    tmp_path: Path, signum: signal.Signals
) -> None:
    path = tmp_path / "app.db"
    before: list[Event] = [order(n) for n in range(3)]
    after: list[Event] = [order(n) if n % 2 else Note(text=HOSTILE) for n in range(40)]
    with anyio.fail_after(BOUND):
        async with Engine(path) as engine:
            for event in before:
                await engine.publish(event)
            async with following(path) as child:
                # It starts at the head: only what commits from now on is printed.
                assert await child.note() == f"tail: following {path} from seq 4 (Ctrl-C to stop)"
                for event in after:
                    await engine.publish(event)
                lines = [await child.line() for _ in after]
                code, out, err = await child.stop(signum)
    shown = [line.split(" ", 5) for line in lines]
    assert [int(fields[0]) for fields in shown] == list(range(4, 44))
    assert [(fields[2], fields[3]) for fields in shown] == [
        (event.event_type, str(event.id)) for event in after
    ]
    assert_safe("".join(lines))
    assert (code, out, err) == (0, "", "")


async def test_follow_from_seq_prints_the_retained_events_first_then_new_ones(
    tmp_path: Path,
) -> None:
    path = tmp_path / "app.db"
    with anyio.fail_after(BOUND):
        async with Engine(path) as engine:
            for n in range(5):
                await engine.publish(order(n))
            async with following(path, "--from-seq", "4", "--json") as child:
                assert (await child.note()).startswith("tail: following ")
                old = [json.loads(await child.line()) for _ in range(2)]
                new = node()
                await engine.publish(new)
                fresh = json.loads(await child.line())
                code, _, err = await child.stop(signal.SIGINT)
    assert [row["seq"] for row in old] == [4, 5]
    assert (fresh["seq"], fresh["id"], fresh["type"]) == (6, str(new.id), "node.created")
    assert (code, err) == (0, "")


async def test_follow_waits_out_a_locked_database(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    await commit(path, [order(1)])
    with anyio.fail_after(BOUND):
        async with following(path) as child:
            assert (await child.note()).startswith("tail: following ")
            # SQLite's exclusive locking mode on a WAL database: readers get SQLITE_BUSY.
            holder = sqlite3.connect(path, isolation_level=None)
            try:
                holder.execute("PRAGMA locking_mode = EXCLUSIVE")
                holder.execute("BEGIN EXCLUSIVE")
                assert await child.note() == (f"tail: {path}: database is locked; retrying")
                holder.execute("COMMIT")
            finally:
                holder.close()
            assert await child.note() == f"tail: {path} readable again"
            events = [order(2), node()]
            await commit(path, events)
            lines = [await child.line() for _ in events]
            code, out, err = await child.stop(signal.SIGINT)
    assert [line.split(" ", 4)[3] for line in lines] == [str(e.id) for e in events]
    assert (code, out, err) == (0, "", "")
