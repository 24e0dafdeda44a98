"""Turn a RawDataset into the canonical tables: k-core filter, contiguous ids, leave-one-out split by time."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable
from typing import Annotated

import numpy as np
import pandas as pd
from annotated_types import Ge

from m2rec.errors import ConfigError, DataError
from m2rec.data.schema import SPLITS, RawDataset
from m2rec.utils.atomic import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)


@dataclass
class PrepareParams:
    """How raw interactions are filtered and split."""

    k_core_users: Annotated[int, Ge(3)] = 5  # every user keeps at least this many interactions
    k_core_items: Annotated[int, Ge(1)] = 5  # every item keeps at least this many interactions
    drop_duplicates: bool = False  # drop repeated (user, item, timestamp) rows instead of failing


def _counts(frame: pd.DataFrame) -> dict[str, int]:
    return {
        "interactions": int(len(frame)),
        "users": int(frame["user_id"].nunique()),
        "items": int(frame["item_id"].nunique()),
    }


def k_core_filter(interactions: pd.DataFrame, k_users: int, k_items: int) -> tuple[pd.DataFrame, int]:
    """Drop users and items with too few interactions, repeating until stable; return the rows and rounds."""
    frame = interactions
    rounds = 0
    while True:
        rounds += 1
        user_counts = frame["user_id"].map(frame["user_id"].value_counts())
        item_counts = frame["item_id"].map(frame["item_id"].value_counts())
        keep = (user_counts >= k_users) & (item_counts >= k_items)
        if keep.all():
            return frame, rounds
        frame = frame[keep]


def _natural_order(ids: pd.Series) -> np.ndarray:
    """Unique ids sorted numerically when they are all integers, else as strings."""
    unique = ids.unique()
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    if numeric.notna().all():
        return unique[np.argsort(numeric.to_numpy(), kind="stable")]
    return np.sort(unique)


def _check_duplicates(interactions: pd.DataFrame, drop: bool) -> pd.DataFrame:
    duplicated = interactions.duplicated(["user_id", "item_id", "timestamp"])
    if not duplicated.any():
        return interactions
    if drop:
        log.warning("dropping %d duplicate (user_id, item_id, timestamp) rows", int(duplicated.sum()))
        return interactions[~duplicated]
    first = interactions[duplicated].iloc[0]
    raise DataError(
        f"{int(duplicated.sum())} duplicate (user_id, item_id, timestamp) rows, e.g. user {first.user_id}, "
        f"item {first.item_id} at {first.timestamp}",
        "remove the repeated rows, or pass --drop-duplicates to keep one of each",
    )


def fingerprint(chunks: Iterable[pd.DataFrame]) -> str:
    """A content hash of a table given in consecutive chunks of rows (stable across parquet versions and however
    the rows are chunked), used as the dataset version."""
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(pd.util.hash_pandas_object(chunk, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def catalog_table(raw_items: pd.DataFrame, item_order: np.ndarray) -> tuple[pd.DataFrame, int]:
    """items.parquet: the source's items in `item_order` with item_idx 1..N, and how many have no text."""
    catalog = raw_items.drop_duplicates("item_id").set_index("item_id")
    items = catalog.reindex(item_order).reset_index().rename(columns={"index": "item_id"})
    missing_text = items["text"].isna() | (items["text"].astype(str).str.strip() == "")
    items["text"] = items["text"].fillna("").astype(str)
    items.insert(1, "item_idx", np.arange(1, len(item_order) + 1))
    return items, int(missing_text.sum())


def tables_stats(source: str, timestamps_synthetic: bool, params: PrepareParams, before: dict, after: dict,
                 rounds: int, split: dict, items_without_text: int, dataset_version: str) -> dict:
    """stats.json of a prepared dataset, whichever engine made it."""
    return {
        "source": source, "timestamps_synthetic": timestamps_synthetic, "params": asdict(params),
        "before_filter": before, "after_filter": after, "k_core_rounds": rounds,
        "split": {str(k): int(v) for k, v in sorted(split.items(), key=lambda kv: SPLITS.index(str(kv[0])))},
        "items_without_text": items_without_text, "dataset_version": dataset_version,
    }


def build_tables(raw: RawDataset, params: PrepareParams) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Filter, index and split `raw`; return (interactions, items, stats)."""
    if params.k_core_users < 3:
        raise ConfigError(f"k_core_users={params.k_core_users} leaves users too short for a train/valid/test split",
                        "use --k-core-users 3 or more")
    interactions = raw.interactions.reset_index(drop=True)
    if interactions.empty:
        raise DataError("the input has no interactions", "point --input at a dataset with rows")
    before = _counts(interactions)
    interactions = _check_duplicates(interactions, params.drop_duplicates)
    filtered, rounds = k_core_filter(interactions, params.k_core_users, params.k_core_items)
    if filtered.empty:
        raise DataError(
            f"no interactions left after {params.k_core_users}/{params.k_core_items}-core filtering "
            f"(input: {before['interactions']} interactions, {before['users']} users, {before['items']} items)",
            "lower --k-core-users / --k-core-items or use a larger dataset",
        )
    user_order = _natural_order(filtered["user_id"])
    item_order = _natural_order(filtered["item_id"])
    user_index = pd.Series(np.arange(1, len(user_order) + 1), index=user_order)  # 0 is padding
    item_index = pd.Series(np.arange(1, len(item_order) + 1), index=item_order)
    table = filtered.assign(
        user_idx=filtered["user_id"].map(user_index).to_numpy(),
        item_idx=filtered["item_id"].map(item_index).to_numpy(),
    )
    # stable sort keeps the source's order for equal timestamps
    table = table.sort_values(["user_idx", "timestamp"], kind="stable").reset_index(drop=True)
    from_end = table.groupby("user_idx").cumcount(ascending=False).to_numpy()
    table["split"] = pd.Categorical(np.select([from_end == 0, from_end == 1], ["test", "valid"], "train"),
                                    categories=["train", "valid", "test"])
    table = table[["user_id", "item_id", "timestamp", "user_idx", "item_idx", "split"]]

    items, missing_text = catalog_table(raw.items, item_order)

    stats = tables_stats(raw.source, raw.timestamps_synthetic, params, before, _counts(table), rounds,
                         table["split"].value_counts().sort_index().to_dict(), missing_text,
                         fingerprint([table[["user_id", "item_id", "timestamp"]]]))
    return table, items, stats


def write_tables(output: Path, interactions: pd.DataFrame, items: pd.DataFrame, stats: dict) -> None:
    """Write the three files into `output` atomically (all or nothing)."""
    with atomic_directory(output) as staging:
        interactions.to_parquet(staging / "interactions.parquet", index=False)
        items.to_parquet(staging / "items.parquet", index=False)
        atomic_write_json(staging / "stats.json", stats)
