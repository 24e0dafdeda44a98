"""DVC: `dvc repro` reproduces the stages from a fresh copy of the repository, `dvc exp run -S` changes a
hyperparameter, and raw data tracked with a `.dvc` file goes to the default remote and comes back in a clone, its
hash the one the pipeline records."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from m2rec.data.synthetic import SyntheticParams, generate_synthetic
from m2rec.pipeline.lineage import dvc_hash, input_lineage

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
OUT = "artifacts/dvc"
TINY = {"synthetic": {"n_users": 120, "n_items": 80, "max_length": 30},
        "model": {"hidden_size": 16, "d_state": 8, "max_length": 20}, "train": {"epochs": 1}}


def run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
           "HF_HUB_OFFLINE": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Path:
    """A fresh copy of the repository as a clone would have it (committed and new files, nothing ignored), with
    params for a tiny model, committed, and a remote of its own (so nothing leaves the test folder)."""
    root = tmp_path_factory.mktemp("dvc")
    target = root / "repo"
    files = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    params = yaml.safe_load((target / "params.yaml").read_text())
    for section, values in TINY.items():
        params[section].update(values)
    (target / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run("git", "init", "-q", cwd=target)
    run("git", "add", "-A", cwd=target)
    run("git", "commit", "-qm", "fresh clone", cwd=target)
    run("dvc", "remote", "modify", "--local", "local", "url", str(root / "remote"), cwd=target)
    return target


def test_dvc_is_initialised_without_analytics_and_with_a_default_local_remote():
    config = (REPO / ".dvc" / "config").read_text()
    assert "analytics = false" in config and "remote = local" in config
    assert (REPO / ".dvcignore").is_file()


@pytest.mark.slow
def test_dvc_repro_then_an_experiment_with_one_hyperparameter_changed(clone):
    run("dvc", "repro", cwd=clone)
    metrics = json.loads((clone / OUT / "metrics.json").read_text())
    assert metrics["test"]["NDCG@10"] > 0 and metrics["model_type"] == "m2rec"
    assert json.loads((clone / OUT / "validation" / "results.json").read_text())["success"] is True
    assert len(list((clone / OUT / "features").glob("*/data/online_store.db"))) == 1
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
    assert set(lock) == {"prepare", "validate", "features", "train", "evaluate"}
    assert lock["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    shown = json.loads(run("dvc", "metrics", "show", "--json", cwd=clone))
    assert "metrics.json" in json.dumps(shown) and "NDCG@10" in json.dumps(shown)
    plots = json.loads(run("dvc", "plots", "show", "--json", cwd=clone))
    assert f"{OUT}/model/history.json" in plots["data"]
    assert "up to date" in run("dvc", "status", cwd=clone)  # no stage changed what an earlier one wrote
    # outputs are git-ignored where they are: dvc repro leaves only dvc.lock to commit
    status = run("git", "status", "--porcelain", cwd=clone).split("\n")
    assert [line for line in status if line.strip()] == ["?? dvc.lock"]

    run("git", "add", "dvc.lock", cwd=clone)
    run("git", "commit", "-qm", "baseline", cwd=clone)
    output = run("dvc", "exp", "run", "-S", "train.epochs=2", cwd=clone)
    assert "Stage 'prepare' is cached" in output or "didn't change" in output  # the data is not redone
    history = json.loads((clone / OUT / "model" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    experiments = json.loads(run("dvc", "exp", "show", "--json", cwd=clone))
    assert "'epochs': 2" in str(experiments) or '"epochs": 2' in json.dumps(experiments)


def raw_tables(folder: Path) -> None:
    """Raw interactions and items as CSV files (the `table` format), from the synthetic generator."""
    raw = generate_synthetic(SyntheticParams(n_users=120, n_items=80, max_length=30))
    folder.mkdir(parents=True)
    raw.interactions.assign(timestamp=raw.interactions["timestamp"].astype("int64") // 10**9).to_csv(
        folder / "interactions.csv", index=False)
    raw.items[["item_id", "title", "text"]].to_csv(folder / "items.csv", index=False)


def test_raw_data_tracked_with_a_dvc_file_is_a_git_commit_restored_from_the_remote(clone, tmp_path):
    raw = clone / "data" / "raw" / "shop"
    raw_tables(raw)
    run("dvc", "add", "data/raw/shop", cwd=clone)
    run("git", "add", "data/raw/shop.dvc", "data/raw/.gitignore", cwd=clone)
    run("git", "commit", "-qm", "raw data version 1", cwd=clone)
    run("dvc", "push", cwd=clone)
    tracked = yaml.safe_load((clone / "data/raw/shop.dvc").read_text())["outs"][0]["md5"]

    # the pipeline records the same hash, the .dvc file and the commit holding it
    facts = input_lineage(raw)
    assert facts["dvc_md5"] == tracked == dvc_hash(raw) and facts["dvc_modified"] is False
    assert facts["dvc_file"].endswith("data/raw/shop.dvc")
    assert facts["git_commit"] == run("git", "rev-parse", "HEAD", cwd=clone).strip()
    assert input_lineage(raw / "interactions.csv")["dvc_file"] == facts["dvc_file"]  # a file inside it

    # point the DVC pipeline at the tracked data: prepare depends on it, and dvc.lock records its hash
    stages = yaml.safe_load((clone / "dvc.yaml").read_text())
    options = "--items data/raw/shop/items.csv --item-columns item_id=item_id,text=text"
    stages["vars"][0]["source"] = {"format": "table", "input": "data/raw/shop", "options": options}
    stages["stages"]["prepare"]["cmd"] = stages["stages"]["prepare"]["cmd"].replace(
        "--input ${source.input} ", "--input ${source.input}/interactions.csv ")
    (clone / "dvc.yaml").write_text(yaml.safe_dump(stages, sort_keys=False))
    run("dvc", "repro", "validate", cwd=clone)
    lock = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]["prepare"]
    assert {"path": "data/raw/shop", "md5": tracked} in [{k: d[k] for k in ("path", "md5")} for d in lock["deps"]]
    prepared = pd.read_parquet(clone / OUT / "data" / "interactions.parquet")
    assert prepared["user_id"].nunique() == 120

    # a clone gets the data version back from the default remote
    other = tmp_path / "other"
    run("git", "clone", "-q", str(clone), str(other), cwd=tmp_path)
    assert not (other / "data/raw/shop").exists()
    run("dvc", "remote", "modify", "--local", "local", "url", str(clone.parent / "remote"), cwd=other)
    run("dvc", "pull", "data/raw/shop.dvc", cwd=other)
    assert (other / "data/raw/shop/interactions.csv").read_bytes() == (raw / "interactions.csv").read_bytes()
