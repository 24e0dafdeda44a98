"""Stage: read a source, filter and split it, and write the canonical tables."""

from __future__ import annotations

import logging
from pathlib import Path

from m2rec.data.prepare import PrepareParams, build_tables, write_tables
from m2rec.data.sources import SourceSpec, read_source
from m2rec.data.synthetic import SyntheticParams

log = logging.getLogger(__name__)


def prepare(
    source: SourceSpec,
    output: str | Path,
    params: PrepareParams | None = None,
    synthetic: SyntheticParams | None = None,
) -> dict:
    """Prepare the dataset described by `source` into `output`; return its stats."""
    params = params or PrepareParams()
    log.info("reading %s data from %s", source.format, source.input or "the synthetic generator")
    raw = read_source(source, synthetic)
    log.info("read %d interactions; filtering (%d-core users, %d-core items)",
             len(raw.interactions), params.k_core_users, params.k_core_items)
    interactions, items, stats = build_tables(raw, params)
    write_tables(Path(output), interactions, items, stats)
    after = stats["after_filter"]
    log.info("wrote %s: %d interactions, %d users, %d items", output, after["interactions"], after["users"],
             after["items"])
    return stats
