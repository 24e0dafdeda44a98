"""A durable, append-only log of served events and added items in SQLite (default, one machine) or PostgreSQL
(replicas).

Guarantees, for every backend:
- durable before the reply: `append` returns only after its transaction committed (SQLite: WAL with
  `synchronous=FULL`);
- applied once: an event is identified by its `event_id`, and an event without one by (user, item, time); a
  retried append of the same event returns the stored one instead of a second row;
- one order: `seq` grows in commit order (SQLite: one writer at a time; PostgreSQL: a cutoff is read under a table
  lock that waits for writers in flight), so "every event with seq <= cutoff" is a clean cut for retraining and
  "seq > a build's cutoff" is exactly what that build has not seen;
- per-user serialization: `append`'s `before_commit` hook runs with the affected users locked, so a derived value
  written there (a user's online sequence) is never overwritten by a stale one;
- items (`add_item`): durable before the reply, one row per item id (a second add of an id, from any worker, is
  refused), `seq` growing in commit order like events', so a worker reads what it has not seen with `items_after`.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Sequence
from urllib.parse import urlsplit

import pandas as pd

from m2rec.errors import DataError, ExternalServiceError
from m2rec.utils.sqlite_wal import connect_wal

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS m2rec_events (
    seq {serial} PRIMARY KEY,
    event_id TEXT NOT NULL UNIQUE,
    user_id TEXT NOT NULL,
    item_id TEXT NOT NULL,
    event_time_us BIGINT NOT NULL,
    received_time_us BIGINT NOT NULL,
    UNIQUE (user_id, item_id, event_time_us)
)"""
USER_INDEX = "CREATE INDEX IF NOT EXISTS m2rec_events_user_seq ON m2rec_events (user_id, seq)"
COLUMNS = "seq, event_id, user_id, item_id, event_time_us, received_time_us"
ITEMS_SCHEMA = """
CREATE TABLE IF NOT EXISTS m2rec_items (
    seq {serial} PRIMARY KEY,
    item_id TEXT NOT NULL UNIQUE,
    text TEXT NOT NULL,
    title TEXT NOT NULL,
    added_time_us BIGINT NOT NULL
)"""
ITEM_COLUMNS = "seq, item_id, text, title, added_time_us"


@dataclass
class EventParams:
    """Where served events are logged and which event times are accepted (params.yaml section `events`)."""

    url: str | None = None  # None: sqlite:///WORKDIR/events.db for local runs; postgresql://USER@HOST/DB for replicas
    late_window_s: float = 7 * 86_400.0  # events up to this much older than now are accepted and placed in order
    future_skew_s: float = 300.0  # clock skew allowed for event times after now


@dataclass(frozen=True)
class Event:
    """One interaction as a client sent it; `event_id` None means (user, item, time) identifies it."""

    user_id: str
    item_id: str
    timestamp: datetime  # timezone-aware
    event_id: str | None = None


@dataclass(frozen=True)
class LoggedEvent:
    """An event as stored: its position in the log and its times."""

    seq: int
    event_id: str
    user_id: str
    item_id: str
    timestamp: datetime
    received: datetime


@dataclass(frozen=True)
class Appended:
    """What `append` did with one event: stored it now, or found it stored already (a retry)."""

    event: LoggedEvent
    duplicate: bool


@dataclass(frozen=True)
class LoggedItem:
    """An item added while serving, as stored."""

    seq: int
    item_id: str
    text: str
    title: str
    added: datetime


Tail = Callable[[Sequence[str], int], dict[str, list[LoggedEvent]]]
BeforeCommit = Callable[[list[Appended], Tail], None]


class EventConflict(DataError):
    """An `event_id` already names a different event."""


class ItemConflict(DataError):
    """An item id is in the log already."""


def public_url(url: str) -> str:
    """`url` without a password, for logs and lineage."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def _micros(when: datetime) -> int:
    when = when if when.tzinfo else when.replace(tzinfo=timezone.utc)
    delta = when - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _datetime(micros: int) -> datetime:
    return datetime.fromtimestamp(micros // 1_000_000, timezone.utc).replace(microsecond=micros % 1_000_000)


def _logged(row: Sequence) -> LoggedEvent:
    seq, event_id, user_id, item_id, event_us, received_us = row
    return LoggedEvent(int(seq), event_id, user_id, item_id, _datetime(int(event_us)), _datetime(int(received_us)))


def _logged_item(row: Sequence) -> LoggedItem:
    seq, item_id, text, title, added_us = row
    return LoggedItem(int(seq), item_id, text, title, _datetime(int(added_us)))


class EventLog:
    """The log at `url`: `sqlite:///PATH` (a file; relative to the working folder) or `postgresql://...`
    (credentials from the environment, e.g. PGPASSWORD, never in the URL that settings carry)."""

    def __init__(self, url: str):
        self.url = url
        if url.startswith("sqlite:///"):
            self._backend: _Backend = _SQLite(Path(url.removeprefix("sqlite:///")))
        elif url.startswith(("postgresql://", "postgres://")):
            self._backend = _Postgres(url)
        else:
            raise DataError(f"events.url={url!r} is not a supported event log",
                            "use sqlite:///PATH (one machine) or postgresql://USER@HOST:PORT/DB (replicas)")
        with self._backend.transaction(schema=True) as cursor:
            self._backend.create(cursor)

    def __repr__(self) -> str:
        return f"EventLog({self.url!r})"

    def append(self, events: Sequence[Event], before_commit: BeforeCommit | None = None) -> list[Appended]:
        """Store `events` in one transaction (all or none) and return one `Appended` each, in order.

        `before_commit(results, tail)` runs inside the transaction with the events' users locked, `tail` reading
        the log as the transaction sees it (`EventLog.tail`'s signature); if it raises, nothing is stored. An
        `event_id` that names a stored event with other content raises `EventConflict`."""
        now = _micros(datetime.now(timezone.utc))
        with self._backend.transaction(lock_users=sorted({e.user_id for e in events})) as cursor:
            results = [self._append_one(cursor, event, now) for event in events]
            if before_commit is not None:
                before_commit(results, lambda users, after_seq: self._tail(cursor, users, after_seq))
        return results

    def _append_one(self, cursor, event: Event, now: int) -> Appended:
        when = _micros(event.timestamp)
        found = self._find(cursor, event.event_id, event.user_id, event.item_id, when)
        if found is not None:
            same = (found.user_id, found.item_id, _micros(found.timestamp)) == (event.user_id, event.item_id, when)
            if event.event_id is not None and found.event_id == event.event_id and not same:
                raise EventConflict(
                    f"event_id {event.event_id!r} was already used for user {found.user_id!r}, item "
                    f"{found.item_id!r} at {found.timestamp.isoformat()}",
                    "send a new event_id for a new event; reuse one only to retry the same event")
            return Appended(found, duplicate=True)
        event_id = event.event_id or f"auto-{uuid.uuid4().hex}"
        cursor.execute(self._backend.sql(
            f"INSERT INTO m2rec_events (event_id, user_id, item_id, event_time_us, received_time_us) "
            f"VALUES (?, ?, ?, ?, ?) RETURNING {COLUMNS}"), (event_id, event.user_id, event.item_id, when, now))
        return Appended(_logged(cursor.fetchone()), duplicate=False)

    def _find(self, cursor, event_id: str | None, user_id: str, item_id: str, when: int) -> LoggedEvent | None:
        if event_id is not None:
            cursor.execute(self._backend.sql(f"SELECT {COLUMNS} FROM m2rec_events WHERE event_id = ?"), (event_id,))
            row = cursor.fetchone()
            if row is not None:
                return _logged(row)
        cursor.execute(self._backend.sql(
            f"SELECT {COLUMNS} FROM m2rec_events WHERE user_id = ? AND item_id = ? AND event_time_us = ?"),
            (user_id, item_id, when))
        row = cursor.fetchone()
        return None if row is None else _logged(row)

    def with_users_locked(self, user_ids: Sequence[str], work: Callable[[Tail], object]) -> None:
        """Run `work(tail)` with `user_ids` locked as `append` locks them, so no event of theirs commits meanwhile."""
        with self._backend.transaction(lock_users=sorted(set(user_ids))) as cursor:
            work(lambda users, after_seq: self._tail(cursor, users, after_seq))

    def tail(self, user_ids: Sequence[str], after_seq: int) -> dict[str, list[LoggedEvent]]:
        """Each user's events with seq > `after_seq`, in time order (then log order); users without any are
        left out."""
        if not user_ids:
            return {}
        with self._backend.transaction() as cursor:
            return self._tail(cursor, user_ids, after_seq)

    def _tail(self, cursor, user_ids: Sequence[str], after_seq: int) -> dict[str, list[LoggedEvent]]:
        users = sorted(set(user_ids))
        marks = ", ".join("?" * len(users))
        cursor.execute(self._backend.sql(
            f"SELECT {COLUMNS} FROM m2rec_events WHERE seq > ? AND user_id IN ({marks}) "
            "ORDER BY user_id, event_time_us, seq"), (after_seq, *users))
        rows = cursor.fetchall()
        tails: dict[str, list[LoggedEvent]] = {}
        for row in rows:
            event = _logged(row)
            tails.setdefault(event.user_id, []).append(event)
        return tails

    def users_after(self, after_seq: int) -> list[str]:
        """Users with at least one event with seq > `after_seq`."""
        with self._backend.transaction() as cursor:
            cursor.execute(self._backend.sql("SELECT DISTINCT user_id FROM m2rec_events WHERE seq > ?"),
                           (after_seq,))
            return sorted(row[0] for row in cursor.fetchall())

    def cutoff(self) -> int:
        """The highest seq such that every event up to it has committed (0 for an empty log)."""
        with self._backend.transaction(quiesce=True) as cursor:
            cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM m2rec_events")
            return int(cursor.fetchone()[0])

    def read(self, through_seq: int) -> pd.DataFrame:
        """Every event with seq <= `through_seq` as a table: seq, event_id, user_id, item_id, timestamp (UTC)."""
        with self._backend.transaction() as cursor:
            cursor.execute(self._backend.sql(f"SELECT {COLUMNS} FROM m2rec_events WHERE seq <= ? ORDER BY seq"),
                           (through_seq,))
            rows = cursor.fetchall()
        frame = pd.DataFrame(rows, columns=COLUMNS.split(", "))
        return pd.DataFrame({
            "seq": frame["seq"].astype("int64"), "event_id": frame["event_id"].astype(str),
            "user_id": frame["user_id"].astype(str), "item_id": frame["item_id"].astype(str),
            "timestamp": pd.to_datetime(frame["event_time_us"].astype("int64"), unit="us", utc=True),
        })

    def add_item(self, item_id: str, text: str, title: str) -> LoggedItem:
        """Store a new item (committed before this returns); an id the log holds already raises `ItemConflict`,
        also when two workers add it at once."""
        now = _micros(datetime.now(timezone.utc))
        with self._backend.transaction() as cursor:
            self._backend.lock_items(cursor)
            cursor.execute(self._backend.sql(
                f"INSERT INTO m2rec_items (item_id, text, title, added_time_us) VALUES (?, ?, ?, ?) "
                f"ON CONFLICT (item_id) DO NOTHING RETURNING {ITEM_COLUMNS}"), (item_id, text, title, now))
            row = cursor.fetchone()
        if row is None:
            raise ItemConflict(f"item_id {item_id!r} was added already", "add each new item once, with a new id")
        return _logged_item(row)

    def items_after(self, after_seq: int) -> list[LoggedItem]:
        """Items added with seq > `after_seq`, in seq order (`items_after(0)`: every added item)."""
        with self._backend.transaction() as cursor:
            cursor.execute(self._backend.sql(f"SELECT {ITEM_COLUMNS} FROM m2rec_items WHERE seq > ? ORDER BY seq"),
                           (after_seq,))
            return [_logged_item(row) for row in cursor.fetchall()]


class _Backend:
    """One database behind the log; a connection per thread and process (neither sqlite3 nor psycopg2 connections
    may be shared across threads in a transaction, nor across a fork)."""

    serial = "INTEGER"

    def __init__(self) -> None:
        self._local = threading.local()

    def _open(self):
        raise NotImplementedError

    def _connection(self):
        connection = getattr(self._local, "connection", None)
        if connection is None or getattr(connection, "closed", False) or self._local.pid != os.getpid():
            connection = self._open()
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def sql(self, text: str) -> str:
        return text

    def create(self, cursor) -> None:
        cursor.execute(SCHEMA.format(serial=self.serial))
        cursor.execute(USER_INDEX)
        cursor.execute(ITEMS_SCHEMA.format(serial=self.serial))

    def lock_items(self, cursor) -> None:
        """Serialize item inserts so that their seq follows commit order (SQLite's writer lock does already)."""

    @contextmanager
    def transaction(self, lock_users: Sequence[str] = (), quiesce: bool = False, schema: bool = False
                    ) -> Iterator:
        """A transaction's cursor: `lock_users` locked for writing, `quiesce` waiting for writers in flight,
        `schema` for creating the table."""
        raise NotImplementedError


class _SQLite(_Backend):
    """One file; a writer holds the database's write lock (BEGIN IMMEDIATE) for its whole transaction, which
    serializes writers across threads and processes and makes seq follow commit order."""

    serial = "INTEGER"  # an INTEGER PRIMARY KEY is the rowid: assigned under the write lock

    def __init__(self, path: Path):
        super().__init__()
        self.path = path.expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _open(self) -> sqlite3.Connection:
        return connect_wal(self.path, "FULL")  # FULL: a commit reaches the disk before append returns

    @contextmanager
    def transaction(self, lock_users: Sequence[str] = (), quiesce: bool = False, schema: bool = False
                    ) -> Iterator:
        connection = self._connection()
        cursor = connection.cursor()
        cursor.execute("BEGIN IMMEDIATE" if lock_users or quiesce or schema else "BEGIN")
        try:
            yield cursor
            cursor.execute("COMMIT")
        except BaseException:
            if connection.in_transaction:  # the work or the commit failed: nothing of it is kept
                cursor.execute("ROLLBACK")
            raise


class _Postgres(_Backend):
    """PostgreSQL through psycopg2; writers take a transaction-scoped advisory lock per user, and `cutoff` takes a
    SHARE lock on the table, which waits for every insert in flight, so no lower seq can commit after it."""

    serial = "BIGSERIAL"

    def __init__(self, url: str):
        super().__init__()
        self.url = url

    def sql(self, text: str) -> str:
        return text.replace("?", "%s")

    def lock_items(self, cursor) -> None:
        cursor.execute("LOCK TABLE m2rec_items IN EXCLUSIVE MODE")  # readers (ACCESS SHARE) still read

    def _open(self):
        import psycopg2

        try:
            return psycopg2.connect(self.url)
        except psycopg2.OperationalError as err:
            raise ExternalServiceError(f"the event log at {public_url(self.url)} cannot be reached "
                                       f"({str(err).strip()})", "check events.url and that PostgreSQL runs; the "
                                       "password comes from PGPASSWORD or ~/.pgpass") from None

    @contextmanager
    def transaction(self, lock_users: Sequence[str] = (), quiesce: bool = False, schema: bool = False
                    ) -> Iterator:
        connection = self._connection()
        try:
            with connection:  # commit on success, roll back on error
                with connection.cursor() as cursor:
                    if schema:  # two processes creating the table at once would collide
                        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended('m2rec_events', 0))")
                    if quiesce:
                        cursor.execute("LOCK TABLE m2rec_events IN SHARE MODE")
                    for user in lock_users:  # sorted by the caller: no deadlock between two writers
                        cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 1))", (user,))
                    yield cursor
        except BaseException:
            if connection.closed:  # a broken connection: the next transaction opens a new one
                self._local.connection = None
            raise
