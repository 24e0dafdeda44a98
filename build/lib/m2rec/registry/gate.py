"""The promotion gate: a challenger is promoted only when its validation metric reaches a threshold and beats the
serving champion's on the same new validation data. The test split is reported, never used to choose."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from m2rec.data.prepared import PreparedDataset
from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets
from m2rec.registry.config import split_metric

log = logging.getLogger(__name__)


@dataclass
class GateVerdict:
    """What the gate decided and why; logged on the run whether or not it passed."""

    passed: bool
    metric: str  # "split/metric", e.g. valid/NDCG@10
    value: float  # the challenger's
    threshold: float
    champion_version: str | None  # the champion it was compared with
    champion_value: float | None  # the champion's value on the same data
    min_improvement: float
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def decide(metric: str, value: float, threshold: float, champion_version: str | None,
           champion_value: float | None, min_improvement: float = 0.0) -> GateVerdict:
    """The rule, free of MLflow: reach `threshold`, and beat the champion by more than `min_improvement`."""
    def verdict(passed: bool, reason: str) -> GateVerdict:
        return GateVerdict(passed, metric, value, threshold, champion_version, champion_value, min_improvement,
                           reason)

    if value < threshold:
        return verdict(False, f"{metric} {value:.4f} is below the threshold {threshold}")
    if champion_version is None:
        return verdict(True, f"{metric} {value:.4f} reaches {threshold}; there is no champion yet")
    if value > champion_value + min_improvement:
        return verdict(True, f"{metric} {value:.4f} beats champion v{champion_version}'s {champion_value:.4f} on "
                             "the same data")
    return verdict(False, f"{metric} {value:.4f} does not beat champion v{champion_version}'s "
                          f"{champion_value:.4f} on the same data (by more than {min_improvement})")


def score_on(model_dir: str | Path, data: PreparedDataset, split: str, mask_history: bool = False
             ) -> dict[str, float]:
    """Metrics of a saved model (possibly trained on another catalog) on `data`'s `split` targets: items are
    matched by id; history items it does not know are left out, and a target it does not know is a miss."""
    from m2rec.inference import Recommender

    recommender = Recommender(model_dir)
    own = np.zeros(data.num_items + 1, dtype=np.int64)  # this dataset's item_idx -> the model's (0: unknown)
    own[data.items["item_idx"].to_numpy()] = [recommender.index_of.get(str(i), 0) for i in data.items["item_id"]]
    histories, targets = data.histories(split)
    mapped = [own[h][own[h] > 0] for h in histories]
    mapped = [h if len(h) else np.zeros(1, dtype=np.int64) for h in mapped]  # nothing known: padding only
    ranks = rank_targets(recommender.model, mapped, own[targets], mask_history=mask_history)
    return metrics_from_ranks(ranks)


def champion_value(client, model_name: str, alias: str, data: PreparedDataset, metric: str,
                   mask_history: bool = False) -> tuple[str | None, float | None]:
    """The version `alias` names and its `metric` on `data` (None, None when the alias names no version)."""
    from mlflow.exceptions import MlflowException

    from m2rec.registry.versions import download_model_folder

    try:
        version = str(client.get_model_version_by_alias(model_name, alias).version)
    except MlflowException:
        return None, None
    split, name = split_metric(metric)
    with tempfile.TemporaryDirectory() as scratch:
        folder = download_model_folder(model_name, version, scratch, client.tracking_uri)
        value = score_on(folder, data, split, mask_history)[name]
    log.info("champion v%s scores %s %.4f on dataset %s", version, metric, value, data.stats.get("dataset_version"))
    return version, value
