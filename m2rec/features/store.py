"""A small client over the Feast repository that `m2rec features build` wrote: serving reads users' sequences from
the online store, training reads the same features from the offline store, point-in-time correct."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd

from m2rec.data.errors import DataError
from m2rec.features.repo import DATA_FOLDER, feature_store

BUILD_FILE = "build.json"  # summary of the last build, in the repository's data folder
PUSH_SOURCE = "user_events"


def _utc(value: datetime | str | pd.Timestamp) -> pd.Timestamp:
    """A timestamp in UTC; naive values are taken as UTC."""
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


class FeatureClient:
    """Users' item sequences and items' text features of one built feature repository.

    Sequences are lists of item_idx (1..N), oldest first, at most `max_sequence_length` long.
    """

    def __init__(self, repo_dir: str | Path):
        self.repo_dir = Path(repo_dir)
        build = self.repo_dir / DATA_FOLDER / BUILD_FILE
        if not build.is_file():
            raise DataError(f"{self.repo_dir} holds no feature build ({build} is missing)",
                            "run `m2rec features build --data DIR --repo REPO` first and pass that REPO")
        self.build = json.loads(build.read_text())
        self.max_sequence_length = int(self.build["params"]["max_sequence_length"])
        self.store = feature_store(self.repo_dir)
        self._serving = self.store.get_feature_service("serving")
        self._training = self.store.get_feature_service("training")
        self._item_text = self.store.get_feature_service("item_text")

    def _online_users(self, user_ids: list[str]) -> dict[str, list]:
        rows = [{"user_id": str(user)} for user in user_ids]
        return self.store.get_online_features(features=self._serving, entity_rows=rows).to_dict()

    def user_sequences(self, user_ids: list[str]) -> list[list[int] | None]:
        """Each user's current sequence from the online store; None where the user has no history."""
        if not user_ids:
            return []
        sequences = self._online_users(user_ids)["item_sequence"]
        return [None if sequence is None else [int(i) for i in sequence] for sequence in sequences]

    def push_event(self, user_id: str, item_id: str, timestamp: datetime | str | None = None) -> list[int]:
        """Append `item_id` to the user's online sequence (a new user starts one) and return the new sequence.

        Events of a user must come in time order; `timestamp` defaults to now (UTC).
        """
        from feast.data_source import PushMode

        item_idx = self.store.get_online_features(features=["item_features:item_idx"],
                                                  entity_rows=[{"item_id": str(item_id)}]).to_dict()["item_idx"][0]
        if item_idx is None:
            raise DataError(f"unknown item_id {item_id!r}",
                            "push only items of the catalog; after adding items run `m2rec features build` again")
        when = _utc(timestamp if timestamp is not None else pd.Timestamp.now(tz="UTC"))
        current = self._online_users([user_id])
        sequence, last_event = current["item_sequence"][0] or [], current["last_event_time"][0]
        if last_event is not None and when <= _utc(last_event):
            raise DataError(f"event time {when} of user {user_id!r} is not after the user's last event "
                            f"({_utc(last_event)})", "push a user's events in time order")
        new_sequence = ([int(i) for i in sequence] + [int(item_idx)])[-self.max_sequence_length:]
        row = pd.DataFrame({"user_id": [str(user_id)], "event_timestamp": [when], "item_sequence": [new_sequence],
                            "sequence_length": [len(new_sequence)], "last_event_time": [when]})
        self.store.push(PUSH_SOURCE, row, to=PushMode.ONLINE)
        return new_sequence

    def item_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(item_idx (N,), embeddings (N, dim)) of every catalog item, by item_idx, from the offline store."""
        source = self.store.get_data_source("item_features_source")
        item_ids = pd.read_parquet(self.repo_dir / source.path, columns=["item_id"])["item_id"]
        entity_rows = pd.DataFrame({"item_id": item_ids, "event_timestamp": pd.Timestamp.now(tz="UTC")})
        frame = self.store.get_historical_features(entity_df=entity_rows, features=self._item_text).to_df()
        frame = frame.sort_values("item_idx")
        return frame["item_idx"].to_numpy(np.int64), np.stack(frame["embedding"].to_numpy()).astype(np.float32)

    def training_sequences(self, entity_rows: pd.DataFrame) -> pd.DataFrame:
        """Point-in-time sequences from the offline store: `entity_rows` (user_id, event_timestamp, any other
        columns) come back in order with `item_sequence` and `sequence_length` as of each row's time, events at
        that time included (NaN before the user's first event). `tables.split_cutoffs` builds rows for a split."""
        rows = entity_rows.assign(_row=np.arange(len(entity_rows)))
        frame = self.store.get_historical_features(entity_df=rows, features=self._training).to_df()
        return frame.sort_values("_row").drop(columns="_row").reset_index(drop=True)
