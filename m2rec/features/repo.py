"""Feature builds: each a Feast repository of its own under a root folder, named by its build key (the dataset
version and the settings), with the definitions of the `feature_repo` package, a configured feature_store.yaml and
a `data/` folder for the parquet tables, the registry and the SQLite online store. A build is written once and never
overwritten, so the build a service reads cannot change under it."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import yaml

from m2rec.errors import ConfigError, ExternalServiceError
from m2rec.spark.session import SparkParams, spark_conf, use_java

log = logging.getLogger(__name__)
logging.getLogger("feast.infra.registry.registry").setLevel(logging.WARNING)  # "cache expired" on every read

DEFINITION_FILES = ("definitions.py", ".feastignore")
DATA_FOLDER = "data"  # inside the repository; relative paths in definitions.py point here
ONLINE_STORES = ("sqlite", "redis")
OFFLINE_STORES = ("file", "spark")


@dataclass
class FeatureParams:
    """How features are built and where they are served from (params.yaml section `features`)."""

    project: str = "m2rec"  # Feast project name prefix (each build's project adds its build key); Redis key prefix
    root: str = "artifacts/features"  # folder holding one Feast repository per build
    max_sequence_length: int = 200  # items kept per user sequence (the most recent ones)
    online_store: str = "sqlite"  # "sqlite": data/online_store.db in the repository; "redis": a Redis server
    # Feast syntax host:port[,password=...][,ssl=true]; ${VAR} is read from the environment when Feast loads the
    # repository, so a password stays a secret: "redis:6379,password=${M2REC_REDIS_PASSWORD}"
    redis_connection_string: str = "127.0.0.1:6379"
    # where training's point-in-time reads run: "file": the parquet files under data/, read in this process (Feast's
    # DuckDB store); "spark": Feast's Spark offline store, in the session of params section `spark`
    offline_store: str = "file"


def template_dir() -> Path:
    """The committed definitions (the `feature_repo` package, installed beside m2rec)."""
    from importlib.resources import files

    return Path(str(files("feature_repo")))


def build_key(dataset_version: str, params: FeatureParams, text_model: str) -> str:
    """The name of a build: its dataset version and a digest of what else shapes its features or its repository
    (not the engine that wrote the tables: both write the same ones)."""
    settings = {"max_sequence_length": params.max_sequence_length, "text_model": text_model,
                "online_store": params.online_store, "project": params.project}
    if params.offline_store != "file":  # the default's builds keep the keys they had before the setting existed
        settings["offline_store"] = params.offline_store
    settings = json.dumps(settings, sort_keys=True)
    return f"{dataset_version}_{hashlib.sha256(settings.encode()).hexdigest()[:8]}"


def repo_config(params: FeatureParams, key: str, spark: SparkParams | None = None) -> dict:
    """Check `params`; return feature_store.yaml's content for build `key`: the committed template, the build's
    project (its Redis key prefix), online store and offline store set (Spark's session from `spark`)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_]*", params.project):
        raise ConfigError(f"features.project={params.project!r} is not a valid Feast project name",
                        "use letters, digits and underscores, starting with a letter or digit")
    if params.max_sequence_length < 1:
        raise ConfigError(f"features.max_sequence_length={params.max_sequence_length} keeps no items",
                        "set it to 1 or more")
    if params.online_store not in ONLINE_STORES:
        raise ConfigError(f"features.online_store={params.online_store!r} is not supported",
                        f"use one of {', '.join(ONLINE_STORES)}")
    if params.offline_store not in OFFLINE_STORES:
        raise ConfigError(f"features.offline_store={params.offline_store!r} is not supported",
                          f"use one of {', '.join(OFFLINE_STORES)}")
    if params.offline_store == "spark" and importlib.util.find_spec("pyspark") is None:
        raise ConfigError("features.offline_store='spark' needs pyspark (Feast's Spark offline store)",
                          "pip install 'm2rec[spark]' (and a Java 17 runtime), or set features.offline_store: file")
    config = yaml.safe_load((template_dir() / "feature_store.yaml").read_text())
    config["project"] = f"{params.project}_{key}"
    if params.online_store == "redis":
        config["online_store"] = {"type": "redis", "connection_string": params.redis_connection_string}
    if params.offline_store == "spark":  # definitions.py reads this type and gives its views SparkSources
        config["offline_store"] = {"type": "spark", "spark_conf": spark_conf(spark or SparkParams())}
    return config


def write_repo(repo_dir: Path, params: FeatureParams, key: str, spark: SparkParams | None = None) -> Path:
    """Make `repo_dir` the Feast repository of build `key`; return its data folder."""
    config = repo_config(params, key, spark)
    repo_dir.mkdir(parents=True, exist_ok=True)
    for name in DEFINITION_FILES:
        shutil.copyfile(template_dir() / name, repo_dir / name)
    (repo_dir / "feature_store.yaml").write_text(
        "# Written by `m2rec features build` from feature_repo/feature_store.yaml; edits are overwritten.\n"
        + yaml.safe_dump(config, sort_keys=False))
    data = repo_dir / DATA_FOLDER
    data.mkdir(exist_ok=True)
    return data


def feast_apply(repo_dir: Path) -> None:
    """Run `feast apply` in `repo_dir` (a subprocess: Feast imports the definitions and changes directory; with
    the Spark offline store it starts a Spark session, with $JAVA_HOME as `m2rec.spark.session.use_java` set it)."""
    command = [sys.executable, "-m", "feast.cli.cli", "--chdir", str(repo_dir), "apply"]
    done = subprocess.run(command, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        log.debug("feast apply: %s", line)
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-8:])
        raise ExternalServiceError(f"`feast apply` failed in {repo_dir}:\n{tail}\n",
                        "check the definitions and that the online store (e.g. Redis) is reachable")


def feature_store(repo_dir: Path):
    """A `feast.FeatureStore` on `repo_dir`."""
    from feast import FeatureStore

    # after the import, which turns DeprecationWarnings on: ibis (Feast's DuckDB offline store) still calls an
    # API that duckdb 2 deprecates, on every read, and there is nothing for a user to do about it
    warnings.filterwarnings("ignore", message="fetch_arrow_table", category=DeprecationWarning)
    store = FeatureStore(repo_path=str(repo_dir))
    if store.config.offline_store.type == "spark":
        import feast.infra.offline_stores.contrib.spark_offline_store.spark  # noqa: F401 (its filter first, then ours)

        # the Spark store and its sources warn on every read that they are experimental
        warnings.filterwarnings("ignore", message="The spark .* experimental", category=RuntimeWarning)
        use_java()  # Feast starts Spark (the build's spark_conf) on the first offline read
    return store
