"""SQLite connections in WAL mode that several processes may open at once."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Literal


def connect_wal(path: Path, synchronous: Literal["FULL", "NORMAL"], busy_timeout_s: float = 30.0
                ) -> sqlite3.Connection:
    """An autocommit connection to `path` in WAL mode with the given `synchronous` level, waiting up to
    `busy_timeout_s` for other writers.

    On a file not yet in WAL mode (a new one), SQLite answers "database is locked" at once, without its busy wait,
    while another connection holds the write lock (two processes opening a new file together), so the switch to
    WAL is retried until the timeout."""
    connection = sqlite3.connect(path, timeout=busy_timeout_s, isolation_level=None)
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            connection.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) or time.monotonic() > deadline:
                connection.close()
                raise
            time.sleep(0.01)
    connection.execute(f"PRAGMA synchronous={synchronous}")
    return connection
