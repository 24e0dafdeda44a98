"""Find a registered model version from a `models:/` URI and fetch its model folder."""

from __future__ import annotations

import re
from pathlib import Path

from m2rec.data.errors import DataError
from m2rec.registry.config import MODEL_DIR_ARTIFACT

MODEL_URI = re.compile(r"models:/(?P<name>[^/@]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))")


def resolve_version(client, model_uri: str):
    """The ModelVersion that `models:/NAME@ALIAS` or `models:/NAME/VERSION` names."""
    from mlflow.exceptions import MlflowException

    match = MODEL_URI.fullmatch(model_uri)
    if match is None:
        raise DataError(f"model URI {model_uri!r} is not of the form models:/NAME@ALIAS or models:/NAME/VERSION",
                        "pass e.g. models:/m2rec@champion")
    name, alias, version = match.group("name", "alias", "version")
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as err:
        raise DataError(f"{model_uri} is not in the registry at {client.tracking_uri} ({err.message})",
                        "register a model with `m2rec register`, or point --tracking-uri at its registry") from err


def download_model_folder(name: str, version: str, destination: str | Path, tracking_uri: str) -> Path:
    """Download the m2rec model folder (the pyfunc's `model_dir` artifact) of version `version` of `name` from the
    registry at `tracking_uri` (asked explicitly: no process-wide MLflow setting is read or changed)."""
    import mlflow
    from mlflow.models import Model
    from mlflow.tracking import MlflowClient

    location = MlflowClient(tracking_uri, registry_uri=tracking_uri).get_model_version_download_uri(name, version)
    mlmodel = mlflow.artifacts.download_artifacts(f"{location}/MLmodel", dst_path=str(destination),
                                                  tracking_uri=tracking_uri)
    artifacts = Model.load(mlmodel).flavors.get("python_function", {}).get("artifacts") or {}
    if MODEL_DIR_ARTIFACT not in artifacts:
        raise DataError(f"models:/{name}/{version} holds no {MODEL_DIR_ARTIFACT!r} artifact",
                        "package versions registered by `m2rec register`")
    return Path(mlflow.artifacts.download_artifacts(f"{location}/{artifacts[MODEL_DIR_ARTIFACT]['path']}",
                                                    dst_path=str(destination), tracking_uri=tracking_uri))
