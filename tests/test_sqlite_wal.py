"""SQLite files in WAL mode opened while another process writes: the event log and the state store wait."""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import pytest

from m2rec.events.log import Event, EventLog
from m2rec.serving.state_store import SQLiteStateStore


def _write_event(path: Path) -> None:
    log = EventLog(f"sqlite:///{path}")
    assert log.append([Event("u", "i", datetime(2026, 1, 1, tzinfo=timezone.utc), "e1")])[0].event.seq == 1


def _write_state(path: Path) -> None:
    store = SQLiteStateStore(path)
    store.put_many("scope", {"u": b"state"})
    assert store.get_many("scope", ["u"]) == {"u": b"state"}


@pytest.mark.parametrize("open_and_write", [_write_event, _write_state], ids=["event_log", "state_store"])
def test_a_new_file_opened_while_another_writer_holds_it_waits_instead_of_failing(
        tmp_path: Path, open_and_write: Callable[[Path], None]):
    """Switching a new file to WAL meets "database is locked" at once, without SQLite's busy wait, while another
    connection holds the write lock (two workers starting together); opening waits for the lock instead."""
    path = tmp_path / "store.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # still in rollback mode
    other.execute("CREATE TABLE other_writer (x)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO other_writer VALUES (1)")
    threading.Timer(0.5, lambda: other.execute("COMMIT")).start()
    open_and_write(path)  # raised sqlite3.OperationalError: database is locked
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)
