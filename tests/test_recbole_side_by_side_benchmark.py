"""The RecBole side by side: parallel runs (one process per side and seed) merge into one results file without
losing a run, and the summary says whether this project's SASRec lies within RecBole's seed range."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import load_benchmark

side_by_side = load_benchmark("recbole_side_by_side")


def _run(hr: float, ndcg: float, recbole: bool) -> dict:
    """One run's record as each side writes it (RecBole names its metrics `hit@10`, `ndcg@10`)."""
    test = {"hit@10": hr, "ndcg@10": ndcg} if recbole else {"HR@10": hr, "NDCG@10": ndcg}
    return {"test": test, "valid": test, "best_epoch": 3, "epochs_run": 13}


def _merge_one(output: Path, side: str, seed: int, hr: float) -> None:
    side_by_side.merge(output, side, seed, _run(hr, hr / 2, side == "recbole_sasrec"), "test")


def test_parallel_runs_merge_into_one_file_and_none_is_lost(tmp_path):
    output = tmp_path / "recbole_side_by_side.json"
    runs = [(side, seed, 0.10 + seed / 1000) for side in ("recbole_sasrec", "m2rec_sasrec") for seed in (42, 43, 44)]
    processes = [multiprocessing.get_context("fork").Process(target=_merge_one, args=(output, *run))
                 for run in runs]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    results = json.loads(output.read_text())
    assert {side: sorted(seeds) for side, seeds in results["runs"].items()} == {
        "recbole_sasrec": ["42", "43", "44"], "m2rec_sasrec": ["42", "43", "44"]}
    assert results["summary"]["recbole_sasrec"]["HR@10"]["mean"] == pytest.approx(0.143)
    assert results["summary"]["within_recbole_range"] == {"recbole_sasrec": {"HR@10": True, "NDCG@10": True}}
    assert side_by_side.stored(output, "recbole_sasrec", 44)  # a stored run is not run again
    assert not side_by_side.stored(output, "recbole_sasrec", 45)
    assert not side_by_side.stored(output, "recbole_sasrec_4_epochs", 42)


def test_parity_is_judged_against_recbole_seed_range_and_only_with_seeds_on_both_sides():
    recbole = {str(s): _run(hr, hr / 2, True) for s, hr in zip((42, 43, 44), (0.118, 0.120, 0.124))}
    close = {str(s): _run(hr, hr / 2, False) for s, hr in zip((42, 43, 44), (0.117, 0.121, 0.122))}
    below = {str(s): _run(hr, hr / 2, False) for s, hr in zip((42, 43, 44), (0.100, 0.104, 0.109))}
    summary = side_by_side.summarize({"recbole_sasrec": recbole, "m2rec_sasrec": close})
    assert summary["within_recbole_range"] == {"recbole_sasrec": {"HR@10": True, "NDCG@10": True}}
    assert summary["recbole_sasrec"]["HR@10"]["min"] == 0.118 and summary["m2rec_sasrec"]["seeds"] == [42, 43, 44]
    assert side_by_side.summarize({"recbole_sasrec": recbole, "m2rec_sasrec": below})["within_recbole_range"] == {
        "recbole_sasrec": {"HR@10": False, "NDCG@10": False}}
    assert "within_recbole_range" not in side_by_side.summarize({"recbole_sasrec": recbole,
                                                                 "m2rec_sasrec": {"42": close["42"]}})


def test_runs_at_a_shorter_epoch_cap_are_their_own_side_and_recbole_sides_are_judged_apart():
    assert side_by_side.side_name("recbole", side_by_side.RECBOLE_EPOCHS) == "recbole_sasrec"
    assert side_by_side.side_name("recbole", 4) == "recbole_sasrec_4_epochs"
    assert side_by_side.side_name("m2rec", side_by_side.RECBOLE_EPOCHS) == "m2rec_sasrec"
    assert side_by_side.side_name("m2rec", 4) == "m2rec_sasrec_4_epochs"  # never mixed with its converged runs
    converged = {str(s): _run(hr, hr / 2, True) for s, hr in zip((42, 43, 44), (0.130, 0.133, 0.136))}
    short = {str(s): _run(hr, hr / 2, True) for s, hr in zip((42, 43, 44), (0.110, 0.118, 0.125))}
    ours = {str(s): _run(hr, hr / 2, False) for s, hr in zip((42, 43, 44), (0.112, 0.117, 0.121))}
    summary = side_by_side.summarize({"recbole_sasrec": converged, "recbole_sasrec_4_epochs": short,
                                      "m2rec_sasrec": ours})
    assert summary["within_recbole_range"] == {"recbole_sasrec": {"HR@10": False, "NDCG@10": False},
                                               "recbole_sasrec_4_epochs": {"HR@10": True, "NDCG@10": True}}
    one_seed = side_by_side.summarize({"recbole_sasrec": {"42": converged["42"]}, "recbole_sasrec_4_epochs": short,
                                       "m2rec_sasrec": ours})
    assert set(one_seed["within_recbole_range"]) == {"recbole_sasrec_4_epochs"}


@pytest.fixture(scope="module")
def recbole() -> Path:
    """RecBole's interpreter, installed on demand as the benchmark does (a shared venv under /tmp, reused)."""
    try:
        return side_by_side.recbole_python(Path("/tmp/recbole-venv"))
    except subprocess.CalledProcessError as error:
        pytest.skip(f"RecBole 1.2.1 could not be installed from the package index ({error}); the resume test needs it")


def _tiny_dataset(root: Path) -> Path:
    """30 users with 25 time-ordered interactions each over 40 items, as RecBole's atomic file `tiny.inter`."""
    rng = np.random.default_rng(0)
    rows = [f"{user}\t{item}\t{1000 * user + t}" for user in range(1, 31)
            for t, item in enumerate(rng.integers(1, 41, size=25))]
    (root / "tiny").mkdir(parents=True)
    (root / "tiny" / "tiny.inter").write_text("user_id:token\titem_id:token\ttimestamp:float\n" + "\n".join(rows))
    return root


def test_a_recbole_run_paused_by_its_budget_and_resumed_is_the_uninterrupted_run(recbole, tmp_path):
    settings = {**side_by_side.recbole_settings(42, 3, "cpu", tmp_path / "saved"), "dataset": "tiny",
                "data_path": str(_tiny_dataset(tmp_path / "data")), "MAX_ITEM_LIST_LENGTH": 10,
                "train_batch_size": 64}
    straight = side_by_side.drive_recbole(recbole, settings, tmp_path / "straight.pt", None, tmp_path)
    resumed, calls = None, 0
    while resumed is None:  # a budget of 0 s pauses after each epoch: one epoch per call
        resumed = side_by_side.drive_recbole(recbole, settings, tmp_path / "resumed.pt", 0, tmp_path)
        calls += 1
    assert calls == 3 and straight["epochs_run"] == resumed["epochs_run"] == 3
    assert [e["loss"] for e in resumed["epochs"]] == [e["loss"] for e in straight["epochs"]]
    assert [e["valid_ndcg10"] for e in resumed["epochs"]] == [e["valid_ndcg10"] for e in straight["epochs"]]
    assert resumed["test"] == straight["test"] and resumed["valid"] == straight["valid"]
    assert resumed["best_epoch"] == straight["best_epoch"]
    losses = [e["loss"] for e in straight["epochs"]]
    assert losses[0] > losses[-1]  # it trained: the comparison is between runs that learn
    progress = torch.load(tmp_path / "resumed.pt", weights_only=True)  # the committed format loads safely
    assert progress["epoch"] == 2 and set(progress["best_model"]) == set(progress["model"])
