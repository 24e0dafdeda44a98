"""Where users' recurrent states live, shared by every worker and replica: a SQLite file beside the feature build
(default, one machine) or Redis (when the build's online store is Redis).

A state is stored under (scope, user), the scope naming the model version and its feature build, so a version
never reads another's states. Each record carries the event `seq` it reflects; whoever reads it checks that seq
against the event log (`m2rec.serving.recurrent`), so a lost, late or overwritten write costs a rebuild, never a
wrong answer. Writes are last-writer-wins.
"""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping, Sequence

import numpy as np
import torch

from m2rec.model.base import RecurrentState
from m2rec.utils.sqlite_wal import connect_wal

StatePrecision = Literal["float32", "float16"]  # how stored states are encoded (serving.state_precision)

HEADER = struct.Struct("<qq")  # seq, then the byte length of the tensors that follow
STATES_FILE = "recurrent_states.db"  # in the feature build's data folder
WIRE_DTYPES = {torch.float32: np.dtype(np.float32), torch.float16: np.dtype(np.float16),
               torch.int32: np.dtype(np.int32)}


@dataclass(frozen=True)
class StoredState:
    """A user's state (batch 1) and the highest event seq it reflects (the build's cutoff when no event)."""

    seq: int
    state: RecurrentState


class StateCodec:
    """Packs a state into bytes: a 16-byte header, then each tensor's raw values in the template's order (float
    tensors in `float_dtype`, integer ones as int32); names and shapes come from the model, not the record."""

    def __init__(self, template: RecurrentState, float_dtype: torch.dtype = torch.float32):
        self.layout = [(name, tuple(t.shape[1:]), t.dtype, float_dtype if t.is_floating_point() else torch.int32)
                       for name, t in sorted(template.items())]
        self.nbytes = sum(int(np.prod(shape, dtype=np.int64)) * WIRE_DTYPES[wire].itemsize
                          for _, shape, _, wire in self.layout)  # of one record's tensors (the header adds 16)

    def encode(self, stored: StoredState) -> bytes:
        body = b"".join(stored.state[name].detach().to(wire).contiguous().cpu().numpy().tobytes()
                        for name, _, _, wire in self.layout)
        return HEADER.pack(stored.seq, len(body)) + body

    def decode(self, data: bytes) -> StoredState | None:
        """The stored state, or None for a record of another layout (e.g. written by another precision)."""
        if len(data) != HEADER.size + self.nbytes or HEADER.unpack_from(data)[1] != self.nbytes:
            return None
        seq = HEADER.unpack_from(data)[0]
        state, offset = {}, HEADER.size
        for name, shape, dtype, wire in self.layout:
            values = np.frombuffer(data, WIRE_DTYPES[wire], int(np.prod(shape, dtype=np.int64)), offset)
            state[name] = torch.from_numpy(values.copy()).to(dtype).view(1, *shape)
            offset += values.nbytes
        return StoredState(seq, state)


class StateStore:
    """Encoded states by (scope, user)."""

    def get_many(self, scope: str, users: Sequence[str]) -> dict[str, bytes]:
        raise NotImplementedError

    def put_many(self, scope: str, records: Mapping[str, bytes]) -> None:
        raise NotImplementedError

    def retain(self, scopes: Sequence[str]) -> int:
        """Drop the states of every scope but `scopes` (retired versions); returns how many were dropped."""
        raise NotImplementedError


class SQLiteStateStore(StateStore):
    """One SQLite file (WAL), a connection per thread and process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._local = threading.local()
        self._connection().execute("CREATE TABLE IF NOT EXISTS m2rec_states (scope TEXT NOT NULL, user_id TEXT NOT "
                                   "NULL, state BLOB NOT NULL, PRIMARY KEY (scope, user_id)) WITHOUT ROWID")

    def _connection(self) -> sqlite3.Connection:
        connection = getattr(self._local, "connection", None)
        if connection is None or self._local.pid != os.getpid():
            connection = connect_wal(self.path, "NORMAL")  # a state lost in a crash is rebuilt from the log
            self._local.connection, self._local.pid = connection, os.getpid()
        return connection

    def get_many(self, scope: str, users: Sequence[str]) -> dict[str, bytes]:
        users = sorted(set(users))
        if not users:
            return {}
        rows = self._connection().execute(
            f"SELECT user_id, state FROM m2rec_states WHERE scope = ? AND user_id IN ({', '.join('?' * len(users))})",
            (scope, *users)).fetchall()
        return {user: bytes(state) for user, state in rows}

    def put_many(self, scope: str, records: Mapping[str, bytes]) -> None:
        if records:
            self._connection().executemany("INSERT OR REPLACE INTO m2rec_states VALUES (?, ?, ?)",
                                           [(scope, user, state) for user, state in records.items()])

    def retain(self, scopes: Sequence[str]) -> int:
        marks = ", ".join("?" * len(scopes))
        return self._connection().execute(f"DELETE FROM m2rec_states WHERE scope NOT IN ({marks})",
                                          tuple(scopes)).rowcount


class RedisStateStore(StateStore):
    """Redis keys `m2rec:state:{scope}:{user}`, each expiring `ttl_s` after its last write (None: never), so
    states of retired versions and idle users go away by themselves."""

    def __init__(self, connection_string: str, ttl_s: int | None = 30 * 86_400):
        import redis

        host, _, rest = connection_string.partition(",")  # Feast's form: "host:port[,password=...,db=...]"
        hostname, _, port = host.partition(":")
        options = dict(part.split("=", 1) for part in rest.split(",") if "=" in part)
        self.client = redis.Redis(host=hostname or "127.0.0.1", port=int(port or 6379),
                                  password=options.get("password"), db=int(options.get("db", 0)))
        self.ttl_s = ttl_s

    @staticmethod
    def key(scope: str, user: str) -> str:
        return f"m2rec:state:{scope}:{user}"

    def get_many(self, scope: str, users: Sequence[str]) -> dict[str, bytes]:
        users = sorted(set(users))
        if not users:
            return {}
        values = self.client.mget([self.key(scope, user) for user in users])
        return {user: value for user, value in zip(users, values) if value is not None}

    def put_many(self, scope: str, records: Mapping[str, bytes]) -> None:
        if records:
            pipeline = self.client.pipeline(transaction=False)
            for user, state in records.items():
                pipeline.set(self.key(scope, user), state, ex=self.ttl_s)
            pipeline.execute()

    def retain(self, scopes: Sequence[str]) -> int:
        return 0  # every key expires ttl_s after its last write: retired versions' states go by themselves


def open_state_store(repo_dir: str | Path, online_store) -> StateStore:
    """The store beside a feature build: Redis where its online store (Feast config) is Redis, else a SQLite file
    in its data folder."""
    from m2rec.features.repo import DATA_FOLDER

    if getattr(online_store, "type", None) == "redis":
        return RedisStateStore(online_store.connection_string)
    return SQLiteStateStore(Path(repo_dir) / DATA_FOLDER / STATES_FILE)
