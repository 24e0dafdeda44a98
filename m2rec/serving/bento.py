"""Package a model folder for BentoML: a model in the BentoML model store, and a Bento built with `bentoml build`."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from m2rec.data.errors import DataError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]  # the Bento's build context: serving/ and m2rec/
BENTOFILE = REPO_ROOT / "serving" / "bentofile.yaml"
SERVICE = "serving.service:M2RecService"
SERVED_FILES = ("model.safetensors", "config.json", "items.parquet", "metrics.json")


@dataclass
class PackageParams:
    """What `m2rec package` packages and where (params.yaml section `package`)."""

    model_uri: str = "models:/m2rec@champion"
    bentoml_home: str | None = None  # None: $BENTOML_HOME, else BentoML's default (~/bentoml)
    feature_repo: str | None = None  # recorded with the model; the service reads users' sequences from it
    build: bool = True  # also build the Bento (else serve from source: `bentoml serve serving.service:...`)


def resolve_bentoml_home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser().resolve()


def import_model(model_dir: str | Path, name: str, bentoml_home: Path, labels: dict[str, str],
                 metadata: dict) -> str:
    """Copy the serving files of `model_dir` into a new BentoML model `name`; return its tag."""
    import bentoml
    from bentoml._internal.models import ModelStore

    store = ModelStore(bentoml_home / "models")  # explicit: BentoML caches the store of its first BENTOML_HOME
    with bentoml.models.create(name, labels=labels, metadata=metadata, _model_store=store) as model:
        for file_name in SERVED_FILES:
            shutil.copy2(Path(model_dir) / file_name, Path(model.path) / file_name)
    log.info("BentoML model %s saved in %s", model.tag, bentoml_home / "models")
    return str(model.tag)


def build_bento(bentoml_home: Path, model_tag: str) -> str:
    """`bentoml build` of serving/bentofile.yaml with the model pinned, offline; return the Bento's tag."""
    command = [sys.executable, "-m", "bentoml", "build", "-f", str(BENTOFILE), "--output", "tag",
               "--arg", f"model_tag={model_tag}", str(REPO_ROOT)]
    env = {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}
    log.info("building the Bento: %s", " ".join(command))
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    tags = [line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line]
    if done.returncode != 0 or not tags:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
        raise DataError(f"`bentoml build` failed:\n{tail}\n", "fix the error above; builds need `uv` installed and "
                        "serving/bentofile.yaml's `lock_packages: false` to work offline")
    return tags[-1]
