"""Stage: a registered model version (default: the champion) -> a BentoML model -> a Bento that `bentoml serve`
runs."""

from __future__ import annotations

import logging
import shlex
import tempfile
from pathlib import Path

from m2rec.registry.config import resolve_tracking_uri

log = logging.getLogger(__name__)


def package(model_uri: str = "models:/m2rec@champion", tracking_uri: str | None = None,
            bentoml_home: str | Path | None = None, feature_repo: str | Path | None = None,
            build: bool = True) -> dict:
    """Import the model version `model_uri` names into the BentoML model store of `bentoml_home` and, with `build`,
    build the Bento; `feature_repo` (a built Feast repository) is recorded for the service. Returns the tags and
    the command that serves the result."""
    from mlflow.tracking import MlflowClient

    from m2rec.registry.versions import download_model_folder, resolve_version
    from m2rec.serving.bento import REPO_ROOT, SERVICE, build_bento, import_model, resolve_bentoml_home

    tracking_uri = resolve_tracking_uri(tracking_uri)
    home = resolve_bentoml_home(bentoml_home)
    repo = str(Path(feature_repo).resolve()) if feature_repo else None
    client = MlflowClient(tracking_uri)
    version = resolve_version(client, model_uri)
    run = client.get_run(version.run_id)
    log.info("packaging %s = %s v%s (run %s) into BENTOML_HOME=%s", model_uri, version.name, version.version,
             version.run_id, home)
    labels = {"registered_model": version.name, "registry_version": str(version.version),
              "aliases": ",".join(version.aliases), "dataset_version": run.data.tags.get("dataset_version", ""),
              "model_type": run.data.tags.get("model_type", "")}
    metadata = {"model_uri": model_uri, "tracking_uri": tracking_uri, "run_id": version.run_id,
                "valid_metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("valid_")},
                **({"feature_repo": repo} if repo else {})}  # BentoML metadata holds no None
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = download_model_folder(version.name, version.version, scratch)
        model_tag = import_model(model_dir, version.name, home, labels, metadata)
    env = f"BENTOML_HOME={shlex.quote(str(home))}"
    result = {"bentoml_model_tag": model_tag, "bentoml_home": str(home), "registry_version": str(version.version),
              "feature_repo": repo, "bento_tag": None}
    if build:
        result["bento_tag"] = build_bento(home, model_tag)
        result["serve_command"] = f"{env} bentoml serve {result['bento_tag']} --port 3000"
    else:
        result["serve_command"] = (f"cd {shlex.quote(str(REPO_ROOT))} && {env} bentoml serve {SERVICE} --port 3000 "
                                   f"--arg model_tag={model_tag}")
    log.info("packaged %s%s; serve with: %s", model_tag, f" as Bento {result['bento_tag']}" if build else "",
             result["serve_command"])
    return result
