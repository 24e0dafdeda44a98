"""Package a model folder for BentoML: a model in the BentoML model store, and a Bento built with `bentoml build`.
Public BentoML APIs only (`bentoml.models.create`, the `bentoml build` command); the Bento's build context is
assembled from the installed `m2rec` and `serving` packages, so an installed m2rec packages as well as a checkout,
and the Bento's Python dependencies are m2rec's own."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import requires
from pathlib import Path

import yaml

from m2rec.errors import ExternalServiceError
from m2rec.model.files import SERVED_FILES

log = logging.getLogger(__name__)

SERVICE = "serving.service:M2RecService"
CONTEXT_PACKAGES = ("m2rec", "serving")  # what the Bento's source holds
IMPORT_SCRIPT = """
import json, shutil, sys
from pathlib import Path
import bentoml
spec = json.load(sys.stdin)
with bentoml.models.create(spec["name"], labels=spec["labels"], metadata=spec["metadata"]) as model:
    for name in spec["files"]:
        shutil.copy2(Path(spec["model_dir"]) / name, Path(model.path) / name)
print(model.tag)
"""


@dataclass
class PackageParams:
    """What `m2rec package` packages and where (params.yaml section `package`)."""

    model_uri: str = "models:/m2rec@champion"
    bentoml_home: str | None = None  # None: $BENTOML_HOME, else BentoML's default (~/bentoml)
    feature_repo: str | None = None  # a feature build for the packaged version (else: its registered build)
    build: bool = True  # also build the Bento (else serve from source: `bentoml serve serving.service:...`)


def resolve_bentoml_home(home: str | Path | None) -> Path:
    return Path(home or os.environ.get("BENTOML_HOME") or Path.home() / "bentoml").expanduser().resolve()


def _bentoml_env(bentoml_home: Path) -> dict[str, str]:
    return {**os.environ, "BENTOML_HOME": str(bentoml_home), "BENTOML_DO_NOT_TRACK": "true"}


def _failure(what: str, done: subprocess.CompletedProcess, fix: str) -> ExternalServiceError:
    tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-12:])
    return ExternalServiceError(f"{what} failed:\n{tail}\n", fix)


def import_model(model_dir: str | Path, name: str, bentoml_home: Path, labels: dict[str, str],
                 metadata: dict) -> str:
    """Copy the serving files of `model_dir` into a new BentoML model `name` in `bentoml_home`; return its tag.
    A subprocess, since BentoML fixes its model store at the first use of BENTOML_HOME in a process."""
    spec = {"name": name, "labels": labels, "metadata": metadata, "model_dir": str(model_dir),
            "files": list(SERVED_FILES)}
    done = subprocess.run([sys.executable, "-c", IMPORT_SCRIPT], input=json.dumps(spec), text=True,
                          capture_output=True, env=_bentoml_env(bentoml_home))
    if done.returncode != 0:
        raise _failure("importing the model into BentoML", done,
                       f"fix the error above (the model store is {bentoml_home / 'models'})")
    tag = done.stdout.strip().splitlines()[-1]
    log.info("BentoML model %s saved in %s", tag, bentoml_home / "models")
    return tag


def runtime_requirements() -> list[str]:
    """m2rec's own runtime dependencies (no extras), from its installed metadata: the Bento installs these."""
    return [r for r in requires("m2rec") or [] if "extra ==" not in r]


def build_context(destination: Path) -> Path:
    """Write the Bento's build context: the installed `m2rec` and `serving` packages and a bentofile whose Python
    packages are m2rec's runtime dependencies. Returns the bentofile."""
    from importlib.util import find_spec

    for package in CONTEXT_PACKAGES:
        source = Path(find_spec(package).submodule_search_locations[0])
        shutil.copytree(source, destination / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    bentofile = yaml.safe_load((destination / "serving" / "bentofile.yaml").read_text())
    bentofile["python"]["packages"] = runtime_requirements()
    target = destination / "bentofile.yaml"
    target.write_text(yaml.safe_dump(bentofile, sort_keys=False))
    return target


def build_bento(bentoml_home: Path, model_tag: str) -> str:
    """`bentoml build` with the model pinned, offline; return the Bento's tag."""
    with tempfile.TemporaryDirectory() as scratch:
        context = Path(scratch)
        bentofile = build_context(context)
        command = [sys.executable, "-m", "bentoml", "build", "-f", str(bentofile), "--output", "tag",
                   "--arg", f"model_tag={model_tag}", str(context)]
        log.info("building the Bento: %s", " ".join(command))
        done = subprocess.run(command, cwd=context, env=_bentoml_env(bentoml_home), capture_output=True, text=True)
    tags = [line.split("__tag__:", 1)[1].strip() for line in done.stdout.splitlines() if "__tag__:" in line]
    if done.returncode != 0 or not tags:
        raise _failure("`bentoml build`", done, "fix the error above; builds need `uv` installed and "
                       "serving/bentofile.yaml's `lock_packages: false` to work offline")
    return tags[-1]
