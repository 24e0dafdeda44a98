"""A small client over one feature build (a Feast repository written by `m2rec features build`): serving reads
users' snapshot sequences and writes their current ones in the online store, training reads the same features from
the offline store, point-in-time correct."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from m2rec.data.errors import DataError
from m2rec.features.repo import DATA_FOLDER, feature_store
from m2rec.features.tables import ITEM_FEATURES_FILE

BUILD_FILE = "build.json"  # summary of the build, in the repository's data folder; written last
PUSH_SOURCE = "user_events"


def build_dir(feature_root: str | Path, key: str) -> Path:
    """The repository of the finished build `key` under `feature_root`."""
    repo_dir = Path(feature_root) / key
    if not (repo_dir / DATA_FOLDER / BUILD_FILE).is_file():
        raise DataError(f"feature build {key} is not under {feature_root}",
                        "point the feature root at the folder `m2rec features build` wrote to")
    return repo_dir


class FeatureClient:
    """Users' item sequences and items' text features of one feature build.

    Sequences are lists of item_idx (1..N), oldest first, at most `max_sequence_length` long.
    """

    def __init__(self, repo_dir: str | Path):
        self.repo_dir = Path(repo_dir)
        build = self.repo_dir / DATA_FOLDER / BUILD_FILE
        if not build.is_file():
            raise DataError(f"{self.repo_dir} holds no feature build ({build} is missing)",
                            "run `m2rec features build --data DIR` first and pass the build it prints")
        self.build = json.loads(build.read_text())
        self.max_sequence_length = int(self.build["params"]["max_sequence_length"])
        self.events_through_seq = int(self.build.get("events_through_seq", 0))
        self.store = feature_store(self.repo_dir)
        self._snapshot = self.store.get_feature_service("snapshot")
        self._current = self.store.get_feature_service("current")
        self._training = self.store.get_feature_service("training")
        self._item_text = self.store.get_feature_service("item_text")
        catalog = pd.read_parquet(self.repo_dir / DATA_FOLDER / ITEM_FEATURES_FILE, columns=["item_id", "item_idx"])
        self.item_index = dict(zip(catalog["item_id"].astype(str), catalog["item_idx"].astype(int)))

    def _online(self, service, user_ids: list[str]) -> list[list[int] | None]:
        if not user_ids:
            return []
        rows = [{"user_id": str(user)} for user in user_ids]
        sequences = self.store.get_online_features(features=service, entity_rows=rows).to_dict()["item_sequence"]
        return [None if sequence is None else [int(i) for i in sequence] for sequence in sequences]

    def snapshot_sequences(self, user_ids: list[str]) -> list[list[int] | None]:
        """Each user's sequence as of the build's cutoff; None where the build knows no history of the user."""
        return self._online(self._snapshot, user_ids)

    def current_sequences(self, user_ids: list[str]) -> list[list[int] | None]:
        """Each user's current sequence, every event accepted since the build included (what Feast users see)."""
        return self._online(self._current, user_ids)

    def write_current(self, sequences: dict[str, tuple[list[int], datetime]]) -> None:
        """Set users' current sequences: user_id -> (item_idx sequence, time of the latest event)."""
        from feast.data_source import PushMode

        if not sequences:
            return
        users = list(sequences)
        times = [pd.Timestamp(sequences[user][1]).tz_convert("UTC") for user in users]
        rows = pd.DataFrame({"user_id": users, "event_timestamp": times,
                             "item_sequence": [list(map(int, sequences[user][0])) for user in users],
                             "sequence_length": [len(sequences[user][0]) for user in users],
                             "last_event_time": times})
        self.store.push(PUSH_SOURCE, rows, to=PushMode.ONLINE)

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(item_idx (N,), embeddings (N, dim)) of every catalog item, by item_idx, from the offline store."""
        entity_rows = pd.DataFrame({"item_id": list(self.item_index), "event_timestamp": pd.Timestamp.now(tz="UTC")})
        frame = self.store.get_historical_features(entity_df=entity_rows, features=self._item_text).to_df()
        frame = frame.sort_values("item_idx")
        return frame["item_idx"].to_numpy(np.int64), np.stack(frame["embedding"].to_numpy()).astype(np.float32)

    def training_sequences(self, entity_rows: pd.DataFrame) -> pd.DataFrame:
        """Point-in-time sequences from the offline store: `entity_rows` (user_id, event_timestamp, any other
        columns) come back in order with `item_sequence` and `sequence_length` as of each row's time, events at
        that time included (NaN before the user's first snapshot). `tables.split_cutoffs` builds rows for a
        split."""
        rows = entity_rows.assign(_row=np.arange(len(entity_rows)))
        frame = self.store.get_historical_features(entity_df=rows, features=self._training).to_df()
        frame = frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
        # the caller's own entity columns, as given: offline stores return their times in different types
        frame[list(entity_rows.columns)] = entity_rows.reset_index(drop=True)
        return frame
