"""Where runs and registered models are recorded, and how metric names map onto MLflow's."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from m2rec.errors import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # relative: the working directory
SELECTION_METRIC = "NDCG@10"  # validation metric that decides the champion (early stopping uses it too)
CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_DIR_ARTIFACT = "model_dir"  # the pyfunc artifact holding the trained model folder


@dataclass
class RegistryParams:
    """MLflow tracking and registry settings (params.yaml section `registry`)."""

    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory
    experiment: str = "m2rec"
    model_name: str = "m2rec"
    artifact_location: str | None = None  # new experiments only; None: beside a SQLite database, else the default


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The tracking URI to use: the argument, else $MLFLOW_TRACKING_URI, else a SQLite file in the working dir."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def default_artifact_location(tracking_uri: str) -> str | None:
    """Artifacts of a SQLite-tracked experiment go beside the database (not into whatever the cwd is)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri.removeprefix("sqlite:///"))
    return (database.resolve().parent / "mlruns").as_uri()


def metric_key(name: str) -> str:
    """MLflow metric names cannot hold '@': `valid_NDCG@10` -> `valid_NDCG_at_10`."""
    return name.replace("@", "_at_")


def split_metric(gate_metric: str) -> tuple[str, str]:
    """'valid/NDCG@10' -> ('valid', 'NDCG@10'); the test split may be reported but never decides."""
    split, _, name = gate_metric.partition("/")
    if split != "valid" or not name:
        raise ConfigError(f"pipeline.gate_metric={gate_metric!r} does not name a validation metric",
                          "use valid/METRIC, e.g. valid/NDCG@10: what is promoted is never chosen on the test split")
    return split, name
