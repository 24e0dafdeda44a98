"""Stage: a registered model version (default: the champion) -> a BentoML model -> a Bento that `bentoml serve`
runs; what the service reads besides the model (registry, feature builds, event log) is recorded with it."""

from __future__ import annotations

import logging
import shlex
import tempfile
from dataclasses import asdict
from pathlib import Path

from m2rec.events.log import EventParams, public_url
from m2rec.registry.config import resolve_tracking_uri

log = logging.getLogger(__name__)


def package(model_uri: str = "models:/m2rec@champion", tracking_uri: str | None = None,
            bentoml_home: str | Path | None = None, feature_root: str | Path | None = None,
            events_url: str | None = None, build: bool = True, feature_repo: str | Path | None = None,
            serving=None, events: EventParams | None = None) -> dict:
    """Import the model version `model_uri` names into the BentoML model store of `bentoml_home` and, with `build`,
    build the Bento. The service will read that version's feature build under `feature_root` (or `feature_repo`,
    a repository given explicitly), log events at `events_url` and follow `serving.follow_alias` in the registry.
    Returns the tags and the command that serves the result."""
    from mlflow.tracking import MlflowClient

    from m2rec.registry.versions import download_model_folder, resolve_version
    from m2rec.serving.bento import SERVICE, build_bento, import_model, resolve_bentoml_home
    from m2rec.serving.follower import FEATURE_BUILD_TAG, ServingParams

    serving, events = serving or ServingParams(), events or EventParams()
    tracking_uri = resolve_tracking_uri(tracking_uri)
    home = resolve_bentoml_home(bentoml_home)
    client = MlflowClient(tracking_uri)
    version = resolve_version(client, model_uri)
    run = client.get_run(version.run_id)
    log.info("packaging %s = %s v%s (run %s) into BENTOML_HOME=%s", model_uri, version.name, version.version,
             version.run_id, home)
    labels = {"registered_model": version.name, "registry_version": str(version.version),
              "aliases": ",".join(version.aliases), "dataset_version": run.data.tags.get("dataset_version", ""),
              "model_type": run.data.tags.get("model_type", "")}
    recorded = {  # BentoML metadata holds no None, and never a secret
        "model_uri": model_uri, "tracking_uri": tracking_uri, "run_id": version.run_id, "model_name": version.name,
        "feature_build": (version.tags or {}).get(FEATURE_BUILD_TAG),
        "feature_root": str(Path(feature_root).resolve()) if feature_root else None,
        "feature_repo": str(Path(feature_repo).resolve()) if feature_repo else None,
        "events_url": public_url(events_url) if events_url else None,
        "serving": asdict(serving), "events": {k: v for k, v in asdict(events).items() if k != "url"},
        "valid_metrics": {k: v for k, v in run.data.metrics.items() if k.startswith("valid_")},
    }
    metadata = _without_none(recorded)
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = download_model_folder(version.name, version.version, scratch, tracking_uri)
        model_tag = import_model(model_dir, version.name, home, labels, metadata)
    env = f"BENTOML_HOME={shlex.quote(str(home))}"
    result = {"bentoml_model_tag": model_tag, "bentoml_home": str(home), "registry_version": str(version.version),
              "feature_build": metadata.get("feature_build"), "bento_tag": None}
    if build:
        result["bento_tag"] = build_bento(home, model_tag)
        result["serve_command"] = f"{env} bentoml serve {result['bento_tag']} --port 3000"
    else:
        result["serve_command"] = f"{env} bentoml serve {SERVICE} --port 3000 --arg model_tag={model_tag}"
    log.info("packaged %s%s; serve with: %s", model_tag, f" as Bento {result['bento_tag']}" if build else "",
             result["serve_command"])
    return result


def _without_none(values: dict) -> dict:
    """`values` without None entries, nested dicts included (BentoML metadata holds no None)."""
    return {key: _without_none(value) if isinstance(value, dict) else value
            for key, value in values.items() if value is not None}
