"""``python -m engine``: status, dead letters, replay requests, purge and prune."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

import msgspec
import pytest

from engine._cli import main
from engine._deadletters import DeadLetter, describe, format_traceback, write_row
from engine._store import OutboxStatus, connect, ensure_schema, event_tag
from engine.catalog import OrderPlaced
from engine.events import encode

ROOT = Path(__file__).resolve().parent.parent
DAY = 86400.0
AT = datetime(2024, 5, 1, 12, 30, tzinfo=UTC)


# ------------------------------------------------------------------ building


def new_db(tmp_path: Path) -> str:
    path = str(tmp_path / "app.db")
    with closing(connect(path)) as conn:
        ensure_schema(conn)
    return path


def add_events(path: str, n: int, *, age: float = 0.0) -> list[int]:
    """Append ``n`` real catalog events created ``age`` seconds ago; returns their seqs."""
    seqs = []
    with closing(connect(path)) as conn:
        for i in range(n):
            event = OrderPlaced(order_id=uuid4(), total=100 + i, currency="EUR")
            cursor = conn.execute(
                "INSERT INTO outbox (id, type, tenant_id, payload, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (str(event.id), event_tag(event), None, encode(event), time.time() - age),
            )
            assert cursor.lastrowid is not None
            seqs.append(cursor.lastrowid)
    return seqs


def track(path: str, name: str, positions: list[int], kind: str = "subscription") -> None:
    with closing(connect(path)) as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO tracking "
            "(subscriber, partition, position, partitions, kind, updated_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(name, i, p, len(positions), kind, time.time()) for i, p in enumerate(positions)],
        )


def add_letter(path: str, letter: DeadLetter) -> None:
    with closing(connect(path)) as conn:
        write_row(conn, letter)


def failure() -> ValueError:
    try:
        raise ValueError("cannot digest\nsecond line")
    except ValueError as exc:
        return exc


def letter(id_: int, actor: str, **fields: Any) -> DeadLetter:
    return DeadLetter(id=id_, actor=actor, message=fields.pop("message", {"n": id_}), **fields)


def query(path: str, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql, args).fetchall()


@pytest.fixture
def db(tmp_path: Path) -> str:
    """Six events (seq 1-4 ten days old), two subscriptions, three dead letters."""
    path = new_db(tmp_path)
    add_events(path, 4, age=10 * DAY)
    add_events(path, 2)
    track(path, "orders", [3, 5])
    track(path, "stats", [6], kind="projection")
    error = failure()
    event = OrderPlaced(order_id=uuid4(), total=1250, currency="EUR")
    add_letter(
        path,
        letter(
            1,
            "orders",
            message=event,
            reason="failed",
            error=describe(error),
            traceback=format_traceback(error),
            attempts=3,
            at=AT,
            seq=4,
        ),
    )
    add_letter(path, letter(2, "stats", reason="dropped", at=AT))
    add_letter(path, letter(3, "orders", reason="stopped", attempts=1, at=AT, seq=5))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert "usage:" in err
    return err


def failed(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, out, err = run(capsys, *argv)
    assert code == 1
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert "Traceback" not in err
    return err


# --------------------------------------------------------------------- status


def test_status_shows_the_outbox_positions_lag_and_dead_letters(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "status", db)
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert "schema version  1" in lines
    assert "outbox          6 events, first seq 1, head 6" in lines
    assert lines[lines.index("") + 1].split() == [
        "NAME",
        "KIND",
        "PARTITIONS",
        "POSITION",
        "LAG",
        "DEAD",
        "LETTERS",
    ]
    # orders: lowest position 3 over its two partitions -> seqs 4, 5, 6 still ahead.
    assert ["orders", "subscription", "2", "3", "3", "2"] in [line.split() for line in lines]
    assert ["stats", "projection", "1", "6", "0", "1"] in [line.split() for line in lines]
    assert lines[-1] == "dead letters    3"


def test_status_json(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "status", db, "--json")
    assert code == 0
    status = msgspec.json.decode(out, type=OutboxStatus)
    assert (status.schema_version, status.events, status.first_seq, status.head) == (1, 6, 1, 6)
    assert status.dead_letters == 3
    assert [
        (s.name, s.kind, s.partitions, s.position, s.lag, s.dead_letters)
        for s in status.subscribers
    ] == [
        ("orders", "subscription", 2, 3, 3, 2),
        ("stats", "projection", 1, 6, 0, 1),
    ]
    assert set(json.loads(out)) == {
        "schema_version",
        "events",
        "first_seq",
        "head",
        "subscribers",
        "dead_letters",
    }


def test_status_of_a_new_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = new_db(tmp_path)
    code, out, _ = run(capsys, "status", path)
    assert code == 0
    assert "outbox          0 events, first seq -, head 0" in out
    assert "no subscriptions or projections tracked" in out
    assert out.splitlines()[-1] == "dead letters    0"
    _, out, _ = run(capsys, "status", path, "--json")
    assert json.loads(out)["first_seq"] is None


def test_status_as_a_real_process(db: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "status", db],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert "outbox          6 events, first seq 1, head 6" in done.stdout

    missing = subprocess.run(
        [sys.executable, "-m", "engine", "status", db + ".missing"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert missing.returncode == 1
    assert missing.stdout == ""
    assert missing.stderr == f"error: no database at {db}.missing\n"


# --------------------------------------------------------------- dead letters


def listed_ids(out: str) -> list[int]:
    return [int(line.split()[0]) for line in out.splitlines()[1:]]


def test_list_shows_each_dead_letter(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "dead-letters", db)
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "SUBSCRIBER", "REASON", "ATTEMPTS", "AT", "SEQ", "ERROR"]
    assert lines[1].split() == [
        "1",
        "orders",
        "failed",
        "3",
        "2024-05-01T12:30:00+00:00",
        "4",
        "ValueError:",
        "cannot",
        "digest",
    ]
    assert lines[2].split() == ["2", "stats", "dropped", "0", "2024-05-01T12:30:00+00:00", "-"]
    assert listed_ids(out) == [1, 2, 3]
    # "list" is the default action.
    assert run(capsys, "dead-letters", db, "list")[1] == out


def test_list_filters_and_limits(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert listed_ids(run(capsys, "dead-letters", db, "--subscriber", "orders")[1]) == [1, 3]
    assert listed_ids(run(capsys, "dead-letters", db, "list", "--limit", "2")[1]) == [1, 2]
    assert listed_ids(run(capsys, "dead-letters", db, "--limit", "0")[1]) == [1, 2, 3]
    out = run(capsys, "dead-letters", db, "--subscriber", "nobody")[1]
    assert out == "no dead letters\n"


def test_list_default_limit_is_20(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = new_db(tmp_path)
    for i in range(1, 26):
        add_letter(path, letter(i, "orders", reason="dropped"))
    assert listed_ids(run(capsys, "dead-letters", path)[1]) == list(range(1, 21))


def test_list_json(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "dead-letters", db, "--json", "--subscriber", "orders")
    assert code == 0
    rows = json.loads(out)
    assert [row["id"] for row in rows] == [1, 3]
    assert rows[0]["message"]["type"] == "order.placed"
    assert rows[0]["error"] == "ValueError: cannot digest\nsecond line"
    assert rows[1] == {
        "id": 3,
        "actor": "orders",
        "message": {"n": 3},
        "reason": "stopped",
        "error": None,
        "traceback": None,
        "attempts": 1,
        "at": "2024-05-01T12:30:00Z",
        "seq": 5,
        "entry": None,  # the stream entry id of a dead letter from a cluster stream
    }


def test_show_prints_everything(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "dead-letters", db, "show", "1")
    assert code == 0
    assert "id          1\n" in out
    assert "subscriber  orders\n" in out
    assert "reason      failed\n" in out
    assert "attempts    3\n" in out
    assert "at          2024-05-01T12:30:00+00:00\n" in out
    assert "seq         4\n" in out
    assert "error       ValueError: cannot digest\n            second line\n" in out
    assert "message     OrderPlaced(" in out
    assert "total=1250, currency='EUR')" in out
    assert "Traceback (most recent call last):" in out
    assert "in failure" in out

    out = run(capsys, "dead-letters", db, "show", "2")[1]
    assert "error       -\n" in out
    assert "message     {'n': 2}\n" in out
    assert "Traceback" not in out
    assert json.loads(run(capsys, "dead-letters", db, "show", "2", "--json")[1])["id"] == 2


def test_show_an_unknown_id_fails(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert failed(capsys, "dead-letters", db, "show", "99") == "error: no dead letter with id 99\n"
    largest = str(2**63 - 1)
    assert failed(capsys, "dead-letters", db, "show", largest) == (
        f"error: no dead letter with id {largest}\n"
    )


def replay_flags(path: str) -> dict[int, int]:
    return {id_: flag for id_, flag in query(path, "SELECT id, replay_requested FROM dead_letters")}


def test_replay_flags_the_row_for_a_running_engine(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "dead-letters", db, "replay", "3")
    assert code == 0
    assert "dead letter 3 for 'orders' marked for replay" in out
    assert "within about a second" in out
    assert replay_flags(db) == {1: 0, 2: 0, 3: 1}


def test_replay_of_an_unknown_id_fails_and_changes_nothing(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert failed(capsys, "dead-letters", db, "replay", "99") == (
        "error: no dead letter with id 99\n"
    )
    assert replay_flags(db) == {1: 0, 2: 0, 3: 0}


def test_purge_one_subscriber(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "dead-letters", db, "purge", "--subscriber", "orders")[1] == (
        "purged 2 dead letters\n"
    )
    assert query(db, "SELECT id, subscriber FROM dead_letters") == [(2, "stats")]
    assert run(capsys, "dead-letters", db, "purge", "--subscriber", "orders")[1] == (
        "purged 0 dead letters\n"
    )


def test_purge_all(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "dead-letters", db, "purge") == (0, "purged 3 dead letters\n", "")
    assert query(db, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert run(capsys, "dead-letters", db)[1] == "no dead letters\n"


def test_an_sqlite_error_is_one_line(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("ALTER TABLE dead_letters DROP COLUMN replay_requested")
        conn.commit()
    err = failed(capsys, "dead-letters", db, "replay", "1")
    assert err == f"error: {db}: no such column: replay_requested\n"


# ---------------------------------------------------------------------- prune


def seqs(path: str) -> list[int]:
    return [row[0] for row in query(path, "SELECT seq FROM outbox ORDER BY seq")]


def test_prune_deletes_only_old_events_every_subscription_passed(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Seqs 1-4 are ten days old; the lowest position of any partition is 3.
    assert run(capsys, "prune", db, "--older-than", "7d") == (0, "pruned 3 events\n", "")
    assert seqs(db) == [4, 5, 6]
    assert run(capsys, "prune", db, "--older-than", "7d")[1] == "pruned 0 events\n"

    track(db, "orders", [6, 6])
    # Everything is passed now, but 5 and 6 are new.
    assert run(capsys, "prune", db, "--older-than", "12h")[1] == "pruned 1 events\n"
    assert seqs(db) == [5, 6]
    assert run(capsys, "prune", db, "--older-than", "0")[1] == "pruned 2 events\n"
    assert seqs(db) == []

    # Sequence numbers are never given out twice.
    assert add_events(db, 1) == [7]
    status = json.loads(run(capsys, "status", db, "--json")[1])
    assert (status["events"], status["first_seq"], status["head"]) == (1, 7, 7)


def test_prune_with_no_subscription_tracked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = new_db(tmp_path)
    add_events(path, 3, age=2 * 3600)
    add_events(path, 2)
    assert run(capsys, "prune", path, "--older-than", "30m")[1] == "pruned 3 events\n"
    assert seqs(path) == [4, 5]
    assert run(capsys, "prune", path, "--older-than=45s")[1] == "pruned 0 events\n"


def test_prune_of_an_empty_outbox(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "prune", new_db(tmp_path), "--older-than", "0") == (
        0,
        "pruned 0 events\n",
        "",
    )


# -------------------------------------------------------------- hostile input

COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["dead-letters"],
    ["dead-letters", "show", "1"],
    ["dead-letters", "replay", "1"],
    ["dead-letters", "purge"],
    ["prune", "--older-than", "0"],
]


def argv(command: list[str], path: str) -> list[str]:
    return [command[0], path, *command[1:]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_missing_database_is_never_created(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "nothing.db"
    assert failed(capsys, *argv(command, str(path))) == f"error: no database at {path}\n"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_no_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert failed(capsys, "status", str(tmp_path)) == f"error: no database at {tmp_path}\n"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_file_that_is_not_sqlite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "notes.db"
    content = b"these are my notes, not a database\n" * 100
    path.write_bytes(content)
    err = failed(capsys, *argv(command, str(path)))
    assert err.startswith(f"error: cannot read {path} as an SQLite database: ")
    assert path.read_bytes() == content
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_empty_file_is_not_an_actorbus_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    path = tmp_path / "empty.db"
    path.touch()
    err = failed(capsys, *argv(command, str(path)))
    assert err == f"error: {path} is not an actorbus database\n"
    assert path.read_bytes() == b""
    assert list(tmp_path.iterdir()) == [path]


def test_another_sqlite_database_is_not_an_actorbus_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = str(tmp_path / "other.db")
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE outbox (x)")
        conn.commit()
    assert failed(capsys, "status", other) == f"error: {other} is not an actorbus database\n"
    # The right version but a table missing.
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("PRAGMA user_version = 1")
    assert failed(capsys, "prune", other, "--older-than", "0") == (
        f"error: {other} is not an actorbus database\n"
    )


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_newer_schema_is_refused(
    db: str, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA user_version = 2")
    err = failed(capsys, *argv(command, db))
    assert err == (
        f"error: {db} has schema version 2, newer than this actorbus knows (1); upgrade actorbus\n"
    )
    assert query(db, "PRAGMA user_version") == [(2,)]
    assert len(seqs(db)) == 6
    assert query(db, "SELECT count(*) FROM dead_letters WHERE replay_requested = 0") == [(3,)]


@pytest.mark.parametrize(
    ("age", "message"),
    [
        ("7x", "an age is a number with an optional unit"),
        ("-1d", "an age must be a finite number >= 0, got '-1d'"),
        ("nan", "an age must be a finite number >= 0, got 'nan'"),
        ("inf", "an age must be a finite number >= 0, got 'inf'"),
        ("", "an age is a number with an optional unit s, m, h, d or w (like 7d), got ''"),
        ("d", "an age is a number"),
    ],
)
def test_bad_ages_are_usage_errors(
    db: str, capsys: pytest.CaptureFixture[str], age: str, message: str
) -> None:
    err = usage_error(capsys, "prune", db, f"--older-than={age}")
    assert f"argument --older-than: {message}" in err
    assert len(seqs(db)) == 6


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["status"],
        ["vacuum", "x.db"],
        ["prune", "x.db"],
        ["prune", "x.db", "--older-than", "-1d"],
        ["prune", "x.db", "--older-than", ""],
        ["dead-letters", "x.db", "show", "one"],
        ["dead-letters", "x.db", "replay", "1.5"],
        ["dead-letters", "x.db", "replay", "0"],
        ["dead-letters", "x.db", "show", "-3"],
        ["dead-letters", "x.db", "show", str(2**63)],
        ["dead-letters", "x.db", "--limit", str(2**64)],
        ["dead-letters", "x.db", "show"],
        ["dead-letters", "x.db", "replay"],
        ["dead-letters", "x.db", "purge", "1"],
        ["dead-letters", "x.db", "list", "1"],
        ["dead-letters", "x.db", "retry", "1"],
        ["dead-letters", "x.db", "--limit", "-1"],
        ["dead-letters", "x.db", "--limit", "many"],
        ["dead-letters", "x.db", "purge", "--limit", "3"],
        ["dead-letters", "x.db", "show", "1", "--subscriber", "orders"],
        ["dead-letters", "x.db", "purge", "--json"],
        ["status", "x.db", "--limit", "3"],
    ],
    ids=" ".join,
)
def test_bad_arguments_are_usage_errors(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    usage_error(capsys, *args)
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_say_what_is_wrong(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "dead-letters", db, "show", "one")
    assert "argument ID: an ID is an integer >= 1, got 'one'" in err
    err = usage_error(capsys, "dead-letters", db, "replay")
    assert "error: replay needs a dead letter ID" in err
    err = usage_error(capsys, "dead-letters", db, "--limit", "-1")
    assert "argument --limit: a limit is an integer >= 0, got '-1'" in err
    err = usage_error(capsys, "prune", db, "--older-than", "-1d")
    assert "argument --older-than: expected one argument" in err
    assert query(db, "SELECT count(*) FROM dead_letters WHERE replay_requested = 0") == [(3,)]


def test_forget_lets_prune_pass_a_retired_subscription(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # "orders" (lowest position 3) holds prune back; "stats" has passed everything.
    assert run(capsys, "prune", db, "--older-than", "7d")[1] == "pruned 3 events\n"
    code, out, err = run(capsys, "forget", db, "orders")
    assert (code, err) == (0, "")
    assert out.startswith("forgot subscription 'orders' (2 partition positions)")
    assert query(db, "SELECT DISTINCT subscriber FROM tracking") == [("stats",)]
    assert run(capsys, "prune", db, "--older-than", "7d")[1] == "pruned 1 events\n"
    assert seqs(db) == [5, 6]


def test_forget_of_an_unknown_subscription_fails(
    db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = failed(capsys, "forget", db, "nobody")
    assert err == f"error: no subscription named 'nobody' is tracked in {db}\n"
    assert len(query(db, "SELECT * FROM tracking")) == 3
    usage_error(capsys, "forget", db)


# ------------------------------------------- text from the database or the disk

# What a handler's error, a subscriber name or a file name may hold to take over the
# operator's terminal: colour, a carriage return that overwrites the line, "erase line",
# C1 CSI (0x9b), DEL, a right-to-left override, a NUL.
HOSTILE_ERROR = "ValueError: \x1b[31mred\x1b[0m\rspoofed \x1b[2K\x9b31m \x7f\u202eevil\x00\nline 2"
HOSTILE_NAME = "orders\x1b]0;title\x07\r\u2028x"
UNSAFE = {chr(c) for c in [*range(0x20), *range(0x7F, 0xA0), 0x202E, 0x2028]}


def controls(text: str, *, keep_newlines: bool = True) -> set[str]:
    return {c for c in text if c in UNSAFE and not (keep_newlines and c == "\n")}


@pytest.fixture
def hostile(tmp_path: Path) -> str:
    path = new_db(tmp_path)
    add_letter(
        path,
        letter(
            1,
            HOSTILE_NAME,
            message="payload \x1b[0m\r",
            reason="failed",
            error=HOSTILE_ERROR,
            traceback=(
                "Traceback (most recent call last):\n  \x1b[31mFile x\r\nValueError: \x1b[0m\n"
            ),
            attempts=3,
            at=AT,
        ),
    )
    track(path, HOSTILE_NAME, [0])
    return path


def test_list_escapes_control_characters_and_keeps_one_line_per_letter(
    hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "dead-letters", hostile)
    assert (code, err) == (0, "")
    assert controls(out) == set()
    _, row = out.splitlines()
    assert row.split()[:3] == ["1", "orders\\x1b]0;title\\x07\\r\\u2028x", "failed"]
    # The first line of the error, as written, with every control character visible.
    assert row.endswith(
        "ValueError: \\x1b[31mred\\x1b[0m\\rspoofed \\x1b[2K\\x9b31m \\x7f\\u202eevil\\x00"
    )


def test_show_escapes_control_characters_but_keeps_the_lines_of_error_and_traceback(
    hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "dead-letters", hostile, "show", "1")
    assert (code, err) == (0, "")
    assert controls(out) == set()
    lines = out.splitlines()
    assert "subscriber  orders\\x1b]0;title\\x07\\r\\u2028x" in lines
    assert (
        "error       ValueError: \\x1b[31mred\\x1b[0m\\rspoofed \\x1b[2K\\x9b31m"
        " \\x7f\\u202eevil\\x00"
    ) in lines
    assert "            line 2" in lines
    assert "message     'payload \\x1b[0m\\r'" in lines
    assert lines[-3:] == [
        "Traceback (most recent call last):",
        "  \\x1b[31mFile x\\r",
        "ValueError: \\x1b[0m",
    ]


@pytest.mark.parametrize("action", [["list"], ["show", "1"]], ids=" ".join)
def test_json_escapes_every_control_character_and_keeps_the_text(
    hostile: str, capsys: pytest.CaptureFixture[str], action: list[str]
) -> None:
    code, out, err = run(capsys, "dead-letters", hostile, *action, "--json")
    assert (code, err) == (0, "")
    assert controls(out, keep_newlines=False) == {"\n"}
    assert out.count("\n") == 1  # the one print() ends
    data = json.loads(out)
    shown = data[0] if isinstance(data, list) else data
    assert (shown["actor"], shown["error"]) == (HOSTILE_NAME, HOSTILE_ERROR)
    assert shown["message"] == "payload \x1b[0m\r"


def test_status_escapes_subscriber_names_and_the_path(
    tmp_path: Path, hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "shop\x1b[31m\nred.db"
    Path(hostile).rename(odd)
    code, out, err = run(capsys, "status", str(odd))
    assert (code, err) == (0, "")
    assert controls(out) == set()
    lines = out.splitlines()
    assert f"database        {tmp_path}/shop\\x1b[31m\\nred.db" in lines
    assert ["orders\\x1b]0;title\\x07\\r\\u2028x", "subscription", "1", "0", "0", "1"] in [
        line.split() for line in lines
    ]


def test_an_error_naming_a_path_with_a_newline_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = failed(capsys, "status", "a\nb.db")
    assert err == "error: no database at a\\nb.db\n"
    odd = tmp_path / "not\x1b[2Ja database\n.db"
    odd.write_bytes(b"plain text, not SQLite\n" * 50)
    err = failed(capsys, "dead-letters", str(odd))
    assert err.startswith(f"error: cannot read {tmp_path}/not\\x1b[2Ja database\\n.db as an ")
    assert controls(err) == set()


def test_an_sqlite_error_naming_a_hostile_path_is_one_line(
    tmp_path: Path, hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    odd = tmp_path / "app\r\n.db"
    Path(hostile).rename(odd)
    with closing(sqlite3.connect(odd)) as conn:
        conn.execute("ALTER TABLE dead_letters DROP COLUMN replay_requested")
        conn.commit()
    err = failed(capsys, "dead-letters", str(odd), "replay", "1")
    assert err == f"error: {tmp_path}/app\\r\\n.db: no such column: replay_requested\n"


def test_forget_and_usage_errors_escape_what_they_echo(
    hostile: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = failed(capsys, "forget", hostile, "gone\x1b[31m\n")
    assert err == f"error: no subscription named 'gone\\x1b[31m\\n' is tracked in {hostile}\n"
    code, out, err = run(capsys, "forget", hostile, HOSTILE_NAME)
    assert (code, err) == (0, "")
    assert out.startswith("forgot subscription 'orders\\x1b]0;title\\x07\\r\\u2028x' (1 ")
    err = usage_error(capsys, "status", hostile, "--colour=\x1b[31m\r")
    assert "unrecognized arguments: --colour=\\x1b[31m\\r" in err
    assert controls(err) == set()


def test_a_real_process_prints_no_control_characters(hostile: str, tmp_path: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "engine", *args],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
            check=False,
        )

    listed = cli("dead-letters", hostile)
    assert (listed.returncode, listed.stderr) == (0, b"")
    assert b"\x1b" not in listed.stdout
    assert b"\r" not in listed.stdout
    assert b"\xc2\x9b" not in listed.stdout  # U+009B in UTF-8
    assert b"\\x1b[31mred" in listed.stdout
    assert listed.stdout.count(b"\n") == 2

    missing = cli("status", str(tmp_path / "a\nb.db"))
    assert missing.returncode == 1
    assert missing.stdout == b""
    assert missing.stderr == f"error: no database at {tmp_path}/a\\nb.db\n".encode()
