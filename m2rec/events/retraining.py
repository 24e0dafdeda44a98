"""What retraining takes from the event log: every item added while serving and every event up to a cutoff,
merged into the raw source."""

from __future__ import annotations

import logging
from dataclasses import replace

import pandas as pd

from m2rec.data.schema import RawDataset
from m2rec.events.log import EventLog, public_url

log = logging.getLogger(__name__)


def merge_logged_items(items: pd.DataFrame, events: EventLog) -> tuple[pd.DataFrame, int]:
    """The source's item table plus the items added while serving that it lacks (an id the source has keeps the
    source's row); and how many were added."""
    logged = pd.DataFrame([(i.item_id, i.text, i.title) for i in events.items_after(0)],
                          columns=["item_id", "text", "title"])
    new = logged[~logged["item_id"].isin(set(items["item_id"].astype(str)))]
    if new.empty:
        return items, 0
    if "title" not in items.columns:
        new = new.drop(columns="title")
    return pd.concat([items, new], ignore_index=True), len(new)


def merge_logged_events(raw: RawDataset, events: EventLog) -> tuple[RawDataset, dict]:
    """`raw` plus every item added while serving and every logged event up to the log's current cutoff; and the
    facts for the lineage: the cutoff, how many items and events were merged and how many events were left out
    (items neither the source's catalog nor the log has)."""
    items, added_items = merge_logged_items(raw.items, events)
    through = events.cutoff()  # after reading the items: an event's item was added before the event was accepted
    logged = events.read(through)
    known = logged["item_id"].isin(set(items["item_id"].astype(str)))
    if not known.all():
        log.warning("%d logged events name items the source's catalog lacks; they are left out",
                    int((~known).sum()))
    rows = logged.loc[known, ["user_id", "item_id", "timestamp"]]
    merged = pd.concat([raw.interactions, rows.astype({"timestamp": raw.interactions["timestamp"].dtype})],
                       ignore_index=True)
    facts = {"log": public_url(events.url), "through_seq": through, "merged": int(known.sum()),
             "unknown_items": int((~known).sum()), "users": int(rows["user_id"].nunique()), "added_items": added_items}
    log.info("merged %d logged events (through seq %d) and %d added items from %s", facts["merged"], through,
             added_items, facts["log"])
    notes = [*raw.notes, f"{facts['merged']} events and {added_items} items from the event log"]
    return replace(raw, items=items, interactions=merged, notes=notes), facts
