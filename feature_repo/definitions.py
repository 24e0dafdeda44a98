"""M2Rec's Feast definitions: each user's recent item sequence and each item's text features.

Only Feast objects live here: `feast apply` imports this file (and, per .feastignore, nothing else). The parquet
files under data/ are written by `m2rec features build` (see m2rec/features/tables.py for their rows). The sources
are of the kind the repository's offline store reads, which feature_store.yaml beside this file names: SparkSources
for Feast's Spark store (`features.offline_store: spark`), FileSources otherwise.
"""

from datetime import timedelta
from pathlib import Path

import yaml
from feast import Entity, FeatureService, FeatureView, Field, FileSource, PushSource, ValueType
from feast.types import Array, Float32, Int64, String, UnixTimestamp

REPO = Path(__file__).resolve().parent
DATA = REPO / "data"  # absolute: the DuckDB offline store resolves paths from the cwd
NO_EXPIRY = timedelta(0)  # Feast reads a ttl of 0 as "never expires": a sequence holds until the next event


def offline_store_type() -> str:
    """The `offline_store.type` of this repository's feature_store.yaml (the committed template: duckdb)."""
    config = REPO / "feature_store.yaml"
    return yaml.safe_load(config.read_text())["offline_store"]["type"] if config.is_file() else "duckdb"


def parquet_source(name: str, file: str):
    """The parquet table data/`file` (one file or a folder of parts) as the offline store reads it."""
    if OFFLINE_STORE == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=str(DATA / file), file_format="parquet", timestamp_field="event_timestamp")
    return FileSource(name=name, path=str(DATA / file), timestamp_field="event_timestamp")


OFFLINE_STORE = offline_store_type()  # read once for every source

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="A user, by the dataset's original id.")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
              description="A catalog item, by the dataset's original id.")

# Per user, a snapshot of the user's recent items at each split cutoff (train, valid, latest), stamped with its time.
user_sequences_source = parquet_source("user_sequences_source", "user_sequences.parquet")

# New events while serving: rows of the same shape, written straight to the online store.
user_events = PushSource(name="user_events", batch_source=user_sequences_source)

SEQUENCE_FIELDS = [
    Field(name="item_sequence", dtype=Array(Int64),
          description="item_idx of the user's most recent items (at most max_sequence_length), oldest first"),
    Field(name="sequence_length", dtype=Int64, description="Length of item_sequence."),
    Field(name="last_event_time", dtype=UnixTimestamp, description="Time of the user's latest event."),
]

# The build's snapshot: never pushed to, so a user's history as of the build's cutoff stays what it was. The
# service adds the events logged since (m2rec.features.live) and training reads it point in time.
user_history = FeatureView(name="user_history", entities=[user], ttl=NO_EXPIRY, schema=SEQUENCE_FIELDS,
                           source=user_sequences_source, online=True)

# The user's current sequence: the snapshot, then updated online by every accepted event (pushes).
user_recent_items = FeatureView(name="user_recent_items", entities=[user], ttl=NO_EXPIRY, schema=SEQUENCE_FIELDS,
                                source=user_events, online=True)

# One row per catalog item.
item_features_source = parquet_source("item_features_source", "item_features.parquet")

item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="item_idx", dtype=Int64, description="The item's index in the model (1..N; 0 is padding)."),
        Field(name="title", dtype=String, description="The item's title (its text where the source has none)."),
        Field(name="embedding", dtype=Array(Float32), description="L2-normalised text embedding of the item."),
    ],
    source=item_features_source,
    online=True,
)

training = FeatureService(name="training", features=[user_history[["item_sequence", "sequence_length"]]],
                          description="Point-in-time sequences for training (offline store).")
snapshot = FeatureService(name="snapshot", features=[user_history],
                          description="Users' sequences as of the build's cutoff (online store).")
current = FeatureService(name="current", features=[user_recent_items],
                         description="Users' current sequences, every accepted event included (online store).")
item_text = FeatureService(name="item_text", features=[item_features],
                           description="Item indices, titles and text embeddings (both stores).")
