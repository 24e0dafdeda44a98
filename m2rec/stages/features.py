"""Stage: item text embeddings and user sequences -> Feast offline tables -> `feast apply` -> online store, as a
new build of its own under the feature root (never over the build a service reads). The user sequence table is
written in this process or, with `spark.enabled`, by a Spark job (the same rows); the item table, one row per
catalog item, always here."""

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
import pyarrow.compute as pc
import pyarrow.dataset as ds

from m2rec.data.prepared import INTERACTIONS_FILE, load_catalog
from m2rec.features.repo import FeatureParams, build_key, feast_apply, feature_store, write_repo
from m2rec.features.store import BUILD_FILE
from m2rec.features.tables import (
    ITEM_FEATURES_FILE,
    USER_SEQUENCES_FILE,
    item_feature_table,
    user_sequence_table,
    write_table,
)
from m2rec.spark.session import SparkParams, spark_session, use_java
from m2rec.text.embeddings import TextEncoderParams, embed_texts
from m2rec.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


def build_features(data_dir: str | Path, feature_root: str | Path | None = None, params: FeatureParams | None = None,
                   text: TextEncoderParams | None = None, spark: SparkParams | None = None) -> dict:
    """Build the features of the tables in `data_dir` into `<feature_root>/<build key>` (default root:
    `params.root`) and materialize them; return counts, paths and timings (also `<build>/data/build.json`). With
    `spark.enabled` the user sequence table is a Spark job (`spark` also configures the session of Feast's Spark
    offline store, `params.offline_store`).

    A finished build of the same key (same dataset version and settings, whichever engine) is reused as it is; a
    build left unfinished by a crash is removed first. No other build is touched."""
    params, text, spark = params or FeatureParams(), text or TextEncoderParams(), spark or SparkParams()
    items, stats = load_catalog(data_dir)
    key = build_key(stats["dataset_version"], params, text.model)
    repo_dir = Path(feature_root or params.root) / key
    done = repo_dir / "data" / BUILD_FILE
    if done.is_file():
        log.info("feature build %s exists: reusing it", repo_dir)
        return json.loads(done.read_text())
    if repo_dir.exists():
        _remove_unfinished(repo_dir)
    data = write_repo(repo_dir, params, key, spark)
    if params.offline_store == "spark":
        use_java(spark.java_home)  # for `feast apply` and materialize, which start or use a Spark session
    timings: dict[str, float] = {}

    start = time.perf_counter()
    log.info("embedding %d item texts with %s", len(items), text.model)
    embeddings = embed_texts(items["text"].tolist(), text)  # (N, dim)
    timings["embed_s"] = time.perf_counter() - start

    start = time.perf_counter()
    engine = "spark" if spark.enabled else "pandas"
    write_user_sequences(Path(data_dir) / INTERACTIONS_FILE, data / USER_SEQUENCES_FILE,
                         params.max_sequence_length, spark)
    first_event = first_event_time(Path(data_dir) / INTERACTIONS_FILE)
    # item features hold from the first event on, so every point-in-time lookup in the data's span finds them
    write_table(item_feature_table(items, embeddings, first_event), data / ITEM_FEATURES_FILE)
    sequence_times = ds.dataset(data / USER_SEQUENCES_FILE, format="parquet").to_table(columns=["event_timestamp"])
    sequence_rows = sequence_times.num_rows
    timings["tables_s"] = time.perf_counter() - start
    log.info("wrote %d sequence rows (%s) and %d item rows to %s", sequence_rows, engine, len(items), data)

    start = time.perf_counter()
    log.info("feast apply in %s (online store: %s, offline store: %s)", repo_dir, params.online_store,
             params.offline_store)
    feast_apply(repo_dir)
    timings["apply_s"] = time.perf_counter() - start

    start = time.perf_counter()
    last_event = pd.Timestamp(pc.max(sequence_times.column("event_timestamp")).as_py())
    num_users = int(stats["after_filter"]["users"])
    log.info("materializing %d users and %d items to the %s online store", num_users, len(items),
             params.online_store)
    with contextlib.redirect_stdout(sys.stderr):  # Feast prints its progress; stdout is for results
        feature_store(repo_dir).materialize(first_event.to_pydatetime(),
                                            (last_event + pd.Timedelta(seconds=1)).to_pydatetime())
    timings["materialize_s"] = time.perf_counter() - start

    summary = {
        "build_key": key,
        "data_dir": str(data_dir),
        "dataset_version": stats.get("dataset_version"),
        "events_through_seq": int((stats.get("events") or {}).get("through_seq", 0)),
        "repo_dir": str(repo_dir),
        "params": asdict(params),
        "engine": engine,
        "text_model": text.model,
        "embedding_dim": int(embeddings.shape[1]),
        "counts": {"users": num_users, "items": len(items), "sequence_rows": sequence_rows},
        "files": {"user_sequences": str(data / USER_SEQUENCES_FILE), "item_features": str(data / ITEM_FEATURES_FILE)},
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }
    atomic_write_json(done, summary)  # last: a build without it is unfinished
    log.info("features built in %s: %s", repo_dir, ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return summary


def write_user_sequences(interactions: Path, path: Path, max_length: int, spark: SparkParams) -> None:
    """The user sequence table (`m2rec.features.tables.user_sequence_table`) of the prepared `interactions`,
    written to `path`: by a Spark job with `spark.enabled` (a folder of parquet parts), else here (one file)."""
    if spark.enabled:
        from m2rec.spark.features import write_user_sequences_spark

        write_user_sequences_spark(spark_session(spark), interactions, path, max_length)
    else:
        write_table(user_sequence_table(pd.read_parquet(interactions), max_length), path)


def first_event_time(interactions: Path) -> pd.Timestamp:
    """The earliest event time of the prepared `interactions`, read a column chunk at a time."""
    dataset = ds.dataset(interactions, format="parquet")
    first = min(batch.column("timestamp").to_pandas().min()
                for batch in dataset.to_batches(columns=["timestamp"]) if batch.num_rows)
    return pd.Timestamp(first).tz_convert("UTC")


def _remove_unfinished(repo_dir: Path) -> None:
    """Remove what a crashed build left: its online rows (its own project's keys) and its folder."""
    log.warning("removing the unfinished feature build %s", repo_dir)
    if (repo_dir / "data" / "registry.db").exists():
        try:
            feature_store(repo_dir).teardown()
        except Exception as err:  # the registry itself may be what the crash left broken
            log.warning("could not tear down the unfinished build's online store: %s", err)
    shutil.rmtree(repo_dir)

