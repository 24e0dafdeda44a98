"""The user sequence table as a Spark job over the prepared interactions: the same rows as
`m2rec.features.tables.user_sequence_table` (a snapshot of each user's most recent `max_length` items at each split
cutoff), written as a folder of parquet parts that both of Feast's offline stores used here (DuckDB, Spark) read.

No window is built per event: each event is sent only to the cutoffs whose window holds it (at most `max_length`
events before each of a user's at most 3 cutoffs), and each cutoff's events are gathered once, so the shuffled rows
are at most 3 x users x max_length, not events x max_length."""

from __future__ import annotations

import logging
from pathlib import Path

from m2rec.utils.atomic import atomic_directory

log = logging.getLogger(__name__)


def read_in_stored_order(spark, interactions: str | Path):
    """The prepared interactions (a parquet file or folder of parts) with `_file`, `_row`: their stored order,
    which for events of a user at the same instant is the order the single-machine path keeps (its stable sort)."""
    from pyspark.sql import functions as F

    # pandas writes nanosecond times, which Spark reads only as longs; Spark's own parts hold microseconds
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    frame = spark.read.parquet(str(interactions))
    time = F.col("timestamp")
    if dict(frame.dtypes)["timestamp"] in ("bigint", "long"):
        time = F.timestamp_micros(F.floor(time / 1000))  # the tables keep whole microseconds (`_micro_timestamps`)
    # parts are named in write order and pandas reads them sorted by path: (file, row in file) is the stored order
    return frame.select("user_id", "user_idx", "item_idx", time.alias("timestamp"), "split",
                        F.col("_metadata.file_path").alias("_file"), F.col("_metadata.row_index").alias("_row"))


def user_sequence_table(frame, max_length: int):
    """One row per user and split cutoff, by user then time: user_id, event_timestamp, item_sequence,
    sequence_length, last_event_time (`m2rec.features.tables.user_sequence_table`'s columns and types).
    `frame`: `read_in_stored_order`'s columns."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    in_order = Window.partitionBy("user_idx").orderBy("timestamp", "_file", "_row")
    position = F.row_number().over(in_order)  # 1.. per user, in event order
    events = frame.withColumn("_n", position).withColumn(
        "_run_ends", F.lead("split").over(in_order).isNull() | (F.lead("split").over(in_order) != F.col("split")))
    # the cutoffs (`tables.cutoff_rows`): each user's last event of every run of one split; (E, ...) -> cuts (<= 3)
    events = (events
              .withColumn("_cuts", F.collect_list(F.when(F.col("_run_ends"), F.col("_n")))
                          .over(Window.partitionBy("user_idx")))
              # `tables.event_times`: 1 µs per earlier event of the user at the same instant
              .withColumn("_tie", F.col("_n") - F.min("_n").over(Window.partitionBy("user_idx", "timestamp")))
              .withColumn("_time", F.timestamp_micros(F.unix_micros("timestamp") + F.col("_tie"))))
    # each event joins the windows (cut - max_length, cut] that hold it: at most max_length events per cutoff
    windows = events.withColumn("_cut", F.explode(F.filter(
        "_cuts", lambda cut: (cut >= F.col("_n")) & (cut - max_length < F.col("_n")))))
    snapshots = windows.groupBy("user_idx", "_cut").agg(
        F.first("user_id").alias("user_id"),
        F.max_by("_time", "_n").alias("event_timestamp"),  # the cutoff event's, the window's last
        F.sort_array(F.collect_list(F.struct("_n", "item_idx"))).alias("_window"),
        F.max_by("timestamp", "_n").alias("last_event_time"))
    return (snapshots.orderBy("user_idx", "_cut")
            .select("user_id", "event_timestamp",
                    F.transform("_window", lambda event: event["item_idx"].cast("long")).alias("item_sequence"),
                    F.size("_window").cast("long").alias("sequence_length"),
                    "last_event_time"))


def write_user_sequences_spark(spark, interactions: str | Path, path: str | Path, max_length: int) -> None:
    """Build the user sequence table of the prepared `interactions` with Spark and write it to `path` (a folder
    of parquet parts, in user-then-time order), replacing what was there only once it is complete."""
    table = user_sequence_table(read_in_stored_order(spark, interactions), max_length)
    with atomic_directory(path) as staging:
        table.write.mode("overwrite").parquet(str(staging))
    log.info("wrote the user sequence table to %s with Spark", path)
