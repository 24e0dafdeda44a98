"""Serving: the ranking core without a server, then a real `bentoml serve` of the packaged Bento, called over HTTP
for every endpoint and error case."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pytest
import requests
import torch
from test_registry import sqlite_uri, train_tiny_model

from m2rec.events.log import EventLog
from m2rec.inference import Recommender
from m2rec.serving.batching import AdaptiveBatcher
from m2rec.serving.core import Ranker, length_buckets
from m2rec.serving.follower import ChampionFollower, ServiceSources
from m2rec.serving.http import BodySizeLimit, token_failure
from m2rec.serving.launcher import bentoml_serve
from m2rec.serving.schemas import MAX_HISTORY_ITEMS, EventIn, RankQuery
from m2rec.stages.register import register

RELOAD_TOKEN = "test-reload-token"
ITEMS_TOKEN = "test-items-token"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serving")


@pytest.fixture(scope="module")
def model_dir(tiny_synthetic, workspace) -> Path:
    return train_tiny_model(tiny_synthetic, workspace / "model")


@pytest.fixture(scope="module")
def feature_build(tiny_synthetic, workspace) -> dict:
    from m2rec.stages.features import build_features

    return build_features(tiny_synthetic, workspace / "features")


@pytest.fixture(scope="module")
def feature_repo(feature_build) -> Path:
    return Path(feature_build["repo_dir"])


@pytest.fixture(scope="module")
def events_url(workspace) -> str:
    return f"sqlite:///{workspace / 'events.db'}"


@pytest.fixture(scope="module")
def users(tiny_synthetic) -> list[str]:
    """User ids of the dataset; tests that push events take their own so others see unchanged histories."""
    return pd.read_parquet(tiny_synthetic / "interactions.parquet")["user_id"].drop_duplicates().tolist()


@pytest.fixture(scope="module")
def ranker(model_dir, feature_repo, events_url) -> Ranker:
    return Ranker(model_dir, feature_repo, "m2rec v1", EventLog(events_url))


@pytest.fixture(scope="module")
def packaged(model_dir, tiny_synthetic, feature_build, events_url, workspace) -> dict:
    from m2rec.stages.package import package

    uri = sqlite_uri(workspace)
    register(model_dir, tiny_synthetic, uri, feature_build=feature_build["build_key"])
    return package(tracking_uri=uri, bentoml_home=workspace / "bentoml", feature_root=workspace / "features",
                   events_url=events_url)


@pytest.fixture(scope="module")
def server(packaged, workspace) -> str:
    """`bentoml serve` of the Bento on a free local port; SIGTERM at the end."""
    env = {**os.environ, "BENTOML_HOME": packaged["bentoml_home"], "BENTOML_DO_NOT_TRACK": "true",
           "M2REC_RELOAD_TOKEN": RELOAD_TOKEN, "M2REC_ITEMS_TOKEN": ITEMS_TOKEN}
    for variable in ("M2REC_FEATURE_REPO", "M2REC_FEATURE_ROOT", "M2REC_EVENTS_URL", "MLFLOW_TRACKING_URI"):
        env.pop(variable, None)  # what `package` recorded is what the service uses
    with bentoml_serve(packaged["bento_tag"], env, workspace / "serve.log", cwd=workspace, ready_timeout_s=180) as url:
        yield url


def post(url: str, path: str, body: dict) -> requests.Response:
    return requests.post(f"{url}{path}", json=body, timeout=30)


# --- the core, in process --------------------------------------------------------------------------------------

def test_rank_answers_each_query_of_a_mixed_batch(ranker, model_dir, users):
    recommender = Recommender(model_dir)
    sequence = ranker.sequences.histories([users[0]])[0]
    history_ids = recommender.item_ids[[1, 2, 3]].tolist()
    queries = [RankQuery(user_id=users[0], k=5, exclude_seen=True),
               RankQuery(user_id="no-such-user", k=5, exclude_seen=True),
               RankQuery(item_ids=history_ids, k=3, exclude_seen=False),
               RankQuery(item_ids=["no-such-item"], k=5, exclude_seen=True),
               RankQuery(item_ids=history_ids, k=recommender.num_items + 1, exclude_seen=True)]
    known, unknown, by_history, bad_item, bad_k = ranker.rank(queries)

    expected = recommender.recommend([sequence], k=5)[0]
    assert known.response.strategy == "model" and known.response.history_length == len(sequence)
    assert [i.item_id for i in known.response.items] == expected.item_ids
    assert known.response.gates == expected.gates and known.response.model_version == "m2rec v1"
    assert unknown.response.strategy == "popularity" and unknown.response.gates is None
    assert [i.item_id for i in unknown.response.items] == recommender.popular(5).item_ids
    assert [i.item_id for i in by_history.response.items] == \
        recommender.recommend([[1, 2, 3]], k=3, exclude_seen=False)[0].item_ids
    assert bad_item.failure.status == 400 and bad_item.failure.field == "item_ids"
    assert "no-such-item" in bad_item.failure.message
    assert bad_k.failure.status == 400 and bad_k.failure.field == "k"
    assert f"k <= {recommender.num_items}" in bad_k.failure.message


def test_without_feature_repo_users_get_503_and_histories_still_work(model_dir):
    ranker = Ranker(model_dir, None)
    by_user, by_history = ranker.rank([RankQuery(user_id="u1", k=3, exclude_seen=True),
                                       RankQuery(item_ids=[], k=3, exclude_seen=True)])
    assert by_user.failure.status == 503 and by_user.failure.field == "user_id"
    assert "M2REC_FEATURE_ROOT" in by_user.failure.message
    assert by_history.response.strategy == "popularity" and len(by_history.response.items) == 3
    assert ranker.record_events([EventIn(user_id="u1", item_id="i00001")]).failure.status == 503


def test_without_an_event_log_users_are_ranked_from_the_build_and_events_get_503(model_dir, feature_repo, users):
    ranker = Ranker(model_dir, feature_repo)
    result = ranker.rank([RankQuery(user_id=users[0], k=3, exclude_seen=True)])[0]
    assert result.response.strategy == "model"
    refused = ranker.record_events([EventIn(user_id=users[0], item_id="i00001")]).failure
    assert refused.status == 503 and "M2REC_EVENTS_URL" in refused.message


def test_feature_repo_of_another_dataset_is_not_used(model_dir, feature_repo, events_url, tmp_path):
    other = shutil.copytree(feature_repo, tmp_path / "other")
    build = json.loads((other / "data" / "build.json").read_text())
    (other / "data" / "build.json").write_text(json.dumps({**build, "dataset_version": "another"}))
    ranker = Ranker(model_dir, other, events=EventLog(events_url))
    failure = ranker.rank([RankQuery(user_id="u1", k=3, exclude_seen=True)])[0].failure
    assert failure.status == 503 and "built from dataset another" in failure.message


# --- recurrent states, in process --------------------------------------------------------------------------------

def event(user: str, item_id: str, minutes_ago: float, event_id: str | None = None) -> EventIn:
    from datetime import datetime, timedelta, timezone

    return EventIn(user_id=user, item_id=item_id, event_id=event_id,
                   timestamp=datetime.now(timezone.utc) - timedelta(minutes=minutes_ago))


def stored_state(ranker: Ranker, user: str):
    """What the store holds for `user` under `ranker`'s version, unverified (None: nothing)."""
    data = ranker.states.store.get_many(ranker.states.scope, [user]).get(user)
    return None if data is None else ranker.states.codec.decode(data)


def reencoded_hidden(ranker: Ranker, user: str) -> torch.Tensor:
    """(1, H): the model's full encoding of the user's current sequence."""
    history = ranker.sequences.histories([user])[0]
    return ranker.recommender.model.last_hidden(torch.tensor([history]), torch.tensor([len(history)]))


@pytest.fixture(scope="module")
def reencoding(model_dir, feature_repo, events_url) -> Ranker:
    return Ranker(model_dir, feature_repo, "m2rec v1", EventLog(events_url), recurrent=False)


def count_rebuilds(ranker: Ranker, monkeypatch) -> list[int]:
    """A list that grows by one for each state rebuilt from a whole history."""
    calls, rebuild = [], ranker.recommender.model.state_from_history
    monkeypatch.setattr(ranker.recommender.model, "state_from_history", lambda items: calls.append(1) or rebuild(items))
    return calls


@torch.no_grad()
def test_states_advanced_event_by_event_equal_reencoding(ranker, reencoding, model_dir, monkeypatch):
    assert ranker.states is not None and reencoding.states is None
    user, item_ids = "recurrent-steps", Recommender(model_dir).item_ids
    rebuilds = count_rebuilds(ranker, monkeypatch)
    for n in range(1, ranker.recommender.model.max_length + 1):  # up to max_length single events, in time order
        assert ranker.record_events([event(user, item_ids[1 + (5 * n) % 40], minutes_ago=100 - n)]).failure is None
        state = stored_state(ranker, user)
        assert int(state.state["length"][0]) == n
        assert torch.allclose(state.state["hidden"], reencoded_hidden(ranker, user), atol=1e-4)
    assert len(rebuilds) == 1  # the first event found no state; every later one was a step
    query = [RankQuery(user_id=user, k=5, exclude_seen=True)]
    carried, encoded = ranker.rank(query)[0].response, reencoding.rank(query)[0].response
    assert [i.item_id for i in carried.items] == [i.item_id for i in encoded.items]
    assert [i.score for i in carried.items] == pytest.approx([i.score for i in encoded.items], abs=1e-4)
    assert carried.gates == pytest.approx(encoded.gates, abs=1e-3)
    assert carried.history_length == encoded.history_length and carried.model_version == "m2rec v1"


@torch.no_grad()
def test_a_retried_event_advances_the_state_once(ranker, model_dir):
    user, item_ids = "recurrent-retry", Recommender(model_dir).item_ids
    ranker.record_events([event(user, item_ids[3], minutes_ago=30)])
    retried = event(user, item_ids[4], minutes_ago=20, event_id="recurrent-retry-1")
    first = ranker.record_events([retried]).response.events[0]
    after_first = stored_state(ranker, user)
    again = ranker.record_events([retried]).response.events[0]
    assert not first.duplicate and again.duplicate and again.seq == first.seq
    after_retry = stored_state(ranker, user)
    assert after_retry.seq == after_first.seq == first.seq and int(after_retry.state["length"][0]) == 2
    assert torch.equal(after_retry.state["hidden"], after_first.state["hidden"])
    assert torch.allclose(after_retry.state["hidden"], reencoded_hidden(ranker, user), atol=1e-4)


@torch.no_grad()
def test_a_late_event_rebuilds_the_state_and_stays_exact(ranker, reencoding, model_dir, monkeypatch):
    user, item_ids = "recurrent-late", Recommender(model_dir).item_ids
    ranker.record_events([event(user, item_ids[i], minutes_ago=60 - i) for i in (1, 2, 3)])
    rebuilds = count_rebuilds(ranker, monkeypatch)
    late = ranker.record_events([event(user, item_ids[9], minutes_ago=120)]).response.events[0]  # before the rest
    assert len(rebuilds) == 1
    state = stored_state(ranker, user)
    assert state.seq == late.seq and state.state["window"][0, -4:].tolist() == [9, 1, 2, 3]
    assert torch.allclose(state.state["hidden"], reencoded_hidden(ranker, user), atol=1e-4)
    query = [RankQuery(user_id=user, k=5, exclude_seen=True)]
    assert [i.item_id for i in ranker.rank(query)[0].response.items] == \
        [i.item_id for i in reencoding.rank(query)[0].response.items]


@torch.no_grad()
def test_a_version_never_serves_another_versions_state(model_dir, feature_repo, events_url, reencoding, users):
    from m2rec.serving.state_store import StoredState

    events = EventLog(events_url)
    v1 = Ranker(model_dir, feature_repo, "m2rec v1-states", events)
    limit = v1.recommender.model.max_length - 1  # room for one event within max_length: exact re-encoding
    user = next(u for u in users[6:] if len(reencoding.sequences.histories([u])[0]) < limit)
    query = [RankQuery(user_id=user, k=5, exclude_seen=True)]
    v1.rank(query)  # stores v1's state
    poisoned = stored_state(v1, user).state
    poisoned["hidden"] = -poisoned["hidden"]  # a state that would rank differently, marked as current
    v1.states.store.put_many(v1.states.scope, {user: v1.states.codec.encode(StoredState(2**62, poisoned))})
    v2 = Ranker(model_dir, feature_repo, "m2rec v2-states", events)
    expected = [i.item_id for i in reencoding.rank(query)[0].response.items]
    served = v2.rank(query)[0].response
    assert served.model_version == "m2rec v2-states" and [i.item_id for i in served.items] == expected
    assert torch.allclose(stored_state(v2, user).state["hidden"], reencoded_hidden(v2, user), atol=1e-4)
    # an event recorded by v1 leaves v2's state behind the log: v2 rebuilds it rather than serve it
    v1.record_events([event(user, Recommender(model_dir).item_ids[5], minutes_ago=1)])
    served = v2.rank(query)[0].response
    assert served.history_length == len(reencoding.sequences.histories([user])[0])
    assert [i.item_id for i in served.items] == [i.item_id for i in reencoding.rank(query)[0].response.items]


@torch.no_grad()
def test_two_workers_recording_one_users_events_at_once_keep_its_state_exact(model_dir, feature_repo, events_url):
    workers = [Ranker(model_dir, feature_repo, "m2rec v1", EventLog(events_url)) for _ in range(2)]
    user, item_ids = "recurrent-concurrent", Recommender(model_dir).item_ids

    def send(worker: Ranker, offset: int) -> list:
        return [worker.record_events([event(user, item_ids[offset + 2 * i], minutes_ago=50 - 2 * i - offset)])
                .failure for i in range(8)]

    with ThreadPoolExecutor(2) as pool:
        failures = [f for done in pool.map(send, workers, (1, 2)) for f in done]
    assert failures == [None] * 16
    state = stored_state(workers[0], user)
    assert int(state.state["length"][0]) == 16 and state.seq == max(
        e.seq for e in workers[0].sequences.events.tail([user], 0)[user])
    assert torch.allclose(state.state["hidden"], reencoded_hidden(workers[0], user), atol=1e-4)


def test_the_recurrent_path_is_configured_by_params_and_environment(tmp_path):
    def sources(metadata: dict, environ: dict) -> ServiceSources:
        return ServiceSources.resolve(metadata, environ, tmp_path)

    assert sources({}, {}).recurrent and sources({}, {}).state_precision == "float32"
    assert not sources({"serving": {"recurrent": False}}, {}).recurrent
    assert not sources({}, {"M2REC_RECURRENT": "0"}).recurrent
    assert sources({"serving": {"recurrent": False}}, {"M2REC_RECURRENT": "1"}).recurrent
    assert sources({}, {"M2REC_STATE_PRECISION": "float16"}).state_precision == "float16"


def test_adaptive_batcher_batches_what_waits_and_keeps_order():
    started, release, batches = threading.Event(), threading.Event(), []

    def handler(queries: list[int]) -> list[int]:
        batches.append(list(queries))
        started.set()
        release.wait(10)  # the first batch runs until every other query is queued
        if -1 in queries:
            raise ValueError("bad batch")
        return [q * 10 for q in queries]

    async def scenario():
        batcher = AdaptiveBatcher(handler, ThreadPoolExecutor(1), max_batch_size=3)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        rest = [asyncio.ensure_future(batcher(q)) for q in (1, 2, 3, 4, -1)]
        while len(batcher._waiting) < len(rest):
            await asyncio.sleep(0)
        release.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    results = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3], [4, -1]]
    assert results[:4] == [0, 10, 20, 30]
    assert all(isinstance(r, ValueError) for r in results[4:])  # a failed batch fails only its own callers


def test_length_buckets_keep_similar_lengths_together():
    lengths = {0: 100, 1: 5, 2: 300, 3: 140, 4: 10, 5: 60}
    histories = {row: [1] * n for row, n in lengths.items()}
    # capped at 200; a bucket's longest is at most 1.5 x its shortest unless all are short (<= 16)
    assert length_buckets(list(histories), histories, max_length=200) == [[1, 4], [5], [0, 3], [2]]


def test_body_size_limit_counts_chunked_bodies():
    async def app(scope, receive, send):
        body = (await receive())["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    async def call(chunks: list[bytes], headers: list) -> tuple[int, bytes]:
        messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
                    for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        await BodySizeLimit(app, max_bytes=10)({"type": "http", "headers": headers}, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert asyncio.run(call([b"12345", b"678"], [])) == (200, b"12345678")
    status, body = asyncio.run(call([b"123456", b"789012"], []))
    assert status == 413 and json.loads(body)["detail"][0]["loc"] == ["body"]
    assert asyncio.run(call([b"1"], [(b"content-length", b"11")]))[0] == 413


# --- the service, over HTTP ------------------------------------------------------------------------------------

def test_recommend_for_a_user_uses_the_feature_store(server, ranker, model_dir, users):
    sequence = ranker.sequences.histories([users[1]])[0]
    reply = post(server, "/recommend", {"user_id": users[1], "k": 5})
    assert reply.status_code == 200, reply.text
    body = reply.json()
    expected = Recommender(model_dir).recommend([sequence], k=5, exclude_seen=True)[0]
    assert body["strategy"] == "model" and body["user_id"] == users[1]
    assert body["history_length"] == len(sequence)
    assert [i["item_id"] for i in body["items"]] == expected.item_ids
    assert [i["title"] for i in body["items"]] == expected.titles
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True) and scores == pytest.approx(expected.scores, abs=1e-5)
    assert set(body["gates"]) == {"temporal", "frequency", "semantic"}
    assert sum(body["gates"].values()) == pytest.approx(1.0, abs=1e-3)
    seen = set(Recommender(model_dir).item_ids[sequence])
    assert not seen & {i["item_id"] for i in body["items"]}  # exclude_seen defaults to true


def test_unknown_user_gets_a_popularity_list(server, model_dir):
    body = post(server, "/recommend", {"user_id": "never-seen-user"}).json()
    assert body["strategy"] == "popularity" and body["gates"] is None and body["history_length"] == 0
    assert [i["item_id"] for i in body["items"]] == Recommender(model_dir).popular(10).item_ids


def test_recommend_by_history(server, model_dir):
    recommender = Recommender(model_dir)
    history = recommender.item_ids[[4, 9, 2]].tolist()
    body = post(server, "/recommend_by_history", {"item_ids": history, "k": 4, "exclude_seen": False}).json()
    expected = recommender.recommend([[4, 9, 2]], k=4, exclude_seen=False)[0]
    assert body["user_id"] is None and body["strategy"] == "model" and body["history_length"] == 3
    assert [i["item_id"] for i in body["items"]] == expected.item_ids


def test_an_event_changes_the_users_next_recommendations(server, ranker, users):
    user = users[2]
    before = post(server, "/recommend", {"user_id": user, "k": 3}).json()
    top_item = before["items"][0]["item_id"]
    reply = post(server, "/events", {"user_id": user, "item_id": top_item})
    assert reply.status_code == 200, reply.text
    assert reply.json()["sequence_length"] == min(before["history_length"] + 1, ranker.features.max_sequence_length)
    assert reply.json()["model_version"] == before["model_version"] and not reply.json()["duplicate"]
    after = post(server, "/recommend", {"user_id": user, "k": 3}).json()
    assert after["history_length"] == reply.json()["sequence_length"]
    assert top_item not in {i["item_id"] for i in after["items"]}  # now seen, so excluded
    new_user = post(server, "/events", {"user_id": "brand-new-user", "item_id": top_item})
    assert new_user.json()["sequence_length"] == 1
    assert post(server, "/recommend", {"user_id": "brand-new-user"}).json()["strategy"] == "model"


def test_events_refuse_unknown_items_and_times_outside_the_window(server, users):
    unknown = post(server, "/events", {"user_id": users[3], "item_id": "no-such-item"})
    assert unknown.status_code == 400 and unknown.json()["detail"][0]["loc"] == ["item_id"]
    for when in ("1990-01-01T00:00:00Z", "2099-01-01T00:00:00Z"):
        refused = post(server, "/events", {"user_id": users[3], "item_id": "i00001", "timestamp": when})
        assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["timestamp"]
        assert "outside the accepted window" in refused.json()["error"]


def test_late_events_take_their_place_and_retries_apply_once(server, users, model_dir):
    from datetime import datetime, timedelta, timezone

    user, recommender = users[4], Recommender(model_dir)
    first, second = recommender.item_ids[[7, 8]].tolist()
    now = datetime.now(timezone.utc)
    before = post(server, "/recommend", {"user_id": user}).json()["history_length"]
    body = {"user_id": user, "item_id": first, "event_id": f"{user}-late", "timestamp": (now - timedelta(hours=2))
            .isoformat()}
    assert post(server, "/events", {"user_id": user, "item_id": second, "timestamp": now.isoformat()}).ok
    late = post(server, "/events", body).json()
    retry = post(server, "/events", body).json()
    assert not late["duplicate"] and retry["duplicate"] and retry["seq"] == late["seq"]
    assert retry["sequence_length"] == late["sequence_length"] == before + 2
    conflict = post(server, "/events", {**body, "item_id": second})
    assert conflict.status_code == 409 and conflict.json()["detail"][0]["loc"] == ["event_id"]


def test_event_batches_are_all_or_nothing(server, users):
    good = {"user_id": users[5], "item_id": "i00001"}
    refused = post(server, "/events_batch", {"events": [good, {"user_id": users[5], "item_id": "nope"}]})
    assert refused.status_code == 400 and refused.json()["detail"][0]["loc"] == ["events[1].item_id"]
    before = post(server, "/recommend", {"user_id": users[5]}).json()["history_length"]
    assert before == post(server, "/recommend", {"user_id": users[5]}).json()["history_length"]
    stored = post(server, "/events_batch", {"events": [good, {**good, "item_id": "i00002"}]})
    assert stored.status_code == 200, stored.text
    assert [e["sequence_length"] for e in stored.json()["events"]] == [before + 2, before + 2]
    assert post(server, "/events_batch", {"events": []}).status_code == 400


@pytest.mark.parametrize("path, body, status, field", [
    ("/recommend", {"k": 5}, 400, "user_id"),
    ("/recommend", {"user_id": 42}, 400, "user_id"),
    ("/recommend", {"user_id": "u1", "k": "10"}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": 2.5}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": 0}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": -3}, 400, "k"),
    ("/recommend", {"user_id": "u1", "k": 100000}, 400, "k"),
    ("/recommend", {"user_id": "u1", "exclude_seen": "yes"}, 400, "exclude_seen"),
    ("/recommend_by_history", {"k": 5}, 400, "item_ids"),
    ("/recommend_by_history", {"item_ids": "i00001"}, 400, "item_ids"),
    ("/recommend_by_history", {"item_ids": [1, 2]}, 400, "item_ids"),
    ("/recommend_by_history", {"item_ids": ["i00001", "not-an-item"]}, 400, "item_ids"),
    ("/recommend_by_history", {"item_ids": ["i00001"] * (MAX_HISTORY_ITEMS + 1)}, 400, "item_ids"),
    ("/recommend_by_history", {"item_ids": ["i00001"], "k": 100000}, 400, "k"),
    ("/events", {"user_id": "u1"}, 400, "item_id"),
    ("/events", {"user_id": "u1", "item_id": "i00001", "timestamp": "yesterday"}, 400, "timestamp"),
    ("/events", {"user_id": "u1", "item_id": "i00001", "event_id": ""}, 400, "event_id"),
    ("/recommend_by_history", {"item_ids": ["x" * 200] * 400}, 413, "body"),
])
def test_bad_input_gets_4xx_naming_the_field(server, path, body, status, field):
    reply = post(server, path, body)
    assert reply.status_code == status, reply.text
    locations = [d["loc"][0] for d in reply.json()["detail"]]
    assert field in locations, reply.text


def test_bad_encodings_are_refused_and_the_server_stays_up(server):
    not_json = requests.post(f"{server}/recommend", data=b"{not json", timeout=30,
                             headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400
    pickled = requests.post(f"{server}/recommend", data=b"\x80\x04N.", timeout=30,
                            headers={"Content-Type": "application/vnd.bentoml+pickle"})
    assert pickled.status_code == 415  # BentoML never unpickles a client's body
    chunked = requests.post(f"{server}/recommend_by_history", timeout=30, headers={"Content-Type": "application/json"},
                            data=(b'{"item_ids": [' + b'"i00001",' * 20000 + b'"i00001"]}' for _ in range(1)))
    assert chunked.status_code == 413
    assert requests.get(f"{server}/healthz", timeout=5).status_code == 200
    assert post(server, "/recommend", {"user_id": "u1", "k": 2}).status_code == 200


def test_operations_endpoints_and_docs(server):
    assert requests.get(f"{server}/healthz", timeout=5).status_code == 200
    ready = requests.get(f"{server}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["model_version"] == "m2rec v1"
    assert ready.json()["follows"] == "m2rec@champion" and ready.json()["last_error"] is None
    for _ in range(8):
        post(server, "/recommend", {"user_id": "u1"})
    metrics = requests.get(f"{server}/metrics", timeout=5).text
    assert 'bentoml_service_request_total{endpoint="/recommend"' in metrics
    batched = re.search(r"^m2rec_batch_size_sum(?:\{[^}]*\})? ([0-9.e+]+)$", metrics, re.MULTILINE)
    assert batched and float(batched.group(1)) >= 8  # every query reaches the model through the batcher
    spec = requests.get(f"{server}/docs.json", timeout=5).json()
    assert {"/recommend", "/recommend_by_history", "/events", "/events_batch", "/reload"} <= set(spec["paths"])
    assert "text/html" in requests.get(f"{server}/", timeout=5).headers["content-type"]


def test_reload_needs_the_token(server):
    reply = requests.post(f"{server}/reload", json={}, timeout=30)
    assert reply.status_code == 401, reply.text
    wrong = requests.post(f"{server}/reload", json={}, timeout=30, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["detail"][0]["loc"] == ["authorization"]
    done = requests.post(f"{server}/reload", json={}, timeout=60,
                         headers={"Authorization": f"Bearer {RELOAD_TOKEN}"})
    assert done.status_code == 200 and done.json()["registry_version"] == "1"
    assert token_failure({}, None).status == 403  # no token configured: reloading is off


def test_the_follower_swaps_in_the_champion_keeps_the_old_on_failure_and_rolls_back(
        model_dir, tiny_synthetic, feature_build, events_url, workspace, tmp_path):
    from mlflow.tracking import MlflowClient

    from m2rec.stages.register import promote, track

    uri = sqlite_uri(tmp_path)
    register(model_dir, tiny_synthetic, uri, feature_build=feature_build["build_key"])
    events = EventLog(events_url)
    sources = ServiceSources.resolve({"tracking_uri": uri, "feature_root": str(workspace / "features"),
                                      "events_url": events_url}, {}, tmp_path / "home")
    follower = ChampionFollower(Ranker(model_dir, None, "m2rec v1"), "1", sources, events)
    # v2 names a feature build that is not there: it fails to load, v1 keeps serving and /readyz says why
    run = track(model_dir, tiny_synthetic, None, uri)
    promote(run, model_dir, True, uri, feature_build="missing-build")
    status = follower.check()
    assert follower.current.model_version == "m2rec v1" and "missing-build" in status["last_error"]
    # v3 is complete: swapped in, with user features, and the error is gone
    promote(track(model_dir, tiny_synthetic, None, uri), model_dir, True, uri, feature_build=feature_build["build_key"])
    status = follower.check()
    assert status["model_version"] == "m2rec v3" and status["last_error"] is None
    assert follower.current.sequences is not None
    # rolling back is moving the alias back; states of versions before the previous one are dropped
    states = follower.current.states.store
    states.put_many("m2rec v0@retired", {"u": b"state"})
    MlflowClient(uri).set_registered_model_alias("m2rec", "champion", "1")
    assert follower.check()["model_version"] == "m2rec v1"
    assert states.get_many("m2rec v0@retired", ["u"]) == {}


def test_a_reload_asked_of_one_worker_moves_every_worker_sharing_the_model_cache(
        model_dir, tiny_synthetic, feature_build, events_url, workspace, tmp_path):
    """Two followers as two workers of one service (one model cache, an hour between registry polls): a reload
    asked of one moves the other too, within seconds; a marker left from before a worker started is not replayed."""
    from m2rec.stages.register import promote, track

    uri = sqlite_uri(tmp_path)
    register(model_dir, tiny_synthetic, uri, feature_build=feature_build["build_key"])
    sources = dataclasses.replace(ServiceSources.resolve(
        {"tracking_uri": uri, "feature_root": str(workspace / "features"), "events_url": events_url}, {},
        tmp_path / "home"), poll_interval_s=3600.0)
    events = EventLog(events_url)
    workers = [ChampionFollower(Ranker(model_dir, None, "m2rec v1"), "1", sources, events) for _ in range(2)]
    for worker in workers:
        worker.start()
    try:
        promote(track(model_dir, tiny_synthetic, None, uri), model_dir, True, uri,
                feature_build=feature_build["build_key"])
        time.sleep(2.5)
        assert [w.current.model_version for w in workers] == ["m2rec v1"] * 2  # nobody asked: the poll is an hour
        assert workers[0].request_reload()["model_version"] == "m2rec v2"
        deadline = time.monotonic() + 15
        while workers[1].current.model_version != "m2rec v2" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert workers[1].current.model_version == "m2rec v2"
        late = ChampionFollower(Ranker(model_dir, None, "m2rec v1"), "1", sources, events)
        late.start()
        time.sleep(2.5)
        assert late.current.model_version == "m2rec v1" and late.last_check is None  # the old marker: no check
        late.stop()
    finally:
        for worker in workers:
            worker.stop()


def test_items_adds_an_item_that_recommend_and_events_take_at_once(server, users):
    """Last in this file: the added item stays in the served catalog (and the shared event log)."""
    item = {"item_id": "http-new-1", "text": "a brand-new item added over HTTP", "title": "New over HTTP"}
    for headers in ({}, {"Authorization": "Bearer nope"}):
        refused = requests.post(f"{server}/items", json=item, headers=headers, timeout=30)
        assert refused.status_code == 401 and refused.json()["detail"][0]["loc"] == ["authorization"]
    auth = {"Authorization": f"Bearer {ITEMS_TOKEN}"}
    added = requests.post(f"{server}/items", json=item, headers=auth, timeout=120)
    assert added.status_code == 200, added.text
    count = added.json()["item_count"]
    for body, status, field in [(item, 409, "item_id"), ({**item, "item_id": "http-new-2", "text": " "}, 400, "text")]:
        refused = requests.post(f"{server}/items", json=body, headers=auth, timeout=30)
        assert refused.status_code == status and refused.json()["detail"][0]["loc"] == [field], refused.text
    ranked = post(server, "/recommend_by_history", {"item_ids": ["i00001", "i00002"], "k": count,
                                                    "exclude_seen": False})
    assert ranked.status_code == 200 and "http-new-1" in [i["item_id"] for i in ranked.json()["items"]]
    assert post(server, "/recommend_by_history", {"item_ids": ["http-new-1"], "k": 3}).status_code == 200
    event = post(server, "/events", {"user_id": users[6], "item_id": "http-new-1"})
    assert event.status_code == 200 and event.json()["item_id"] == "http-new-1", event.text
