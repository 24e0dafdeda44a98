"""Items added while serving: placed by their text, recommendable and accepted by events at once, seen by every
worker with the same item index, refused with the field at fault, and kept for the next retraining."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from test_registry import train_tiny_model

from m2rec.data.errors import DataError
from m2rec.events.log import EventLog
from m2rec.inference import Recommender, TextUnsupported
from m2rec.model.cold_start import TextToId
from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model, save_model
from m2rec.model.files import ITEMS_FILE
from m2rec.serving.core import Ranker
from m2rec.serving.items import ServedCatalog, failure_of
from m2rec.serving.schemas import EventIn, RankQuery


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("items")


@pytest.fixture(scope="module")
def model_dir(tiny_synthetic, workspace) -> Path:
    return train_tiny_model(tiny_synthetic, workspace / "model", epochs=1)


@pytest.fixture(scope="module")
def feature_repo(tiny_synthetic, workspace) -> Path:
    from m2rec.stages.features import build_features

    return Path(build_features(tiny_synthetic, workspace / "features")["repo_dir"])


@pytest.fixture
def events_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'events.db'}"


def text_of(model_dir: Path, item_idx: int) -> str:
    items = pd.read_parquet(model_dir / ITEMS_FILE)
    return items.loc[items["item_idx"] == item_idx, "text"].item()


def test_an_added_item_is_ranked_by_its_text_and_accepted_by_events(model_dir, feature_repo, events_url,
                                                                     tiny_synthetic):
    ranker = Ranker(model_dir, feature_repo, "m2rec v1", EventLog(events_url))
    recommender = ranker.recommender
    before = recommender.num_items
    added = ranker.add_item("new-1", text_of(model_dir, 3), "A new item")
    assert added.failure is None and added.response.item_count == before + 1 and added.response.title == "A new item"
    new = recommender.index_of["new-1"]
    assert new == before + 1 and ranker.features.item_index["new-1"] == new
    model = recommender.model
    with torch.no_grad():  # no trained ID embedding: the one item 3's text predicts, plus that text's projection
        trained_ids = model.item_embedding.weight[1:before + 1]  # (I, H)
        predicted = TextToId.fit(trained_ids, model.item_text[1:before + 1], recommender.train_counts[1:])(
            model.item_text[3:4])[0]
        placed = predicted + model.text_output(model.item_text[3])  # (H,)
    torch.testing.assert_close(recommender.item_matrix[new], placed)
    assert not torch.allclose(predicted, torch.zeros_like(predicted))

    history = [1, 2, 4]
    ranked = recommender.recommend([history], k=recommender.num_items, exclude_seen=False)[0]
    with torch.no_grad():
        hidden = model.last_hidden(torch.tensor([history]), torch.tensor([3]))[0]
    assert "new-1" in ranked.item_ids
    assert ranked.scores[ranked.item_ids.index("new-1")] == pytest.approx(float(hidden @ placed), abs=1e-5)

    by_history, = ranker.rank([RankQuery(item_ids=["new-1"], k=5, exclude_seen=True)])  # as input, too
    assert by_history.failure is None and "new-1" not in [i.item_id for i in by_history.response.items]
    user = pd.read_parquet(tiny_synthetic / "interactions.parquet")["user_id"].iloc[0]
    recorded = ranker.record_events([EventIn(user_id=user, item_id="new-1")])
    assert recorded.failure is None and recorded.response.events[0].item_id == "new-1"
    assert ranker.sequences.histories([user])[0][-1] == new


def test_every_worker_sees_an_added_item_with_the_same_index(model_dir, events_url):
    first = ServedCatalog(Recommender(model_dir), EventLog(events_url))
    second = ServedCatalog(Recommender(model_dir), EventLog(events_url))  # another worker, started before the adds
    first.add("new-a", "a quiet documentary about bees")
    first.add("new-b", "a loud action film")
    # an unknown id makes the second worker look at the items table at once
    assert second.recommender.to_indices(["new-b", "new-a"]) == first.recommender.to_indices(["new-b", "new-a"])
    torch.testing.assert_close(second.recommender.item_matrix, first.recommender.item_matrix)
    late = ServedCatalog(Recommender(model_dir), EventLog(events_url))  # a worker (or version) started after
    late.sync()
    assert late.recommender.index_of["new-b"] == first.recommender.index_of["new-b"]


def test_an_unreachable_items_table_does_not_stop_ranking(model_dir):
    recommender = Recommender(model_dir)

    def unreachable() -> None:
        raise ConnectionError("event log down")

    recommender.sync_catalog = unreachable
    assert len(recommender.recommend([[1, 2]], k=3)[0].item_ids) == 3
    with pytest.raises(DataError, match="unknown item id"):
        recommender.to_indices(["no-such-item"])


def test_bad_adds_are_refused_naming_the_field(model_dir, events_url, workspace):
    catalog = ServedCatalog(Recommender(model_dir), EventLog(events_url))
    catalog.add("new-1", "some text")
    known = str(catalog.recommender.item_ids[1])
    for item_id, text, status, field in [("new-2", "  ", 400, "text"), ("new-1", "other text", 409, "item_id"),
                                         (known, "other text", 409, "item_id")]:
        with pytest.raises(Exception) as refused:
            catalog.add(item_id, text)
        failure = failure_of(refused.value)
        assert (failure.status, failure.field) == (status, field)
        assert (item_id if field == "item_id" else "text is empty") in failure.message
    assert [i.item_id for i in catalog.events.items_after(0)] == ["new-1"]  # nothing refused was logged

    no_text = workspace / "sasrec"
    sasrec = build_model("sasrec", catalog.recommender.num_items - 1, ModelParams(hidden_size=16, max_length=20))
    save_model(no_text, sasrec, ModelParams(hidden_size=16, max_length=20), {"text_model": None})
    shutil.copy(model_dir / ITEMS_FILE, no_text / ITEMS_FILE)
    with pytest.raises(TextUnsupported) as refused:
        ServedCatalog(Recommender(no_text), EventLog(events_url)).add("new-3", "text")
    failure = failure_of(refused.value)
    assert (failure.status, failure.field) == (409, "text") and "no text branch" in failure.message
