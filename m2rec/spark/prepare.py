"""Stage prepare as a Spark job: read a `table` source (parquet or CSV, any size), merge logged events, k-core
filter, index and split, and write the same canonical tables as `m2rec.data.prepare` (the interactions as a
folder of parquet parts in user-then-time order; the item catalog, small, through pandas). Checks and messages are
the single-machine path's."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from m2rec.data.errors import DataError
from m2rec.data.prepare import (
    PrepareParams,
    _natural_order,
    catalog_table,
    fingerprint,
    tables_stats,
)
from m2rec.data.readers import parse_mapping, read_table_items, require_file
from m2rec.data.sources import SourceSpec
from m2rec.errors import ConfigError, UsageError
from m2rec.utils.atomic import atomic_directory, atomic_write_json

log = logging.getLogger(__name__)
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp"]
ROW = "_row"  # the source's row order: ties in time keep it, as the single-machine path's stable sort does


def read_table_source(spark, spec: SourceSpec):
    """(interactions DataFrame: user_id, item_id, timestamp, _row; items pandas DataFrame) of a `table` source."""
    from pyspark.sql import functions as F

    if spec.format != "table":
        raise UsageError(f"the Spark engine reads `table` sources, not {spec.format!r}",
                         "convert the source to parquet or CSV and pass --format table --columns ...")
    path = Path(spec.input).expanduser()
    require_file(path, "table", "point --input at a .parquet or .csv file")
    mapping = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"} | parse_mapping(
        spec.columns, "--columns")
    if path.suffix == ".parquet":
        frame = spark.read.parquet(str(path))
    else:
        frame = spark.read.option("header", True).option("encoding", spec.encoding or "utf-8").csv(str(path))
    for canonical, source in mapping.items():
        if source not in frame.columns:
            raise DataError(f"column {source!r} (for {canonical}) not found; columns are {frame.columns}",
                            f"pass --columns {canonical}=<column name>", path=str(path))
    frame = frame.withColumn(ROW, F.monotonically_increasing_id())
    raw_time = F.col(mapping["timestamp"])
    if dict(frame.dtypes)[mapping["timestamp"]].startswith("timestamp"):
        time = raw_time
    else:
        seconds = raw_time.try_cast("double")  # NULL where not a number
        bad = frame.filter(raw_time.isNotNull() & seconds.isNull()).select(raw_time).first()
        if bad is not None:
            raise DataError(f"column {mapping['timestamp']!r} has a value that is not unix seconds: {bad[0]!r}",
                            "repair or delete that row (the Spark engine reads times as unix seconds)",
                            path=str(path))
        negative = frame.filter(seconds < 0).select(seconds).first()
        if negative is not None:
            raise DataError(f"column {mapping['timestamp']!r} must be a non-negative unix time in seconds, found "
                            f"{negative[0]:g}", "repair or delete that line", path=str(path))
        time = F.timestamp_seconds(seconds)
    interactions = frame.select(F.col(mapping["user_id"]).cast("string").alias("user_id"),
                                F.col(mapping["item_id"]).cast("string").alias("item_id"),
                                time.alias("timestamp"), ROW)
    item_ids = np.array([r[0] for r in interactions.select("item_id").distinct().collect()], dtype=object)
    items = read_table_items(Path(spec.items).expanduser() if spec.items else None, spec.item_columns,
                             spec.encoding, item_ids)
    return interactions, items


def with_logged_events(spark, interactions, items: pd.DataFrame, events_url: str | None):
    """`interactions` plus every event logged at `events_url` up to now (after the source's rows), and the facts
    for the lineage; the same merge as the single-machine path."""
    from m2rec.data.schema import RawDataset
    from m2rec.events.log import EventLog
    from m2rec.events.retraining import merge_logged_events
    from pyspark.sql import functions as F

    if not events_url:
        return interactions, {"through_seq": 0, "merged": 0}
    empty = pd.DataFrame({"user_id": pd.Series(dtype=str), "item_id": pd.Series(dtype=str),
                          "timestamp": pd.Series(dtype="datetime64[ns, UTC]")})
    merged, facts = merge_logged_events(RawDataset(empty, items, "events"), EventLog(events_url))
    if merged.interactions.empty:
        return interactions, facts
    start = interactions.agg(F.max(ROW)).first()[0] + 1
    rows = merged.interactions.assign(**{ROW: np.arange(start, start + len(merged.interactions))})
    logged = spark.createDataFrame(rows)
    return interactions.unionByName(logged.select(*INTERACTION_COLUMNS, ROW)), facts


def _counts(frame) -> dict[str, int]:
    from pyspark.sql import functions as F

    row = frame.agg(F.count("*"), F.countDistinct("user_id"), F.countDistinct("item_id")).first()
    return {"interactions": int(row[0]), "users": int(row[1]), "items": int(row[2])}


def _without_duplicates(frame, drop: bool):
    """The single-machine duplicate rule: an error naming an example, or with `drop` the first of each kept."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    first = Window.partitionBy(*INTERACTION_COLUMNS).orderBy(ROW)
    ranked = frame.withColumn("_copy", F.row_number().over(first))
    duplicates = ranked.filter(F.col("_copy") > 1)
    example = duplicates.orderBy(ROW).first()
    if example is None:
        return frame
    count = duplicates.count()
    if not drop:
        raise DataError(f"{count} duplicate (user_id, item_id, timestamp) rows, e.g. user {example.user_id}, item "
                        f"{example.item_id} at {pd.Timestamp(example.timestamp, tz='UTC')}",
                        "remove the repeated rows, or pass --drop-duplicates to keep one of each")
    log.warning("dropping %d duplicate (user_id, item_id, timestamp) rows", count)
    return ranked.filter(F.col("_copy") == 1).drop("_copy")


def k_core(frame, k_users: int, k_items: int):
    """Iterative k-core filter, as `m2rec.data.prepare.k_core_filter`: (rows, rounds)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    rounds, size = 0, frame.count()
    while True:
        rounds += 1
        counted = (frame.withColumn("_per_user", F.count("*").over(Window.partitionBy("user_id")))
                   .withColumn("_per_item", F.count("*").over(Window.partitionBy("item_id"))))
        kept = (counted.filter((F.col("_per_user") >= k_users) & (F.col("_per_item") >= k_items))
                .drop("_per_user", "_per_item"))
        kept = kept.localCheckpoint()  # cut the lineage that grows with every round
        kept_size = kept.count()
        if kept_size == size:
            return kept, rounds
        frame, size = kept, kept_size


def _index(spark, frame, column: str) -> tuple[np.ndarray, object]:
    """The natural order of `column`'s ids (the single-machine rule) and a DataFrame id -> index (1..N)."""
    ids = pd.Series([r[0] for r in frame.select(column).distinct().collect()], dtype=object)
    order = _natural_order(ids)
    index = pd.DataFrame({column: order, f"{column.removesuffix('_id')}_idx": np.arange(1, len(order) + 1)})
    return order, spark.createDataFrame(index)


def prepare_spark(spark, source: SourceSpec, output: str | Path, params: PrepareParams | None = None,
                  events_url: str | None = None) -> dict:
    """Prepare a `table` source (plus logged events) with Spark into `output`; return its stats, equal to what
    `m2rec.stages.prepare.prepare` writes for the same input."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    params = params or PrepareParams()
    if params.k_core_users < 3:
        raise ConfigError(f"k_core_users={params.k_core_users} leaves users too short for a train/valid/test split",
                          "use --k-core-users 3 or more")
    interactions, raw_items = read_table_source(spark, source)
    interactions, events = with_logged_events(spark, interactions, raw_items, events_url)
    before = _counts(interactions)
    if before["interactions"] == 0:
        raise DataError("the input has no interactions", "point --input at a dataset with rows")
    filtered, rounds = k_core(_without_duplicates(interactions, params.drop_duplicates), params.k_core_users,
                              params.k_core_items)
    after = _counts(filtered)
    if after["interactions"] == 0:
        raise DataError(
            f"no interactions left after {params.k_core_users}/{params.k_core_items}-core filtering "
            f"(input: {before['interactions']} interactions, {before['users']} users, {before['items']} items)",
            "lower --k-core-users / --k-core-items or use a larger dataset")
    _, users = _index(spark, filtered, "user_id")
    item_order, items_index = _index(spark, filtered, "item_id")
    latest_first = Window.partitionBy("user_idx").orderBy(F.col("timestamp").desc(), F.col(ROW).desc())
    table = (filtered.join(F.broadcast(users), "user_id").join(F.broadcast(items_index), "item_id")
             .withColumn("_from_end", F.row_number().over(latest_first))
             .withColumn("split", F.when(F.col("_from_end") == 1, "test").when(F.col("_from_end") == 2, "valid")
                         .otherwise("train"))
             .orderBy("user_idx", "timestamp", ROW)
             .select("user_id", "item_id", "timestamp", "user_idx", "item_idx", "split"))
    items, missing_text = catalog_table(raw_items, item_order)
    with atomic_directory(output) as staging:
        table.write.parquet(str(staging / "interactions.parquet"))
        items.to_parquet(staging / "items.parquet", index=False)
        written = ds.dataset(staging / "interactions.parquet", format="parquet")
        split = {row["split"]: row["count"] for row in table.groupBy("split").count().collect()}
        stats = tables_stats(f"table:{Path(source.input).name}", False, params, before, after, rounds, split,
                             missing_text, fingerprint(_canonical_chunks(written)))
        stats["events"] = events
        atomic_write_json(staging / "stats.json", stats)
    log.info("wrote %s with Spark: %d interactions, %d users, %d items", output, after["interactions"],
             after["users"], after["items"])
    return stats


def _canonical_chunks(dataset: ds.Dataset):
    """The written rows' (user_id, item_id, timestamp) in order, chunk by chunk, typed as the single-machine tables
    are (nanosecond UTC times), so the dataset version hashes the same."""
    for batch in dataset.to_batches(columns=INTERACTION_COLUMNS):
        chunk = batch.to_pandas()
        yield chunk.assign(timestamp=chunk["timestamp"].astype("datetime64[ns, UTC]"))
