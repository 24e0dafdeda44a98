"""Stage: read a source, filter and split it, and write the canonical tables."""

from __future__ import annotations

import logging
from pathlib import Path

from m2rec.data.prepare import PrepareParams, build_tables, write_tables
from m2rec.data.sources import SourceSpec, read_source
from m2rec.data.synthetic import SyntheticParams
from m2rec.events.log import EventLog
from m2rec.events.retraining import merge_logged_events
from m2rec.spark.session import SparkParams

log = logging.getLogger(__name__)


def prepare(
    source: SourceSpec,
    output: str | Path,
    params: PrepareParams | None = None,
    synthetic: SyntheticParams | None = None,
    events_url: str | None = None,
    spark: SparkParams | None = None,
) -> dict:
    """Prepare the dataset described by `source`, plus every event logged at `events_url` up to now (the run's
    cutoff), into `output`; return its stats (`events`: the cutoff and how many events were merged). With
    `spark.enabled` the work runs on Spark (`table` sources), writing the same tables."""
    params = params or PrepareParams()
    if spark is not None and spark.enabled:
        from m2rec.spark.prepare import prepare_spark
        from m2rec.spark.session import spark_session

        return prepare_spark(spark_session(spark), source, output, params, events_url)
    log.info("reading %s data from %s", source.format, source.input or "the synthetic generator")
    raw = read_source(source, synthetic)
    events = None
    if events_url:
        raw, events = merge_logged_events(raw, EventLog(events_url))
    log.info("read %d interactions; filtering (%d-core users, %d-core items)",
             len(raw.interactions), params.k_core_users, params.k_core_items)
    interactions, items, stats = build_tables(raw, params)
    stats["events"] = events or {"through_seq": 0, "merged": 0}
    write_tables(Path(output), interactions, items, stats)
    after = stats["after_filter"]
    log.info("wrote %s: %d interactions, %d users, %d items", output, after["interactions"], after["users"],
             after["items"])
    return stats
