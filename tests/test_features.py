"""Features through Feast: the offline tables, apply + materialize + online lookup + push on the synthetic default
(built through the CLI), on ml-100k, and on a real Redis online store."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from m2rec.data.errors import DataError
from m2rec.errors import ConfigError
from m2rec.data.prepared import PreparedDataset
from m2rec.data.sources import SourceSpec
from m2rec.events.log import Event, EventLog
from m2rec.features.live import LiveSequences
from m2rec.features.repo import FeatureParams, feature_store, write_repo
from m2rec.features.store import FeatureClient
from m2rec.features.tables import split_cutoffs, user_sequence_table
from m2rec.stages.features import build_features
from m2rec.stages.prepare import prepare
from m2rec.text.embeddings import TextEncoderParams, resolve_model_path

from conftest import REDIS_HOST, REDIS_PORT, redis_reachable
SHORT = 20  # max_sequence_length of the synthetic build: shorter than its longest users, so windows are cut


def model_dim() -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_model_path(TextEncoderParams().model)).hidden_size)


def assert_sequences_match_feast(client: FeatureClient, dataset: PreparedDataset, max_length: int) -> None:
    """Online: each user's full history; offline at the train cutoff: the training sequence (point in time)."""
    users = dataset.interactions.drop_duplicates("user_idx").sort_values("user_idx")["user_id"].tolist()
    online = client.snapshot_sequences(users)
    assert online == [seq[-max_length:].tolist() for seq in dataset.user_sequences]
    train = client.training_sequences(split_cutoffs(dataset.interactions, "train"))
    assert train["user_idx"].tolist() == list(range(1, dataset.num_users + 1))
    assert [list(seq) for seq in train["item_sequence"]] == [seq[-max_length:].tolist()
                                                             for seq in dataset.train_sequences()]


@pytest.fixture(scope="module")
def synthetic_repo(tiny_synthetic, tmp_path_factory):
    """The tiny synthetic dataset built as a user would: `m2rec features build`."""
    from m2rec.cli import cli

    root = tmp_path_factory.mktemp("features")
    result = CliRunner().invoke(cli, ["features", "build", "--data", str(tiny_synthetic), "--root", str(root),
                                      "--max-sequence-length", str(SHORT)])
    assert result.exit_code == 0, result.output
    return Path(json.loads(result.stdout)["repo_dir"])


def test_sequence_table_holds_a_snapshot_per_split_cutoff_and_orders_ties():
    interactions = pd.DataFrame({
        "user_id": ["a"] * 5 + ["b"] * 3,
        "user_idx": [1] * 5 + [2] * 3,
        "item_idx": [5, 6, 7, 8, 4, 9, 5, 3],
        "timestamp": pd.to_datetime([10, 20, 20, 30, 40, 10, 10, 10], unit="s", utc=True),
        "split": ["train", "train", "train", "valid", "test", "train", "valid", "test"],
    })
    table = user_sequence_table(interactions, max_length=2).to_pandas()
    assert [list(s) for s in table["item_sequence"]] == [[6, 7], [7, 8], [8, 4], [9], [9, 5], [5, 3]]
    assert table["sequence_length"].tolist() == [2, 2, 2, 1, 2, 2]
    # events in the same second get distinct, ordered times (1 µs apart); the last event time stays the real one
    assert (table["event_timestamp"] - table["last_event_time"]).dt.total_seconds().mul(1e6).round().tolist() \
        == [1, 0, 0, 0, 1, 2]


def test_feast_apply_imports_only_the_definitions(tmp_path):
    from feast.repo_operations import get_repo_files

    repo = tmp_path / "repo"
    write_repo(repo, FeatureParams(), "key")
    for stray in ("scripts/workflow.py", "test_repo.py", "data/helper.py"):
        (repo / stray).parent.mkdir(exist_ok=True)
        (repo / stray).write_text("raise SystemExit('feast apply must not import this')\n")
    assert get_repo_files(repo) == [(repo / "definitions.py").resolve()]


def test_bad_feature_params_and_missing_build_are_clear_errors(tiny_synthetic, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="features.online_store='mongo'"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(online_store="mongo"))
    with pytest.raises(ConfigError, match="features.max_sequence_length=0"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(max_sequence_length=0))
    with pytest.raises(ConfigError, match="features.offline_store='bigquery'.*use one of file, spark"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(offline_store="bigquery"))
    with pytest.raises(DataError, match="run `m2rec features build"):
        FeatureClient(tmp_path / "nothing")
    import m2rec.features.repo as repo

    monkeypatch.setattr(repo.importlib.util, "find_spec", lambda name: None)  # as without the `spark` extra
    with pytest.raises(ConfigError, match="offline_store='spark' needs pyspark.*pip install 'm2rec\\[spark\\]'"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(offline_store="spark"))


def test_synthetic_online_and_point_in_time_sequences(synthetic_repo, tiny_synthetic):
    dataset = PreparedDataset.load(tiny_synthetic)
    assert max(len(seq) for seq in dataset.user_sequences) > SHORT
    client = FeatureClient(synthetic_repo)
    assert_sequences_match_feast(client, dataset, SHORT)
    assert client.snapshot_sequences(["nobody", dataset.interactions["user_id"].iloc[0]])[0] is None  # no history
    # at the valid cutoff a user's sequence ends with the valid item: the test item is not yet known
    valid = client.training_sequences(split_cutoffs(dataset.interactions, "valid"))
    assert [list(s) for s in valid["item_sequence"]] == [s[:-1][-SHORT:].tolist() for s in dataset.user_sequences]


def test_synthetic_item_embeddings_come_through_the_offline_store(synthetic_repo, tiny_synthetic):
    from m2rec.text.embeddings import embed_texts

    items = PreparedDataset.load(tiny_synthetic).items
    item_idx, embeddings = FeatureClient(synthetic_repo).item_embeddings()
    assert item_idx.tolist() == list(range(1, len(items) + 1))
    assert embeddings.shape == (len(items), model_dim()) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, embed_texts(items["text"].tolist()), atol=1e-6)  # same vectors, cached
    build = json.loads((synthetic_repo / "data" / "build.json").read_text())
    assert build["embedding_dim"] == model_dim() and build["counts"]["items"] == len(items)


def test_live_sequences_add_logged_events_in_time_order_and_mirror_them_online(synthetic_repo, tiny_synthetic,
                                                                              tmp_path):
    dataset = PreparedDataset.load(tiny_synthetic)
    client = FeatureClient(synthetic_repo)
    live = LiveSequences(client, EventLog(f"sqlite:///{tmp_path / 'events.db'}"))
    user, (a, b) = dataset.interactions["user_id"].iloc[-1], dataset.items.iloc[:2].itertuples()
    before = client.snapshot_sequences([user])[0]
    now = datetime.now(timezone.utc)
    live.record([Event(user, b.item_id, now)])
    _, lengths = live.record([Event(user, a.item_id, now - timedelta(hours=1)), Event("brand-new", a.item_id, now)])
    expected = (before + [a.item_idx, b.item_idx])[-SHORT:]  # the late event is placed before the other one
    assert lengths == {user: len(expected), "brand-new": 1}
    assert live.histories([user, "brand-new", "nobody"]) == [expected, [a.item_idx], []]
    assert client.current_sequences([user, "brand-new"]) == [expected, [a.item_idx]]  # what Feast users see
    assert client.snapshot_sequences([user]) == [before]  # the build itself never changes
    # a newer build that saw these events (its cutoff) adds none of them twice
    live.after_seq = live.events.cutoff()
    assert live.histories([user]) == [before]


def test_builds_are_versioned_reused_and_never_overwritten(tiny_synthetic, tmp_path):
    root = tmp_path / "features"
    first = build_features(tiny_synthetic, root, FeatureParams(max_sequence_length=SHORT))
    again = build_features(tiny_synthetic, root, FeatureParams(max_sequence_length=SHORT))
    assert again == first  # the same key: reused, not rebuilt
    other = build_features(tiny_synthetic, root, FeatureParams(max_sequence_length=SHORT + 1))
    assert other["repo_dir"] != first["repo_dir"] and Path(first["repo_dir"]).is_dir()
    assert FeatureClient(first["repo_dir"]).max_sequence_length == SHORT  # the first build is intact
    unfinished = Path(other["repo_dir"])
    (unfinished / "data" / "build.json").unlink()  # as if a crash interrupted it
    rebuilt = build_features(tiny_synthetic, root, FeatureParams(max_sequence_length=SHORT + 1))
    assert rebuilt["build_key"] == other["build_key"] and FeatureClient(unfinished).max_sequence_length == SHORT + 1


def test_ml100k_features(ml100k_dir, tmp_path):
    prepare(SourceSpec("movielens", str(ml100k_dir)), tmp_path / "ml-100k")
    summary = build_features(tmp_path / "ml-100k", tmp_path / "features", FeatureParams())
    dataset = PreparedDataset.load(tmp_path / "ml-100k")
    # a snapshot per user and split cutoff: users x 3 rows of at most 200 items, not one per event (99,287)
    assert summary["counts"] == {"users": 943, "items": 1349, "sequence_rows": 943 * 3}
    stored = pd.read_parquet(summary["files"]["user_sequences"])
    assert stored["sequence_length"].sum() <= 943 * 3 * 200 and len(stored) == 943 * 3
    assert summary["embedding_dim"] == model_dim()
    client = FeatureClient(summary["repo_dir"])
    assert_sequences_match_feast(client, dataset, 200)
    assert client.snapshot_sequences(["99999"]) == [None]
    assert client.item_embeddings()[1].shape == (1349, model_dim())


@pytest.mark.skipif(not redis_reachable(), reason=f"no Redis server at {REDIS_HOST}:{REDIS_PORT}")
def test_redis_online_store(tiny_synthetic, tmp_path):
    params = FeatureParams(project=f"m2rec_test_{uuid.uuid4().hex[:8]}", online_store="redis",
                           redis_connection_string=f"{REDIS_HOST}:{REDIS_PORT}")
    repo = build_features(tiny_synthetic, tmp_path / "features", params)["repo_dir"]
    try:
        dataset = PreparedDataset.load(tiny_synthetic)
        client = FeatureClient(repo)
        assert client.store.config.online_store.type == "redis"
        assert_sequences_match_feast(client, dataset, params.max_sequence_length)
        live = LiveSequences(client, EventLog(f"sqlite:///{tmp_path / 'events.db'}"))
        user, item = dataset.interactions["user_id"].iloc[0], dataset.items.iloc[3]
        now = datetime.now(timezone.utc)
        live.record([Event(user, item["item_id"], now)])
        live.record([Event(user, item["item_id"], now - timedelta(minutes=5))])  # late: an older row time
        expected = dataset.user_sequences[0].tolist() + [int(item["item_idx"])] * 2
        assert live.histories([user]) == [expected]
        assert client.current_sequences([user, "nobody"]) == [expected, None]  # Redis kept the newer write
    finally:
        feature_store(repo).teardown()  # remove this project's keys
