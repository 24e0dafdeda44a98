"""One MLflow run per trained model folder, whether or not it passes the gate: parameters, per-epoch and final
metrics, plots, the dataset as a logged input and the gate's verdict; the model itself (a pyfunc logged from code,
its weights as a safetensors artifact) is logged into that run only when it is registered."""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from m2rec.data.errors import DataError
from m2rec.model.files import CONFIG_FILE, HISTORY_FILE, METRICS_FILE, MODEL_FILES
from m2rec.registry.config import MODEL_DIR_ARTIFACT, SELECTION_METRIC, metric_key

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).resolve().parent / "pyfunc_model.py"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # m2rec/, logged with the model so it loads without an install
LOGGED_MODEL_NAME = "model"


@dataclass
class TrainedModel:
    """The records of a trained model folder (what `m2rec train` writes)."""

    directory: Path
    config: dict
    metrics: dict
    history: list[dict]

    @classmethod
    def load(cls, directory: str | Path) -> TrainedModel:
        directory = Path(directory)
        missing = [name for name in MODEL_FILES if not (directory / name).is_file()]
        if missing:
            raise DataError(f"model folder {directory} lacks {', '.join(missing)}",
                            "pass a folder written by `m2rec train --output DIR` that finished training")
        config, metrics, history = (json.loads((directory / name).read_text())
                                    for name in (CONFIG_FILE, METRICS_FILE, HISTORY_FILE))
        trained = cls(directory, config, metrics, history)
        if SELECTION_METRIC not in trained.metrics.get("valid", {}):
            raise DataError(f"{directory / METRICS_FILE} has no valid {SELECTION_METRIC}",
                            "re-run `m2rec train`, which writes validation and test metrics")
        return trained

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def dataset_version(self) -> str:
        return str(self.config.get("dataset_version"))

    @property
    def score(self) -> float:
        """The validation metric that decides the champion."""
        return float(self.metrics["valid"][SELECTION_METRIC])


def run_params(trained: TrainedModel) -> dict[str, object]:
    """Flat MLflow parameters: model type, dataset and text model, then `model.*` and `train.*` settings."""
    params: dict[str, object] = {"model_type": trained.model_type, "dataset_version": trained.dataset_version,
                                 "text_model": trained.config.get("text_model"),
                                 "num_items": trained.config["num_items"]}
    for section in ("model_params", "train_params"):
        prefix = section.removesuffix("_params")
        params.update({f"{prefix}.{key}": value for key, value in (trained.config.get(section) or {}).items()})
    return params


def final_metrics(trained: TrainedModel) -> dict[str, float]:
    """`valid_NDCG_at_10`, `test_HR_at_5`, ... plus best_epoch, epochs_run and train_seconds."""
    metrics = {f"{split}_{metric_key(name)}": float(value)
               for split in ("valid", "test") for name, value in trained.metrics.get(split, {}).items()}
    metrics.update({key: float(trained.metrics[key]) for key in ("best_epoch", "epochs_run", "train_seconds")
                    if key in trained.metrics})
    return metrics


def validation_gates(trained: TrainedModel, data_dir: str | Path, batch_size: int = 128
                     ) -> tuple[np.ndarray, list[str], np.ndarray] | None:
    """Gate weights (U, n_branches) at the last position of every validation history, the branch names and the
    history lengths; None for models without a gate."""
    from m2rec.data.prepared import SEQUENCE_COLUMNS, PreparedDataset
    from m2rec.inference import Recommender

    data = PreparedDataset.load(data_dir, SEQUENCE_COLUMNS)
    if data.stats.get("dataset_version") != trained.dataset_version:
        raise DataError(f"{data_dir} is dataset {data.stats.get('dataset_version')}, but the model was trained "
                        f"on {trained.dataset_version}", "pass the --data folder the model was trained on")
    recommender = Recommender(trained.directory)
    names = getattr(recommender.model, "branch_names", None)
    if not names:
        return None
    histories, _ = data.histories("valid")
    gates = []
    for start in range(0, len(histories), batch_size):
        batch = [h.tolist() for h in histories[start:start + batch_size]]
        gates += [[r.gates[name] for name in names] for r in recommender.recommend(batch, k=1)]
    return np.array(gates), list(names), np.array([len(h) for h in histories])


def model_signature():
    """Input: histories of item ids; params: k and exclude_seen; output: ranked ids, titles, scores, gates."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Map, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(Array(DataType.string), "item_ids")]),
        outputs=Schema([ColSpec(Array(DataType.string), "item_ids"), ColSpec(Array(DataType.string), "titles"),
                        ColSpec(Array(DataType.double), "scores"), ColSpec(DataType.string, "strategy"),
                        ColSpec(Map(DataType.double), "gates", required=False)]),
        params=ParamSchema([ParamSpec("k", DataType.long, 10), ParamSpec("exclude_seen", DataType.boolean, True)]),
    )


def pip_requirements() -> list[str]:
    """What the pyfunc needs at load time (listed, so MLflow does not spend seconds inferring them)."""
    from importlib.metadata import version

    torch_version = version("torch").split("+")[0]  # a local build tag (+cpu) is not on PyPI
    return [f"mlflow=={version('mlflow')}", f"torch=={torch_version}"] + [
        f"{name}>={version(name)}" for name in ("numpy", "pandas", "pyarrow", "safetensors")]


def log_dataset(data_dir: str | Path, dataset_version: str) -> None:
    """The training dataset as the active run's input (MLflow's dataset tracking): its source, content hash and
    schema, from the interactions table."""
    import mlflow
    import pandas as pd

    table = Path(data_dir) / "interactions.parquet"
    frame = pd.read_parquet(table, columns=["user_id", "item_id", "timestamp", "split"])
    dataset = mlflow.data.from_pandas(frame, source=str(table.resolve()), name=f"interactions-{dataset_version}",
                                      digest=dataset_version)
    mlflow.log_input(dataset, context="training")


def _log_figure(figure, artifact_file: str) -> None:
    """Log a figure into the active run and free it (pyplot keeps every open figure)."""
    import mlflow
    from matplotlib import pyplot as plt

    mlflow.log_figure(figure, artifact_file)
    plt.close(figure)


def log_training_run(trained: TrainedModel, data_dir: str | Path | None = None, verdict: dict | None = None) -> str:
    """Log `trained` into the active MLflow run: tags, parameters, per-epoch and final metrics, plots, the dataset
    (`data_dir`, also the gate-weight plot) and the gate's `verdict` (GateVerdict.as_dict()); return the run id."""
    import mlflow
    from mlflow.entities import Metric

    from m2rec.registry.plots import gate_weights, training_curves

    run_id = mlflow.active_run().info.run_id
    mlflow.set_tags({"model_type": trained.model_type, "dataset_version": trained.dataset_version,
                     "model_dir": str(trained.directory.resolve())})
    mlflow.log_params(run_params(trained))
    epoch_metrics = [Metric(f"epoch/{metric_key(name)}", float(value), 0, int(record["epoch"]))
                     for record in trained.history for name, value in record.items() if name != "epoch"]
    mlflow.tracking.MlflowClient().log_batch(run_id, metrics=epoch_metrics)
    mlflow.log_metrics(final_metrics(trained))
    _log_figure(training_curves(trained.history, trained.metrics.get("best_epoch")), "plots/training_curves.png")
    if data_dir is not None:
        log_dataset(data_dir, trained.dataset_version)
    gates = validation_gates(trained, data_dir) if data_dir is not None else None
    if gates is not None:
        _log_figure(gate_weights(*gates), "plots/gate_weights.png")
    else:
        log.info("no gate weight plot: %s", "the model has no gate" if data_dir else "no data_dir given")
    if verdict is not None:
        mlflow.set_tags({"gate.passed": str(verdict["passed"]).lower(), "gate.reason": verdict["reason"],
                         "gate.metric": verdict["metric"], "gate.champion_version": verdict["champion_version"] or ""})
        mlflow.log_metrics({"gate_value": verdict["value"], "gate_threshold": verdict["threshold"],
                            **({"gate_champion_value": verdict["champion_value"]}
                               if verdict["champion_value"] is not None else {})})
    log.info("run %s: logged %d epochs, final metrics, plots and the gate's verdict", run_id, len(trained.history))
    return run_id


def log_model(trained: TrainedModel) -> str:
    """Log the model folder into the active run as a pyfunc; return the logged model's URI."""
    import mlflow

    with tempfile.TemporaryDirectory() as staging:
        model_dir = Path(staging) / "m2rec_model"
        model_dir.mkdir()
        for name in MODEL_FILES:
            shutil.copy2(trained.directory / name, model_dir / name)
        info = mlflow.pyfunc.log_model(
            name=LOGGED_MODEL_NAME, python_model=str(PYFUNC_FILE),
            artifacts={MODEL_DIR_ARTIFACT: str(model_dir)}, code_paths=[str(PACKAGE_DIR)],
            signature=model_signature(), pip_requirements=pip_requirements())
    return info.model_uri
