"""The offline feature tables Feast reads, built from the canonical tables.

`user_sequences.parquet` holds, for each user, a snapshot of the user's most recent `max_length` items (oldest
first) at each split cutoff: the last training event, the validation event and the test event, each stamped with
that event's time. A point-in-time lookup at a cutoff returns the user's history as of it (between cutoffs: as of
the latest cutoff before), and the latest row of each user, the one materialized online, is the user's full known
history (train + valid + test). Three snapshots per user, not one per event: the table grows with users x window.
`m2rec.spark.features` builds the same sequence table as a Spark job (`spark.enabled`, `--engine spark`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from m2rec.data.errors import DataError
from m2rec.data.schema import SPLITS

USER_SEQUENCES_FILE = "user_sequences.parquet"
ITEM_FEATURES_FILE = "item_features.parquet"


def in_event_order(interactions: pd.DataFrame) -> pd.DataFrame:
    """Rows by user, then time; the stable sort keeps the source's order for equal timestamps, as the split does."""
    return interactions.sort_values(["user_idx", "timestamp"], kind="stable")


def event_times(ordered: pd.DataFrame) -> pd.Series:
    """Each event's Feast time: its timestamp plus 1 µs per earlier event of the same user at the same instant.

    Datasets such as MovieLens log many events of a user in the same second; distinct times let a point-in-time
    lookup stop between them. `ordered` must be in `in_event_order`.
    """
    tie_rank = ordered.groupby(["user_idx", "timestamp"], sort=False).cumcount()  # (E,)
    return ordered["timestamp"] + pd.to_timedelta(tie_rank.to_numpy(), unit="us")


def _micro_timestamps(times: pd.Series) -> pa.Array:
    """UTC timestamps in microseconds: ibis cannot read DuckDB's nanosecond TIMESTAMPTZ_NS."""
    return pa.array(times.dt.tz_convert("UTC").astype("datetime64[us, UTC]"))


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """Consecutive slices of `values` with the given `lengths` as one arrow list column."""
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _window_columns(ordered: pd.DataFrame, rows: np.ndarray, max_length: int) -> dict[str, pa.Array]:
    """item_sequence and sequence_length of the windows ending at `rows` (positions in `ordered`): each the user's
    most recent `max_length` items up to and including that row, oldest first."""
    items = ordered["item_idx"].to_numpy(np.int64)  # (E,)
    users = ordered["user_idx"].to_numpy()
    position = np.arange(len(ordered))  # (E,)
    new_user = np.concatenate([[True], users[1:] != users[:-1]])
    user_start = np.maximum.accumulate(np.where(new_user, position, 0))[rows]  # (R,) first row of each row's user
    first = np.maximum(user_start, rows + 1 - max_length)  # (R,) first row of each window
    lengths = rows + 1 - first  # (R,)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    window_rows = np.repeat(first - offsets, lengths) + np.arange(int(lengths.sum()))  # windows, concatenated
    return {"item_sequence": _list_array(items[window_rows], lengths),
            "sequence_length": pa.array(lengths.astype(np.int64))}


def cutoff_rows(ordered: pd.DataFrame) -> np.ndarray:
    """Positions (in `ordered`) of each user's last event of every split: the train cutoff, the valid event and
    the test event, the user's latest. A user's history as of any of these is what training, evaluation and
    serving read."""
    users, splits = ordered["user_idx"].to_numpy(), ordered["split"].astype(str).to_numpy()
    last_of_run = np.concatenate([(users[1:] != users[:-1]) | (splits[1:] != splits[:-1]), [True]])
    return np.flatnonzero(last_of_run)


def user_sequence_table(interactions: pd.DataFrame, max_length: int) -> pa.Table:
    """One row per user and split cutoff (see `cutoff_rows`): user_id, event_timestamp, item_sequence,
    sequence_length, last_event_time. At most 3 x users rows of at most `max_length` items: the table grows with
    users x window, not with events x window."""
    ordered = in_event_order(interactions)
    rows = cutoff_rows(ordered)  # (R,)
    at_rows = ordered.iloc[rows]
    return pa.table({
        "user_id": pa.array(at_rows["user_id"].astype(str).to_numpy()),
        "event_timestamp": _micro_timestamps(event_times(ordered).iloc[rows]),
        **_window_columns(ordered, rows, max_length),
        "last_event_time": _micro_timestamps(at_rows["timestamp"]),
    })


def item_feature_table(items: pd.DataFrame, embeddings: np.ndarray, valid_from: pd.Timestamp) -> pa.Table:
    """One row per item: item_id, event_timestamp (= `valid_from`), item_idx, title, embedding (N, dim)."""
    title = items["title"].fillna(items["text"]) if "title" in items else items["text"]
    n, dim = embeddings.shape
    return pa.table({
        "item_id": pa.array(items["item_id"].astype(str).to_numpy()),
        "event_timestamp": _micro_timestamps(pd.Series(valid_from, index=items.index)),
        "item_idx": pa.array(items["item_idx"].to_numpy(np.int64)),
        "title": pa.array(title.astype(str).to_numpy()),
        "embedding": _list_array(embeddings.astype(np.float32).ravel(), np.full(n, dim)),
    })


def write_table(table: pa.Table, path: Path) -> None:
    """Write a feature table as parquet through a temporary file, so readers never see half of one."""
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def split_cutoffs(interactions: pd.DataFrame, split: str) -> pd.DataFrame:
    """Entity rows for `FeatureClient.training_sequences`: per user, user_id, user_idx and the event time of the
    user's last event in `split` or an earlier split (train: its training sequence; test: its whole history)."""
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}", f"use one of {', '.join(SPLITS)}")
    ordered = in_event_order(interactions)
    times = event_times(ordered)
    keep = ordered["split"].astype(str).isin(SPLITS[: SPLITS.index(split) + 1]).to_numpy()
    rows = ordered[keep].assign(event_timestamp=times[keep])
    return rows.drop_duplicates("user_idx", keep="last")[["user_id", "user_idx", "event_timestamp"]] \
        .reset_index(drop=True)
