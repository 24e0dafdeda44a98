"""Read the canonical tables back and turn them into per-user item sequences."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pandas as pd

from m2rec.data.errors import DataError

INTERACTIONS_FILE = "interactions.parquet"  # one file, or a folder of parts (the Spark engine's)
REQUIRED_FILES = (INTERACTIONS_FILE, "items.parquet", "stats.json")
SEQUENCE_COLUMNS = ["user_idx", "item_idx", "timestamp"]  # enough for user_sequences, histories, train_sequences


def load_catalog(directory: str | Path) -> tuple[pd.DataFrame, dict]:
    """(items, stats) of the prepared dataset in `directory`, without its interactions (which may not fit memory)."""
    directory = Path(directory)
    missing = [name for name in REQUIRED_FILES if not (directory / name).exists()]
    if missing:
        raise DataError(f"{directory} lacks {', '.join(missing)}",
                        "run `m2rec data prepare --output DIR` first and pass that DIR")
    return pd.read_parquet(directory / "items.parquet"), json.loads((directory / "stats.json").read_text())


@dataclass
class PreparedDataset:
    """The canonical tables of one prepared dataset."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    stats: dict

    @classmethod
    def load(cls, directory: str | Path, columns: list[str] | None = None) -> "PreparedDataset":
        """The tables in `directory`; `columns` reads only those interaction columns (SEQUENCE_COLUMNS: what
        sequences, histories and training need, without the string ids, a fraction of the memory)."""
        items, stats = load_catalog(directory)
        return cls(pd.read_parquet(Path(directory) / INTERACTIONS_FILE, columns=columns), items, stats)

    @property
    def num_items(self) -> int:
        """Number of real items; valid item indices are 1..num_items (0 is padding)."""
        return int(len(self.items))

    @property
    def num_users(self) -> int:
        return int(self.interactions["user_idx"].max())

    @cached_property
    def user_sequences(self) -> list[np.ndarray]:
        """Each user's full item sequence (train + valid + test), in time order; index u-1 for user u."""
        ordered = self.interactions.sort_values(["user_idx", "timestamp"], kind="stable")
        bounds = np.cumsum(ordered.groupby("user_idx", sort=True).size().to_numpy())[:-1]
        return np.split(ordered["item_idx"].to_numpy(np.int64), bounds)

    def histories(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
        """(inputs, targets) for leave-one-out evaluation: `valid` predicts the second-to-last item from the
        items before it, `test` the last item from everything before it."""
        cut = {"valid": 2, "test": 1}[split]
        inputs = [seq[:-cut] for seq in self.user_sequences]
        targets = np.array([seq[-cut] for seq in self.user_sequences], dtype=np.int64)
        return inputs, targets

    def train_sequences(self) -> list[np.ndarray]:
        """Each user's training items (all but the last two)."""
        return [seq[:-2] for seq in self.user_sequences]
