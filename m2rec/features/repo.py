"""The Feast repository a build works in: definitions copied from `feature_repo/`, a configured feature_store.yaml,
and a gitignored `data/` folder for the parquet tables, the registry and the SQLite online store."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from m2rec.data.errors import DataError

log = logging.getLogger(__name__)
logging.getLogger("feast.infra.registry.registry").setLevel(logging.WARNING)  # "cache expired" on every read

TEMPLATE_DIR = Path(__file__).resolve().parents[2] / "feature_repo"  # the committed definitions
DEFINITION_FILES = ("definitions.py", ".feastignore", ".gitignore")
DATA_FOLDER = "data"  # inside the repository; relative paths in definitions.py point here
ONLINE_STORES = ("sqlite", "redis")


@dataclass
class FeatureParams:
    """How features are built and where they are served from (params.yaml section `features`)."""

    project: str = "m2rec"  # Feast project name; also the key prefix in Redis
    max_sequence_length: int = 200  # items kept per user sequence (the most recent ones)
    online_store: str = "sqlite"  # "sqlite": data/online_store.db in the repository; "redis": a Redis server
    redis_connection_string: str = "127.0.0.1:6379"  # Feast syntax: host:port[,password=...][,ssl=true]


def repo_config(params: FeatureParams) -> dict:
    """Check `params`; return feature_store.yaml's content: the committed template, project and online store set."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", params.project):
        raise DataError(f"features.project={params.project!r} is not a valid Feast project name",
                        "use letters, digits and underscores, starting with a letter or digit")
    if params.max_sequence_length < 1:
        raise DataError(f"features.max_sequence_length={params.max_sequence_length} keeps no items",
                        "set it to 1 or more")
    if params.online_store not in ONLINE_STORES:
        raise DataError(f"features.online_store={params.online_store!r} is not supported",
                        f"use one of {', '.join(ONLINE_STORES)}")
    template = TEMPLATE_DIR / "feature_store.yaml"
    if not template.is_file():
        raise DataError(f"feature definitions not found at {TEMPLATE_DIR}",
                        "run from a checkout of the repository (feature_repo/ sits next to m2rec/)")
    config = yaml.safe_load(template.read_text())
    config["project"] = params.project
    if params.online_store == "redis":
        config["online_store"] = {"type": "redis", "connection_string": params.redis_connection_string}
    return config


def write_repo(repo_dir: Path, params: FeatureParams) -> Path:
    """Make `repo_dir` a Feast repository for `params`; return its data folder."""
    config = repo_config(params)
    repo_dir.mkdir(parents=True, exist_ok=True)
    if repo_dir.resolve() == TEMPLATE_DIR:
        if config != yaml.safe_load((TEMPLATE_DIR / "feature_store.yaml").read_text()):
            raise DataError("the committed feature_repo/ keeps the default configuration",
                            "pass --repo a working folder (e.g. artifacts/feature_repo) for other settings")
    else:
        for name in DEFINITION_FILES:
            shutil.copyfile(TEMPLATE_DIR / name, repo_dir / name)
        (repo_dir / "feature_store.yaml").write_text(
            "# Written by `m2rec features build` from feature_repo/feature_store.yaml; edits are overwritten.\n"
            + yaml.safe_dump(config, sort_keys=False))
    data = repo_dir / DATA_FOLDER
    data.mkdir(exist_ok=True)
    return data


def feast_apply(repo_dir: Path) -> None:
    """Run `feast apply` in `repo_dir` (a subprocess: Feast imports the definitions and changes directory)."""
    command = [sys.executable, "-m", "feast.cli.cli", "--chdir", str(repo_dir), "apply"]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        log.debug("feast apply: %s", line)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise DataError(f"`feast apply` failed in {repo_dir}:\n{tail}\n",
                        "check the definitions and that the online store (e.g. Redis) is reachable")


def feature_store(repo_dir: Path):
    """A `feast.FeatureStore` on `repo_dir`."""
    from feast import FeatureStore

    # after the import, which turns DeprecationWarnings on: ibis (Feast's DuckDB offline store) still calls an
    # API that duckdb 2 deprecates, on every read, and there is nothing for a user to do about it
    warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
    return FeatureStore(repo_path=str(repo_dir))
