"""What retraining takes from the event log: every event up to a cutoff, merged into the raw source."""

from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd

from m2rec.data.schema import RawDataset
from m2rec.events.log import EventLog, public_url

log = logging.getLogger(__name__)


def merge_logged_events(raw: RawDataset, events: EventLog) -> tuple[RawDataset, dict]:
    """`raw` plus every logged event up to the log's current cutoff; and the facts for the lineage: the cutoff,
    how many events were merged and how many were left out (items the source's catalog no longer has)."""
    through = events.cutoff()
    logged = events.read(through)
    known = logged["item_id"].isin(set(raw.items["item_id"].astype(str)))
    if not known.all():
        log.warning("%d logged events name items the source's catalog lacks; they are left out",
                    int((~known).sum()))
    rows = logged.loc[known, ["user_id", "item_id", "timestamp"]]
    merged = pd.concat([raw.interactions, rows.astype({"timestamp": raw.interactions["timestamp"].dtype})],
                       ignore_index=True)
    facts = {"log": public_url(events.url), "through_seq": through, "merged": int(known.sum()),
             "unknown_items": int((~known).sum()), "users": int(rows["user_id"].nunique())}
    log.info("merged %d logged events (through seq %d) from %s", facts["merged"], through, facts["log"])
    return replace(raw, interactions=merged, notes=[*raw.notes, f"{facts['merged']} events from the event log"]), facts
