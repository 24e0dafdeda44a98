"""The canonical tables every reader produces and every later stage reads."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
SPLITS = ("train", "valid", "test")


@dataclass
class RawDataset:
    """What a reader returns, before filtering: original ids as strings, UTC timestamps, item texts."""

    interactions: pd.DataFrame  # user_id: str, item_id: str, timestamp: datetime64[ns, UTC]
    items: pd.DataFrame  # item_id: str, text: str, plus the source's structured fields
    source: str
    timestamps_synthetic: bool = False
    notes: list[str] = field(default_factory=list)
