"""Stage: item text embeddings and user sequences -> Feast offline tables -> `feast apply` -> online store."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from m2rec.data.prepared import PreparedDataset
from m2rec.features.repo import FeatureParams, feast_apply, feature_store, write_repo
from m2rec.features.store import BUILD_FILE
from m2rec.features.tables import (
    ITEM_FEATURES_FILE,
    USER_SEQUENCES_FILE,
    item_feature_table,
    user_sequence_table,
    write_table,
)
from m2rec.text.embeddings import TextEncoderParams, embed_texts
from m2rec.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


def build_features(data_dir: str | Path, repo_dir: str | Path, params: FeatureParams | None = None,
                   text: TextEncoderParams | None = None) -> dict:
    """Build the features of the tables in `data_dir` into the Feast repository `repo_dir` (replacing an earlier
    build there) and materialize them; return counts, paths and timings (also in `<repo_dir>/data/build.json`)."""
    params, text = params or FeatureParams(), text or TextEncoderParams()
    dataset = PreparedDataset.load(data_dir)
    repo_dir = Path(repo_dir)
    data = write_repo(repo_dir, params)
    timings: dict[str, float] = {}

    start = time.perf_counter()
    log.info("embedding %d item texts with %s", len(dataset.items), text.model)
    embeddings = embed_texts(dataset.items["text"].tolist(), text)  # (N, dim)
    timings["embed_s"] = time.perf_counter() - start

    start = time.perf_counter()
    first_event = dataset.interactions["timestamp"].min()
    sequences = user_sequence_table(dataset.interactions, params.max_sequence_length)
    write_table(sequences, data / USER_SEQUENCES_FILE)
    # item features hold from the first event on, so every point-in-time lookup in the data's span finds them
    write_table(item_feature_table(dataset.items, embeddings, first_event), data / ITEM_FEATURES_FILE)
    timings["tables_s"] = time.perf_counter() - start
    log.info("wrote %d sequence rows and %d item rows to %s", sequences.num_rows, len(dataset.items), data)

    start = time.perf_counter()
    if (data / "registry.db").exists():  # a build replaces the last one, stale users included
        previous = feature_store(repo_dir)
        previous.teardown()  # the online store: the SQLite file, or the project's Redis keys
        previous.registry.teardown()  # else `feast apply` sees "no changes" and creates no tables
    log.info("feast apply in %s (online store: %s)", repo_dir, params.online_store)
    feast_apply(repo_dir)
    timings["apply_s"] = time.perf_counter() - start

    start = time.perf_counter()
    last_event = pd.Timestamp(sequences.column("event_timestamp").to_pandas().max())
    log.info("materializing %d users and %d items to the %s online store", dataset.num_users,
             len(dataset.items), params.online_store)
    feature_store(repo_dir).materialize(first_event.to_pydatetime(),
                                        (last_event + pd.Timedelta(seconds=1)).to_pydatetime())
    timings["materialize_s"] = time.perf_counter() - start

    summary = {
        "data_dir": str(data_dir),
        "dataset_version": dataset.stats.get("dataset_version"),
        "repo_dir": str(repo_dir),
        "params": asdict(params),
        "text_model": text.model,
        "embedding_dim": int(embeddings.shape[1]),
        "counts": {"users": dataset.num_users, "items": len(dataset.items),
                   "sequence_rows": sequences.num_rows},
        "files": {"user_sequences": str(data / USER_SEQUENCES_FILE), "item_features": str(data / ITEM_FEATURES_FILE)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_json(data / BUILD_FILE, summary)
    log.info("features built in %s: %s", repo_dir, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return summary
