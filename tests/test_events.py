"""The event log: durable, applied once and in one order, under real concurrency (threads and processes) on SQLite
and on a real PostgreSQL server; retraining reads every event up to a cutoff."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from conftest import kill_after_acks

from m2rec.data.errors import DataError
from m2rec.data.schema import RawDataset
from m2rec.events.log import Event, EventConflict, EventLog, ItemConflict, public_url
from m2rec.events.retraining import merge_logged_events

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def event(i: int, user: str = "u", event_id: str | None = None) -> Event:
    return Event(user, f"i{i % 7}", T0 + timedelta(seconds=i), event_id)


def _client(url: str, worker: int, count: int) -> list[int]:
    """One client process: `count` events of its own, each sent twice (a retry), returns the seqs it got."""
    log = EventLog(url)
    seqs = []
    for i in range(count):
        sent = Event(f"user{i % 3}", f"item{worker}", T0 + timedelta(microseconds=worker * 10_000 + i),
                     f"w{worker}-{i}")
        first, retry = log.append([sent])[0], log.append([sent])[0]
        assert not first.duplicate and retry.duplicate and retry.event.seq == first.event.seq
        seqs.append(first.event.seq)
    return seqs


WRITER = """
import os, sys
from datetime import datetime, timedelta, timezone
from m2rec.events.log import Event, EventLog
url, name, start, count, acks = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
log, t0 = EventLog(url), datetime(2026, 1, 1, tzinfo=timezone.utc)
with open(acks, "a") as out:
    for i in range(start, start + count):
        when = t0 + timedelta(microseconds=2 * i + (name == "b"))  # distinct events: (user, item, time) differ
        log.append([Event(f"user{i % 5}", f"item{i % 7}", when, f"{name}-{i}")])
        out.write(f"{name}-{i}\\n"); out.flush(); os.fsync(out.fileno())  # the client saw the reply
"""


def test_every_acknowledged_write_survives_a_killed_writer_and_its_restart(log_url, tmp_path):
    """Two writer processes; one is SIGKILLed mid-stream and restarted, retrying from its first unacknowledged
    event: afterwards every acknowledged event is in the log exactly once and nothing is applied twice."""
    acks = {name: tmp_path / f"{name}.acks" for name in ("a", "b")}
    command = [sys.executable, "-c", WRITER, log_url]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    steady = subprocess.Popen([*command, "b", "0", "300", str(acks["b"])], env=env)
    victim = subprocess.Popen([*command, "a", "0", "100000", str(acks["a"])], env=env)
    acked, resume = kill_after_acks(victim, acks["a"])  # the client retries what it saw no reply for
    restarted = subprocess.Popen([*command, "a", str(resume), "100", str(acks["a"])], env=env)
    assert restarted.wait(120) == 0 and steady.wait(120) == 0
    log = EventLog(log_url)
    stored = log.read(log.cutoff())
    acknowledged = set(acks["a"].read_text().split()) | set(acks["b"].read_text().split())
    assert acknowledged <= set(stored["event_id"])  # nothing acknowledged is lost
    assert stored["event_id"].is_unique and stored["seq"].is_unique  # nothing applied twice
    assert not stored.duplicated(["user_id", "item_id", "timestamp"]).any()
    unacknowledged = set(stored["event_id"]) - acknowledged  # at most the one the kill interrupted after commit
    assert len(unacknowledged) <= 1 and len(stored) >= 300 + len(acked) + 100


@pytest.fixture(params=["sqlite", "postgresql"])
def log_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'events.db'}"
    return request.getfixturevalue("postgres_url")


def test_concurrent_processes_and_threads_lose_nothing_and_apply_each_event_once(log_url):
    workers, count = 4, 40
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        seqs = pool.starmap(_client, [(log_url, w, count) for w in range(workers)])
    log = EventLog(log_url)
    with ThreadPoolExecutor(4) as threads:  # threads of one process share the log object
        more = list(threads.map(lambda i: log.append([event(i, "threaded", f"t{i}")])[0].event.seq, range(40)))
    stored = log.read(log.cutoff())
    assert len(stored) == workers * count + 40 == stored["event_id"].nunique()
    assert set(stored["seq"]) == {s for chunk in seqs for s in chunk} | set(more)
    assert stored["seq"].is_unique and stored["seq"].is_monotonic_increasing


def test_retries_are_idempotent_and_a_reused_event_id_is_refused(log_url):
    log = EventLog(log_url)
    first = log.append([event(1, event_id="e1")])[0]
    again = log.append([event(1, event_id="e1")])[0]
    assert again.duplicate and again.event == first.event
    same_without_id = log.append([event(1)])[0]  # (user, item, time) identifies an event without an id
    assert same_without_id.duplicate and same_without_id.event.seq == first.event.seq
    with pytest.raises(EventConflict, match="event_id 'e1' was already used"):
        log.append([event(2, event_id="e1")])
    assert len(log.read(log.cutoff())) == 1


def test_a_failed_hook_stores_nothing_and_tails_come_in_time_order(log_url):
    log = EventLog(log_url)

    def fail(results, tail):
        assert tail(["u"], 0)["u"][0].event_id == "a"  # the hook sees the transaction's own rows
        raise RuntimeError("online store down")

    with pytest.raises(RuntimeError):
        log.append([event(5, event_id="a")], before_commit=fail)
    assert log.cutoff() == 0
    log.append([event(5, event_id="late-b")])
    log.append([event(3, event_id="late-a")])  # older, arrives later: placed before in time order
    tail = log.tail(["u", "nobody"], after_seq=0)
    assert list(tail) == ["u"] and [e.event_id for e in tail["u"]] == ["late-a", "late-b"]
    assert log.users_after(0) == ["u"] and log.users_after(log.cutoff()) == []


def test_retraining_merges_events_up_to_the_cutoff(tmp_path):
    log = EventLog(f"sqlite:///{tmp_path / 'events.db'}")
    log.append([Event("new", "a", T0), Event("old", "b", T0 + timedelta(hours=1)), Event("old", "gone", T0)])
    raw = RawDataset(pd.DataFrame({"user_id": ["old"], "item_id": ["a"],
                                   "timestamp": pd.to_datetime(["2025-01-01"], utc=True)}),
                     pd.DataFrame({"item_id": ["a", "b"], "text": ["A", "B"]}), "test")
    merged, facts = merge_logged_events(raw, log)
    assert facts == {"log": log.url, "through_seq": 3, "merged": 2, "unknown_items": 1, "users": 2,
                     "added_items": 0}
    assert merged.interactions[["user_id", "item_id"]].values.tolist() == [["old", "a"], ["new", "a"], ["old", "b"]]
    assert str(merged.interactions["timestamp"].dtype) == "datetime64[ns, UTC]"


def _add_item(url: str, item_id: str) -> bool:
    """One worker process adding `item_id`: True if it was the one that added it."""
    try:
        EventLog(url).add_item(item_id, f"text of {item_id}", item_id)
        return True
    except ItemConflict:
        return False


def test_an_item_is_added_once_whichever_worker_adds_it_and_read_in_seq_order(log_url):
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        won = pool.starmap(_add_item, [(log_url, f"item{i % 3}") for i in range(12)])
    assert sum(won) == 3
    log = EventLog(log_url)
    with pytest.raises(ItemConflict, match="item_id 'item0' was added already"):
        log.add_item("item0", "other text", "x")
    items = log.items_after(0)
    assert sorted(i.item_id for i in items) == ["item0", "item1", "item2"]
    assert [i.seq for i in items] == sorted(i.seq for i in items)
    assert [i.item_id for i in log.items_after(items[0].seq)] == [i.item_id for i in items[1:]]
    assert items[0].text == f"text of {items[0].item_id}"


def test_retraining_takes_the_added_items_and_their_events(tmp_path):
    log = EventLog(f"sqlite:///{tmp_path / 'events.db'}")
    log.add_item("c", "a new item C", "C")
    log.add_item("a", "a second text for A", "A2")  # the source has "a": its row stays
    log.append([Event("u", "c", T0), Event("u", "a", T0 + timedelta(hours=1))])
    raw = RawDataset(pd.DataFrame({"user_id": ["u"], "item_id": ["a"],
                                   "timestamp": pd.to_datetime(["2025-01-01"], utc=True)}),
                     pd.DataFrame({"item_id": ["a", "b"], "text": ["A", "B"]}), "test")
    merged, facts = merge_logged_events(raw, log)
    assert merged.items.values.tolist() == [["a", "A"], ["b", "B"], ["c", "a new item C"]]
    assert facts["added_items"] == 1 and facts["merged"] == 2 and facts["unknown_items"] == 0
    assert merged.interactions["item_id"].tolist() == ["a", "c", "a"]


def test_bad_urls_and_passwords():
    with pytest.raises(DataError, match="events.url='mysql://x' is not a supported event log"):
        EventLog("mysql://x")
    assert public_url("postgresql://me:secret@db:5432/x") == "postgresql://me:***@db:5432/x"
