"""Where a prepared dataset came from: its input's DVC hash (what `dvc add` records), the `.dvc` file that tracks
the input and the git commit holding that file, so a registered model can be traced to a dataset version."""

from __future__ import annotations

import logging
import subprocess
import tempfile
from dataclasses import asdict
from pathlib import Path

import yaml

from m2rec.data.sources import SourceSpec
from m2rec.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)
LINEAGE_FILE = "lineage.json"  # written next to stats.json in the prepared dataset


def dvc_hash(path: str | Path) -> str | None:
    """The md5 DVC gives `path` (a folder's ends in `.dir`), computed with DVC's own hashing; None if unavailable."""
    try:
        from dvc_data.hashfile.build import build
        from dvc_data.hashfile.db.local import LocalHashFileDB
        from dvc_objects.fs.local import LocalFileSystem
    except ImportError:  # dvc is a dependency, but its internal layout may change
        return None
    fs = LocalFileSystem()
    with tempfile.TemporaryDirectory() as scratch:
        _, _, obj = build(LocalHashFileDB(fs, scratch), str(Path(path).resolve()), fs, "md5")
    return obj.hash_info.value


def tracking_file(path: str | Path) -> Path | None:
    """The `.dvc` file that tracks `path` or a folder above it (as `dvc add` writes them), if any."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents):
        if candidate.name and candidate.with_name(candidate.name + ".dvc").is_file():
            return candidate.with_name(candidate.name + ".dvc")
    return None


def recorded_hash(dvc_file: Path) -> str | None:
    """The md5 a `.dvc` file records for its (single) output."""
    outs = (yaml.safe_load(dvc_file.read_text()) or {}).get("outs") or [{}]
    return outs[0].get("md5")


def git_commit(path: Path) -> str | None:
    """HEAD of the git repository holding `path`, if `path` is committed there unchanged."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", "-C", str(path.parent), *args], capture_output=True, text=True)

    try:
        if git("ls-files", "--error-unmatch", path.name).returncode != 0 or git(
                "diff", "--quiet", "HEAD", "--", path.name).returncode != 0:
            return None
        return git("rev-parse", "HEAD").stdout.strip() or None
    except OSError:  # no git
        return None


def input_lineage(path: str | Path | None) -> dict:
    """DVC facts about one input file or folder: its hash now, and the tracking `.dvc` file, hash and commit."""
    if not path:
        return {}
    path = Path(path).expanduser()
    facts: dict = {"path": str(path.resolve()), "dvc_md5": dvc_hash(path)}
    dvc_file = tracking_file(path)
    if dvc_file is not None:
        tracked = recorded_hash(dvc_file) if dvc_file.with_suffix("").resolve() == path.resolve() else None
        facts.update(dvc_file=str(dvc_file), dvc_tracked_md5=tracked, git_commit=git_commit(dvc_file),
                     # the input differs from what the committed .dvc file records: not a reproducible version
                     dvc_modified=tracked is not None and tracked != facts["dvc_md5"])
    return facts


def write_lineage(source: SourceSpec, data_dir: str | Path, stats: dict) -> dict:
    """Record where the tables in `data_dir` came from in `<data_dir>/lineage.json`; return the record."""
    record = {
        "dataset_version": stats.get("dataset_version"),
        "source": asdict(source),
        "source_name": stats.get("source"),
        "input": input_lineage(source.input),
        "items": input_lineage(source.items),
        "events": stats.get("events"),  # the event log's cutoff and how many events were merged
    }
    # the one hash to tag a run with: the input's DVC hash (None for generated data)
    record["dvc_md5"] = record["input"].get("dvc_md5")
    atomic_write_json(Path(data_dir) / LINEAGE_FILE, record)
    log.info("dataset %s from %s (DVC md5 %s)", record["dataset_version"], source.input or record["source_name"],
             record["dvc_md5"])
    return record


def run_tags(lineage: dict) -> dict[str, str]:
    """MLflow tags of a dataset's lineage (empty values left out)."""
    tags = {
        "dataset.version": lineage.get("dataset_version"),
        "dataset.source": lineage.get("source_name"),
        "dataset.input": lineage.get("input", {}).get("path"),
        "dataset.dvc_md5": lineage.get("dvc_md5"),
        "dataset.dvc_file": lineage.get("input", {}).get("dvc_file"),
        "dataset.git_commit": lineage.get("input", {}).get("git_commit"),
        "dataset.items_dvc_md5": lineage.get("items", {}).get("dvc_md5"),
        "dataset.events_merged": (lineage.get("events") or {}).get("merged"),
        "dataset.events_through_seq": (lineage.get("events") or {}).get("through_seq"),
    }
    return {key: str(value) for key, value in tags.items() if value not in (None, "")}


def tag_run(tracking_uri: str, run_id: str, data_dir: str | Path) -> dict[str, str]:
    """Tag MLflow run `run_id` with the lineage of the dataset in `data_dir` (if it has a lineage.json)."""
    import json

    from mlflow.tracking import MlflowClient

    file = Path(data_dir) / LINEAGE_FILE
    if not file.is_file():
        return {}
    tags = run_tags(json.loads(file.read_text()))
    client = MlflowClient(tracking_uri)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    return tags
