"""Stage: record a trained model folder as an MLflow run, register it as a new model version and give it the
`champion` alias if it beats the current champion, else `challenger`."""

from __future__ import annotations

import logging
from pathlib import Path

from m2rec.registry.config import SELECTION_METRIC, default_artifact_location, metric_key, resolve_tracking_uri

log = logging.getLogger(__name__)


def register(model_dir: str | Path, tracking_uri: str | None = None, model_name: str = "m2rec",
             experiment: str = "m2rec", data_dir: str | Path | None = None,
             artifact_location: str | None = None) -> dict:
    """Log, register and alias the model in `model_dir`; `data_dir` (the dataset it was trained on) adds the
    gate-weight plot. Everything happens inside one run and the alias is set last, so a run that fails or is
    interrupted leaves every alias as it was."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from m2rec.registry.aliases import assign_alias
    from m2rec.registry.tracking import TrainedModel, log_training_run

    trained = TrainedModel.load(model_dir)
    tracking_uri = resolve_tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None:
        mlflow.create_experiment(experiment, artifact_location or default_artifact_location(tracking_uri))
    mlflow.set_experiment(experiment)
    log.info("registering %s as %r (tracking: %s, experiment: %s)", model_dir, model_name, tracking_uri, experiment)

    with mlflow.start_run(run_name=f"{trained.model_type}-{trained.dataset_version}") as run:
        logged_uri = log_training_run(trained, data_dir)
        version = str(mlflow.register_model(logged_uri, model_name, tags={
            "dataset_version": trained.dataset_version, f"valid_{metric_key(SELECTION_METRIC)}": f"{trained.score:.6f}",
        }).version)
        decision = assign_alias(MlflowClient(), model_name, version, trained.dataset_version, trained.score)
    return {
        "run_id": run.info.run_id, "version": version, "alias": decision.alias,
        "champion_version": decision.champion_version, "reason": decision.reason,
        "model_uri": f"models:/{model_name}/{version}", "tracking_uri": tracking_uri,
        "dataset_version": trained.dataset_version, f"valid_{SELECTION_METRIC}": trained.score,
    }
