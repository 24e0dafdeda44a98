"""Stage: item text embeddings and user sequences -> Feast offline tables -> `feast apply` -> online store, as a
new build of its own under the feature root (never over the build a service reads)."""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from m2rec.data.prepared import PreparedDataset
from m2rec.features.repo import FeatureParams, build_key, feast_apply, feature_store, write_repo
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


def build_features(data_dir: str | Path, feature_root: str | Path | None = None, params: FeatureParams | None = None,
                   text: TextEncoderParams | None = None) -> dict:
    """Build the features of the tables in `data_dir` into `<feature_root>/<build key>` (default root:
    `params.root`) and materialize them; return counts, paths and timings (also `<build>/data/build.json`).

    A finished build of the same key (same dataset version and settings) is reused as it is; a build left
    unfinished by a crash is removed first. No other build is touched."""
    params, text = params or FeatureParams(), text or TextEncoderParams()
    dataset = PreparedDataset.load(data_dir)
    key = build_key(dataset.stats["dataset_version"], params, text.model)
    repo_dir = Path(feature_root or params.root) / key
    done = repo_dir / "data" / BUILD_FILE
    if done.is_file():
        log.info("feature build %s exists: reusing it", repo_dir)
        return json.loads(done.read_text())
    if repo_dir.exists():
        _remove_unfinished(repo_dir)
    data = write_repo(repo_dir, params, key)
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
    log.info("feast apply in %s (online store: %s)", repo_dir, params.online_store)
    feast_apply(repo_dir)
    timings["apply_s"] = time.perf_counter() - start

    start = time.perf_counter()
    last_event = pd.Timestamp(sequences.column("event_timestamp").to_pandas().max())
    log.info("materializing %d users and %d items to the %s online store", dataset.num_users,
             len(dataset.items), params.online_store)
    with contextlib.redirect_stdout(sys.stderr):  # Feast prints its progress; stdout is for results
        feature_store(repo_dir).materialize(first_event.to_pydatetime(),
                                            (last_event + pd.Timedelta(seconds=1)).to_pydatetime())
    timings["materialize_s"] = time.perf_counter() - start

    summary = {
        "build_key": key,
        "data_dir": str(data_dir),
        "dataset_version": dataset.stats.get("dataset_version"),
        "events_through_seq": int((dataset.stats.get("events") or {}).get("through_seq", 0)),
        "repo_dir": str(repo_dir),
        "params": asdict(params),
        "text_model": text.model,
        "embedding_dim": int(embeddings.shape[1]),
        "counts": {"users": dataset.num_users, "items": len(dataset.items),
                   "sequence_rows": sequences.num_rows},
        "files": {"user_sequences": str(data / USER_SEQUENCES_FILE), "item_features": str(data / ITEM_FEATURES_FILE)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_json(done, summary)  # last: a build without it is unfinished
    log.info("features built in %s: %s", repo_dir, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return summary


def _remove_unfinished(repo_dir: Path) -> None:
    """Remove what a crashed build left: its online rows (its own project's keys) and its folder."""
    log.warning("removing the unfinished feature build %s", repo_dir)
    if (repo_dir / "data" / "registry.db").exists():
        try:
            feature_store(repo_dir).teardown()
        except Exception as err:  # the registry itself may be what the crash left broken
            log.warning("could not tear down the unfinished build's online store: %s", err)
    shutil.rmtree(repo_dir)

