"""Features through Feast: the offline tables, apply + materialize + online lookup + push on the synthetic default
(built through the CLI), on ml-100k, and on a real Redis online store."""

from __future__ import annotations

import json
import socket
import uuid

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from m2rec.data.errors import DataError
from m2rec.data.prepared import PreparedDataset
from m2rec.data.sources import SourceSpec
from m2rec.features.repo import FeatureParams, feature_store, write_repo
from m2rec.features.store import FeatureClient
from m2rec.features.tables import split_cutoffs, user_sequence_table
from m2rec.stages.features import build_features
from m2rec.stages.prepare import prepare
from m2rec.text.embeddings import TextEncoderParams, resolve_model_path

REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
SHORT = 20  # max_sequence_length of the synthetic build: shorter than its longest users, so windows are cut


def model_dim() -> int:
    from transformers import AutoConfig

    return int(AutoConfig.from_pretrained(resolve_model_path(TextEncoderParams().model)).hidden_size)


def assert_sequences_match_feast(client: FeatureClient, dataset: PreparedDataset, max_length: int) -> None:
    """Online: each user's full history; offline at the train cutoff: the training sequence (point in time)."""
    users = dataset.interactions.drop_duplicates("user_idx").sort_values("user_idx")["user_id"].tolist()
    online = client.user_sequences(users)
    assert online == [seq[-max_length:].tolist() for seq in dataset.user_sequences]
    train = client.training_sequences(split_cutoffs(dataset.interactions, "train"))
    assert train["user_idx"].tolist() == list(range(1, dataset.num_users + 1))
    assert [list(seq) for seq in train["item_sequence"]] == [seq[-max_length:].tolist()
                                                             for seq in dataset.train_sequences()]


@pytest.fixture(scope="module")
def synthetic_repo(tiny_synthetic, tmp_path_factory):
    """The tiny synthetic dataset built as a user would: `m2rec features build`."""
    from m2rec.cli import cli

    repo = tmp_path_factory.mktemp("features") / "repo"
    result = CliRunner().invoke(cli, ["features", "build", "--data", str(tiny_synthetic), "--repo", str(repo),
                                      "--max-sequence-length", str(SHORT)])
    assert result.exit_code == 0, result.output
    return repo


def test_sequence_table_keeps_the_recent_window_and_orders_ties():
    interactions = pd.DataFrame({
        "user_id": ["a"] * 4 + ["b"] * 2,
        "user_idx": [1] * 4 + [2] * 2,
        "item_idx": [5, 6, 7, 8, 9, 5],
        "timestamp": pd.to_datetime([10, 20, 20, 30, 10, 10], unit="s", utc=True),
    })
    table = user_sequence_table(interactions, max_length=2).to_pandas()
    assert [list(s) for s in table["item_sequence"]] == [[5], [5, 6], [6, 7], [7, 8], [9], [9, 5]]
    assert table["sequence_length"].tolist() == [1, 2, 2, 2, 1, 2]
    # events in the same second get distinct, ordered times (1 µs apart); the last event time stays the real one
    assert (table["event_timestamp"] - table["last_event_time"]).dt.total_seconds().mul(1e6).round().tolist() \
        == [0, 0, 1, 0, 0, 1]


def test_feast_apply_imports_only_the_definitions(tmp_path):
    from feast.repo_operations import get_repo_files

    repo = tmp_path / "repo"
    write_repo(repo, FeatureParams())
    for stray in ("scripts/workflow.py", "test_repo.py", "data/helper.py"):
        (repo / stray).parent.mkdir(exist_ok=True)
        (repo / stray).write_text("raise SystemExit('feast apply must not import this')\n")
    assert get_repo_files(repo) == [(repo / "definitions.py").resolve()]


def test_bad_feature_params_and_missing_build_are_clear_errors(tiny_synthetic, tmp_path):
    with pytest.raises(DataError, match="features.online_store='mongo'"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(online_store="mongo"))
    with pytest.raises(DataError, match="features.max_sequence_length=0"):
        build_features(tiny_synthetic, tmp_path / "repo", FeatureParams(max_sequence_length=0))
    with pytest.raises(DataError, match="run `m2rec features build"):
        FeatureClient(tmp_path / "nothing")


def test_synthetic_online_and_point_in_time_sequences(synthetic_repo, tiny_synthetic):
    dataset = PreparedDataset.load(tiny_synthetic)
    assert max(len(seq) for seq in dataset.user_sequences) > SHORT
    client = FeatureClient(synthetic_repo)
    assert_sequences_match_feast(client, dataset, SHORT)
    assert client.user_sequences(["nobody", dataset.interactions["user_id"].iloc[0]])[0] is None  # no history
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


def test_push_appends_to_the_online_sequence(synthetic_repo, tiny_synthetic):
    dataset = PreparedDataset.load(tiny_synthetic)
    client = FeatureClient(synthetic_repo)
    user, item = dataset.interactions["user_id"].iloc[-1], dataset.items.iloc[0]
    before = client.user_sequences([user])[0]
    after = client.push_event(user, item["item_id"])
    assert after == (before + [int(item["item_idx"])])[-SHORT:] and len(after) <= SHORT
    assert client.user_sequences([user]) == [after]
    assert client.push_event("brand-new-user", item["item_id"]) == [int(item["item_idx"])]
    with pytest.raises(DataError, match="unknown item_id 'no-such-item'"):
        client.push_event(user, "no-such-item")
    with pytest.raises(DataError, match="in time order"):
        client.push_event(user, item["item_id"], timestamp="2001-01-01")


def test_ml100k_features(ml100k_dir, tmp_path):
    prepare(SourceSpec("movielens", str(ml100k_dir)), tmp_path / "ml-100k")
    summary = build_features(tmp_path / "ml-100k", tmp_path / "repo", FeatureParams())
    dataset = PreparedDataset.load(tmp_path / "ml-100k")
    assert summary["counts"] == {"users": 943, "items": 1349, "sequence_rows": 99287}
    assert summary["embedding_dim"] == model_dim()
    client = FeatureClient(tmp_path / "repo")
    assert_sequences_match_feast(client, dataset, 200)
    assert client.user_sequences(["99999"]) == [None]
    assert client.item_embeddings()[1].shape == (1349, model_dim())


def redis_reachable() -> bool:
    try:
        socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.mark.skipif(not redis_reachable(), reason=f"no Redis server at {REDIS_HOST}:{REDIS_PORT}")
def test_redis_online_store(tiny_synthetic, tmp_path):
    params = FeatureParams(project=f"m2rec_test_{uuid.uuid4().hex[:8]}", online_store="redis",
                           redis_connection_string=f"{REDIS_HOST}:{REDIS_PORT}")
    build_features(tiny_synthetic, tmp_path / "repo", params)
    try:
        dataset = PreparedDataset.load(tiny_synthetic)
        client = FeatureClient(tmp_path / "repo")
        assert client.store.config.online_store.type == "redis"
        assert_sequences_match_feast(client, dataset, params.max_sequence_length)
        user, item = dataset.interactions["user_id"].iloc[0], dataset.items.iloc[3]
        pushed = client.push_event(user, item["item_id"])
        assert pushed == dataset.user_sequences[0].tolist() + [int(item["item_idx"])]
        assert client.user_sequences([user, "nobody"]) == [pushed, None]
    finally:
        feature_store(tmp_path / "repo").teardown()  # remove this project's keys
