"""Recurrent serving: a state carried one item at a time equals re-encoding the history, and the state stores
(SQLite, Redis) give back what they were given, under the version that wrote it only."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import torch
from conftest import REDIS_HOST, REDIS_PORT, kill_after_acks, redis_reachable

from m2rec.model.config import PAPER_DESIGN, ModelParams
from m2rec.model.factory import build_model
from m2rec.serving.state_store import RedisStateStore, SQLiteStateStore, StateCodec, StoredState

NUM_ITEMS, MAX_LENGTH = 60, 32
RECURRENT = {
    "m2rec": ("m2rec", {**PAPER_DESIGN, "num_layers": 2}),  # two scales, frequency and text branches, learned gate
    "m2rec_default": ("m2rec", {}),  # one scale, the sequence branches read each history item's text
    "mamba4rec": ("mamba4rec", {"num_layers": 2}),
}
TOLERANCE = 1e-4  # float32: carried and re-encoded hidden states differ by rounding only


def make(name: str) -> torch.nn.Module:
    model_type, overrides = RECURRENT[name]
    torch.manual_seed(0)
    text = torch.randn(NUM_ITEMS + 1, 12)
    text[0] = 0
    params = ModelParams(hidden_size=16, d_state=8, max_length=MAX_LENGTH, **overrides)
    return build_model(model_type, NUM_ITEMS, params, text).eval()


def reencoded(model, history: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Hidden (1, H) and gates of the full encoding at the history's last position."""
    hidden, gates = model.encode_with_gates(history.unsqueeze(0), torch.tensor([len(history)]))
    return hidden.squeeze(1), None if gates is None else gates.squeeze(1)


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_single_steps_from_empty_equal_reencoding_at_every_length(name):
    model = make(name)
    history = torch.randint(1, NUM_ITEMS + 1, (MAX_LENGTH,))
    state = model.init_state(1)
    for t in range(MAX_LENGTH):
        hidden, gates, state = model.step(history[t:t + 1], state)
        expected, expected_gates = reencoded(model, history[:t + 1])
        assert torch.allclose(hidden, expected, atol=TOLERANCE), (t, (hidden - expected).abs().max())
        if expected_gates is not None:
            assert torch.allclose(gates, expected_gates, atol=TOLERANCE)
    assert int(state["length"]) == MAX_LENGTH
    assert state["window"][0].tolist() == history.tolist()


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_a_rebuilt_state_carried_over_many_steps_equals_reencoding(name):
    model = make(name)
    torch.manual_seed(2)
    histories = torch.randint(1, NUM_ITEMS + 1, (3, MAX_LENGTH))
    lengths = torch.tensor([4, 9, 1])
    rebuilt = [model.state_from_history(h[:n]) for h, n in zip(histories, lengths)]
    state = {key: torch.cat([s[key] for s in rebuilt]) for key in rebuilt[0]}  # one batch of three users
    for offset in range(MAX_LENGTH - 9):  # a batch of users, each one item at a time
        hidden, _, state = model.step(histories[torch.arange(3), lengths + offset], state)
    expected = torch.cat([reencoded(model, h[:n + MAX_LENGTH - 9])[0] for h, n in zip(histories, lengths)])
    assert torch.allclose(hidden, expected, atol=TOLERANCE)
    assert torch.equal(state["hidden"], hidden)


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_past_max_length_the_state_keeps_the_whole_history(name):
    model = make(name)
    history = torch.randint(1, NUM_ITEMS + 1, (3 * MAX_LENGTH,))
    state = model.state_from_history(history[:MAX_LENGTH + 5])
    for t in range(MAX_LENGTH + 5, len(history)):
        model.step(history[t:t + 1], state)
    whole = model.state_from_history(history)
    for key, value in whole.items():
        assert torch.allclose(state[key].to(value.dtype), value, atol=TOLERANCE), key
    assert state["window"][0].tolist() == history[-MAX_LENGTH:].tolist()


@pytest.mark.parametrize("name", RECURRENT)
@torch.no_grad()
def test_codec_round_trip_is_exact_in_float32_and_close_in_float16(name):
    model = make(name)
    state = model.state_from_history(torch.randint(1, NUM_ITEMS + 1, (MAX_LENGTH + 3,)))
    exact = StateCodec(model.init_state(1))
    data = exact.encode(StoredState(17, state))
    assert len(data) == exact.nbytes + 16
    decoded = exact.decode(data)
    assert decoded.seq == 17 and decoded.state.keys() == state.keys()
    assert all(torch.equal(decoded.state[k], state[k]) for k in state)

    half = StateCodec(model.init_state(1), torch.float16)
    assert half.nbytes < exact.nbytes
    decoded = half.decode(half.encode(StoredState(17, state)))
    assert torch.allclose(decoded.state["hidden"], state["hidden"], atol=1e-2)
    assert torch.equal(decoded.state["window"], state["window"])
    assert half.decode(data) is None  # a record of another layout is not misread


@torch.no_grad()
def test_float16_states_stay_close_over_many_steps():
    """What the float16 precision costs: states rounded at every event drift, but stay within 1e-2 of exact."""
    model = make("m2rec")
    codec = StateCodec(model.init_state(1), torch.float16)
    history = torch.randint(1, NUM_ITEMS + 1, (4 * MAX_LENGTH,))
    stored = codec.decode(codec.encode(StoredState(0, model.state_from_history(history[:1]))))
    for t in range(1, len(history)):
        model.step(history[t:t + 1], stored.state)
        stored = codec.decode(codec.encode(StoredState(t, stored.state)))
    exact = model.state_from_history(history)["hidden"]
    assert (stored.state["hidden"] - exact).abs().max() < 1e-2


def check_store(store) -> None:
    scope_v1, scope_v2 = f"m2rec v1@{uuid.uuid4().hex}", f"m2rec v2@{uuid.uuid4().hex}"
    store.put_many(scope_v1, {"u1": b"one", "u2": b"two"})
    store.put_many(scope_v1, {"u1": b"ONE"})
    assert store.get_many(scope_v1, ["u1", "u2", "u3"]) == {"u1": b"ONE", "u2": b"two"}
    assert store.get_many(scope_v2, ["u1", "u2"]) == {}  # another version never sees these
    assert store.get_many(scope_v1, []) == {}
    store.put_many(scope_v2, {"u1": b"v2"})
    store.retain([scope_v2])
    assert store.get_many(scope_v2, ["u1"]) == {"u1": b"v2"}


def test_sqlite_store_drops_retired_versions_states(tmp_path):
    store = SQLiteStateStore(tmp_path / "states.db")
    for version in ("v1", "v2", "v3"):
        store.put_many(version, {"u1": version.encode(), "u2": version.encode()})
    assert store.retain(["v3", "v2"]) == 2
    assert store.get_many("v1", ["u1", "u2"]) == {} and store.get_many("v2", ["u1"]) == {"u1": b"v2"}


def test_sqlite_state_store(tmp_path):
    check_store(SQLiteStateStore(tmp_path / "states.db"))


STATE_WRITER = """
import os, sys, time
from m2rec.serving.state_store import SQLiteStateStore
path, name, start, count, acks, go = sys.argv[1:3] + [int(a) for a in sys.argv[3:5]] + sys.argv[5:7]
while not os.path.exists(go):  # every writer opens the new file at the same moment
    time.sleep(0.001)
store = SQLiteStateStore(path)
with open(acks, "a") as out:
    for i in range(start, start + count):
        store.put_many("v1", {f"{name}-{i}": f"state {name}-{i}".encode()})
        out.write(f"{name}-{i}\\n"); out.flush(); os.fsync(out.fileno())  # the worker saw the write return
"""


def test_sqlite_states_written_by_workers_that_start_together_and_one_restarted_are_all_kept(tmp_path):
    """Three worker processes open a new state store at the same moment and write, one is SIGKILLed mid-stream and
    restarted: every write that returned is stored with its value (tests/test_sqlite_wal.py pins the open race)."""
    path, go = tmp_path / "states.db", tmp_path / "go"
    acks = {name: tmp_path / f"{name}.acks" for name in ("a", "b", "c")}
    command = [sys.executable, "-c", STATE_WRITER, str(path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    steady = [subprocess.Popen([*command, name, "0", "200", str(acks[name]), str(go)], env=env) for name in "bc"]
    victim = subprocess.Popen([*command, "a", "0", "100000", str(acks["a"]), str(go)], env=env)
    go.touch()
    _, resume = kill_after_acks(victim, acks["a"])
    restarted = subprocess.Popen([*command, "a", str(resume), "100", str(acks["a"]), str(go)], env=env)
    assert restarted.wait(120) == 0 and all(writer.wait(120) == 0 for writer in steady)
    acknowledged = [user for name in "abc" for user in acks[name].read_text().split()]
    assert len(acknowledged) == len(set(acknowledged)) >= 50 + 100 + 2 * 200
    stored = SQLiteStateStore(path).get_many("v1", acknowledged)
    assert stored == {user: f"state {user}".encode() for user in acknowledged}  # every returned write is kept


def test_redis_state_store():
    if not redis_reachable():
        pytest.skip(f"no Redis server at {REDIS_HOST}:{REDIS_PORT} (start one to test the Redis state store)")
    store = RedisStateStore(f"{REDIS_HOST}:{REDIS_PORT}", ttl_s=60)
    check_store(store)


def test_the_store_beside_a_build_follows_its_online_store(tmp_path):
    from types import SimpleNamespace

    from m2rec.serving.state_store import STATES_FILE, open_state_store

    (tmp_path / "data").mkdir()  # a feature build's data folder
    sqlite = open_state_store(tmp_path, SimpleNamespace(type="sqlite", path="data/online_store.db"))
    assert isinstance(sqlite, SQLiteStateStore) and sqlite.path == tmp_path / "data" / STATES_FILE
    redis = open_state_store(tmp_path, SimpleNamespace(type="redis", connection_string="10.0.0.5:6380,db=2"))
    assert isinstance(redis, RedisStateStore)
    assert redis.client.connection_pool.connection_kwargs["port"] == 6380
    assert redis.client.connection_pool.connection_kwargs["db"] == 2
