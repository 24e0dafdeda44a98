"""Stages: every trained model becomes an MLflow run with the gate's verdict (`track`); a version is registered
from that run, with the `champion` alias only when the verdict passed, else `challenger` (`promote`). `register`
does both, with the gate, for `m2rec register`."""

from __future__ import annotations

import logging
from pathlib import Path

from m2rec.registry.config import CHALLENGER, CHAMPION, default_artifact_location, resolve_tracking_uri

log = logging.getLogger(__name__)


def _use_experiment(tracking_uri: str, experiment: str, artifact_location: str | None) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location or default_artifact_location(tracking_uri))
    mlflow.set_experiment(experiment)


def track(model_dir: str | Path, data_dir: str | Path | None, verdict: dict | None, tracking_uri: str | None = None,
          experiment: str = "m2rec", artifact_location: str | None = None) -> str:
    """Record the trained model in `model_dir` as an MLflow run (params, per-epoch metrics, plots, the dataset,
    the gate's `verdict`), whether or not it passed; return the run id."""
    import mlflow

    from m2rec.registry.tracking import TrainedModel, log_training_run

    trained = TrainedModel.load(model_dir)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    _use_experiment(tracking_uri, experiment, artifact_location)
    with mlflow.start_run(run_name=f"{trained.model_type}-{trained.dataset_version}"):
        return log_training_run(trained, data_dir, verdict)


def promote(run_id: str, model_dir: str | Path, passed: bool, tracking_uri: str | None = None,
            model_name: str = "m2rec", feature_build: str | None = None) -> dict:
    """Log the model into run `run_id`, register it as a new version of `model_name` (tagged with its dataset and
    feature build) and give it `champion` if `passed`, else `challenger`. The alias is set last, so a failure
    leaves every alias as it was."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from m2rec.registry.tracking import TrainedModel, log_model
    from m2rec.serving.follower import FEATURE_BUILD_TAG

    trained = TrainedModel.load(model_dir)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    with mlflow.start_run(run_id=run_id):
        logged_uri = log_model(trained)
    tags = {"dataset_version": trained.dataset_version, **({FEATURE_BUILD_TAG: feature_build} if feature_build else {})}
    version = str(mlflow.register_model(logged_uri, model_name, tags=tags).version)
    client = MlflowClient(tracking_uri)
    alias = CHAMPION if passed else CHALLENGER
    champion_before = client.get_registered_model(model_name).aliases.get(CHAMPION)
    client.set_registered_model_alias(model_name, alias, version)
    log.info("%s v%s registered as %s (run %s)", model_name, version, alias, run_id)
    return {"run_id": run_id, "version": version, "alias": alias,
            "champion_version": version if passed else (str(champion_before) if champion_before else None),
            "model_uri": f"models:/{model_name}/{version}", "tracking_uri": tracking_uri,
            "dataset_version": trained.dataset_version, "feature_build": feature_build}


def gate(model_dir: str | Path, data_dir: str | Path, tracking_uri: str | None = None, model_name: str = "m2rec",
         metric: str = "valid/NDCG@10", threshold: float = 0.0, min_improvement: float = 0.0,
         mask_history: bool = False) -> dict:
    """The gate's verdict for the model in `model_dir`: its `metric` on `data_dir` against `threshold` and against
    the current champion's on the same data (GateVerdict.as_dict())."""
    from mlflow.tracking import MlflowClient

    from m2rec.data.prepared import SEQUENCE_COLUMNS, PreparedDataset
    from m2rec.registry.config import split_metric
    from m2rec.registry.gate import champion_value, decide, score_on

    split, name = split_metric(metric)
    data = PreparedDataset.load(data_dir, SEQUENCE_COLUMNS)
    value = score_on(model_dir, data, split, mask_history)[name]
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    registered = [m.name for m in client.search_registered_models(filter_string=f"name = '{model_name}'")]
    version, champion = (champion_value(client, model_name, CHAMPION, data, metric, mask_history) if registered
                         else (None, None))
    verdict = decide(metric, value, threshold, version, champion, min_improvement)
    log.info("gate %s: %s", "passed" if verdict.passed else "FAILED", verdict.reason)
    return verdict.as_dict()


def register(model_dir: str | Path, data_dir: str | Path, tracking_uri: str | None = None, model_name: str = "m2rec",
             experiment: str = "m2rec", artifact_location: str | None = None, feature_build: str | None = None,
             threshold: float = 0.0, min_improvement: float = 0.0) -> dict:
    """Gate, track and register the model in `model_dir` (trained on `data_dir`): a new version that is
    `champion` when it beats the champion on the same validation data, else `challenger`."""
    tracking_uri = resolve_tracking_uri(tracking_uri)
    verdict = gate(model_dir, data_dir, tracking_uri, model_name, threshold=threshold,
                   min_improvement=min_improvement)
    run_id = track(model_dir, data_dir, verdict, tracking_uri, experiment, artifact_location)
    return {**promote(run_id, model_dir, verdict["passed"], tracking_uri, model_name, feature_build),
            "gate": verdict}
