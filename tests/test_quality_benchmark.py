"""The quality study's machinery: a balanced tuning grid, a paired test that tells a real lead from noise, and a
study that runs end to end, writes its report and resumes from the runs it stored."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from m2rec.training.trainer import TrainParams

from conftest import BENCHMARKS, load_benchmark

quality = load_benchmark("quality")


def test_half_grid_balances_every_factor_and_pair():
    points = quality.grid_points("half")
    assert len(points) == 4 and len(quality.grid_points("full")) == 8 and len(quality.grid_points("none")) == 1
    for name, levels in quality.GRID.items():
        assert sorted(p[name] for p in points) == sorted(levels * 2)
    for a, b in itertools.combinations(quality.GRID, 2):
        assert len({(p[a], p[b]) for p in points}) == 4


def test_paired_test_tells_a_real_lead_from_noise():
    rng = np.random.default_rng(0)
    theirs = (rng.random(3000) < 0.10).astype(float)
    ours = np.maximum(theirs, rng.random(3000) < 0.04)  # ours hits wherever theirs does, and more
    lead = quality.paired_test(ours, theirs)
    assert lead["p_value"] < 0.001 and lead["ci95"][0] > 0 and lead["relative_difference"] > 0.2
    noise = quality.paired_test(theirs[rng.permutation(3000)], theirs)
    assert noise["p_value"] > 0.05 and noise["ci95"][0] < 0 < noise["ci95"][1]


def test_paired_tests_take_the_user_as_the_unit_not_each_seed():
    """Seeds that repeat a run add no evidence: three identical seeds test as one, where pooling the (user, seed)
    pairs as independent would shrink the p-value and the interval."""
    rng = np.random.default_rng(1)
    theirs_ranks, ours_ranks = rng.integers(0, 40, 600), rng.integers(0, 36, 600)
    one = quality.paired_tests({"a": [{"ranks": ours_ranks}], "b": [{"ranks": theirs_ranks}]}, "a", ["b"])
    three = quality.paired_tests({"a": [{"ranks": ours_ranks}] * 3, "b": [{"ranks": theirs_ranks}] * 3}, "a", ["b"])
    for metric in ("HR@10", "NDCG@10"):
        assert three["b"][metric]["p_value"] == pytest.approx(one["b"][metric]["p_value"], abs=0.02)
        assert three["b"][metric]["ci95"] == pytest.approx(one["b"][metric]["ci95"], abs=0.02)
    assert 0.01 < one["b"]["HR@10"]["p_value"] < 0.9  # a lead within noise: pooled, the p-value would fall 4-fold


def test_study_runs_end_to_end_and_resumes_from_stored_runs(tiny_synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "CACHE", tmp_path / "cache")
    models = ["m2rec", "m2rec_default", "sasrec", "sasrec_text", "mamba4rec", "m2rec_no_fft", "m2rec_default_no_gate"]
    train = TrainParams(epochs=1, batch_size=32, progress=False)
    study = quality.Study(tiny_synthetic, train, runs_dir=tmp_path / "runs", checkpoints_dir=tmp_path / "ckpt")
    trained, train_job = [], quality.train_job

    def counted(*args, **kwargs) -> list[dict]:  # which variants train a run of their own
        trained.append(args[1])
        return train_job(*args, **kwargs)

    monkeypatch.setattr(quality, "train_job", counted)
    entry = quality.study_dataset(study, models, quality.grid_points("none"), seeds=2, with_cold_start=True)
    assert "m2rec_default_placed" not in trained  # read from the cold-start run of m2rec_default
    assert len(trained) == 2 * len(models) + len(quality.COLD_START_MODELS) - 1
    assert set(entry) == {*models, "_meta"}
    assert not any((tmp_path / "ckpt").rglob("*.pt"))  # a stored run leaves no checkpoint behind
    assert entry["m2rec"]["seeds"] == [42, 43] and len(entry["m2rec"]["best_epochs"]) == 2
    assert set(entry["m2rec"]["mean_gates"]) == {"temporal", "frequency", "semantic"}
    assert "mean_gates" not in entry["sasrec"] and "mean_gates" not in entry["sasrec_text"]
    assert set(entry["_meta"]["significance"]) == {"m2rec_default", "sasrec", "sasrec_text", "mamba4rec",
                                                   "m2rec_no_fft", "m2rec_default_no_gate"}
    assert set(entry["_meta"]["default_significance"]) == {"m2rec", "sasrec_text", "sasrec", "mamba4rec",
                                                           "m2rec_default_no_gate"}
    assert quality.ablated("m2rec_default_no_gate") == "m2rec_default" and quality.ablated("m2rec_no_fft") == "m2rec"
    assert entry["m2rec_default_no_gate"]["mean_gates"] == pytest.approx({"temporal": 1 / 3, "frequency": 1 / 3,
                                                                          "semantic": 1 / 3})
    cold = entry["_meta"]["cold_start"]
    assert set(quality.COLD_START_MODELS) <= set(cold) and cold["held_out_items"] > 0
    assert quality.configure("m2rec_default_placed", quality.DEFAULT_POINT, 20)[2]["impute_untrained"]
    assert quality.configure("m2rec_default", quality.DEFAULT_POINT, 20)[1].text_in_sequence
    assert not quality.configure("m2rec", quality.DEFAULT_POINT, 20)[1].text_in_sequence

    def must_not_train(*args, **kwargs):
        raise AssertionError("a stored run was trained again")

    monkeypatch.setattr(quality, "train_job", must_not_train)
    again = quality.study_dataset(study, models, quality.grid_points("none"), seeds=2, with_cold_start=True)
    assert again["m2rec"] == entry["m2rec"] and again["_meta"]["cold_start"] == cold

    # reported from stored runs alone: each model with the seeds it has, a model with none left out
    stored_only = quality.Study(tiny_synthetic, train, runs_dir=tmp_path / "runs", train_missing=False)
    stored_only._stored(("sasrec", quality.DEFAULT_POINT, 43)).unlink()
    partial = quality.study_dataset(stored_only, [*models, "m2rec_no_text"], quality.grid_points("none"), seeds=3,
                                    with_cold_start=True)
    assert "m2rec_no_text" not in partial and partial["m2rec"]["seeds"] == [42, 43]
    assert partial["sasrec"]["seeds"] == [42] and partial["_meta"]["cold_start"] == cold
    assert "sasrec" in partial["_meta"]["significance"]
    assert "each model's stored seeds (one seed: ± 0): m2rec [42, 43]" in quality.seeds_note(quality.models_of(partial))

    output = tmp_path / "results" / "quality.json"
    entry["_meta"]["command"] = "python benchmarks/quality.py ..."
    quality.save(output, "tiny", entry)
    saved = json.loads(output.read_text())
    assert saved["tiny"]["m2rec"]["HR@10"]["mean"] == pytest.approx(entry["m2rec"]["HR@10"]["mean"])
    report = output.with_suffix(".md").read_text()
    assert "| m2rec |" in report and "| sasrec_text |" in report and "smoothed by an EMA" in report
    assert "| valid NDCG@10 |" in report and f"{entry['m2rec']['valid_NDCG@10']['mean']:.4f} ±" in report
    assert "| m2rec_default vs | metric |" in report and "| m2rec vs | metric |" in report
    assert entry["m2rec"]["epochs_run"] == [1, 1]  # one epoch allowed: every run ended at the cap
    assert "cap before the stopping rule fired: m2rec (seed 42), m2rec (seed 43)" in report
    older = json.loads(json.dumps(entry))  # a study stored before sasrec_text and the smoothed stopping rule
    for key in ("min_epochs", "smoothing"):
        del older["_meta"][key]
    del older["_meta"]["cold_start"]["sasrec_text"]
    for model in quality.models_of(older).values():
        del model["epochs_run"]
    assert "early stop after" in quality.markdown({"older": older})
    assert "did not record the epochs" in quality.markdown({"older": older})
    assert (output.parent / "quality_curves.png").stat().st_size > 0
    assert (output.parent / "quality_effects.png").stat().st_size > 0


def test_every_compared_model_is_tuned_and_an_ablation_takes_the_point_of_the_model_it_ablates(tmp_path, monkeypatch):
    grid = quality.grid_points("half")
    tuned = []

    def choose(self, variants, grid):  # a different point per tuned model, so inherited points can be told apart
        tuned.extend(variants)
        return {v: grid[i % len(grid)] for i, v in enumerate(variants)}

    class Planned(Exception):
        pass

    def run_all(self, jobs):
        raise Planned(jobs)

    monkeypatch.setattr(quality.Study, "choose", choose)
    monkeypatch.setattr(quality.Study, "run_all", run_all)
    models = ["m2rec", "m2rec_default", "sasrec", "m2rec_no_fft", "m2rec_default_no_gate"]
    with pytest.raises(Planned) as planned:
        quality.study_dataset(quality.Study(tmp_path, TrainParams()), models, grid, seeds=1, with_cold_start=False,
                              carried={"sasrec": grid[3], "m2rec_no_fft": grid[2]})
    point = {job[0]: job[1] for job in planned.value.args[0]}
    assert tuned == ["m2rec", "m2rec_default"]  # sasrec carried over; the shipped default is a model, not an ablation
    # an ablation's carried point is ignored: it follows the model it ablates
    assert point["sasrec"] == grid[3] and point["m2rec"] != point["m2rec_default"]
    assert point["m2rec_no_fft"] == point["m2rec"] and point["m2rec_default_no_gate"] == point["m2rec_default"]
    assert quality.ablated("m2rec_default") is None and quality.ablated("m2rec_text_in_sequence") == "m2rec"


def test_sampled_users_keep_whole_histories_of_a_seeded_sample():
    from m2rec.data.sources import SourceSpec, read_source

    raw = read_source(SourceSpec("synthetic"))
    sample = quality.sampled_users(raw, 50)
    assert sample.interactions["user_id"].nunique() == 50 and len(sample.items) == len(raw.items)
    kept = raw.interactions[raw.interactions["user_id"].isin(sample.interactions["user_id"].unique())]
    assert len(sample.interactions) == len(kept)  # every interaction of a drawn user, none of the others
    assert quality.sampled_users(raw, 50).interactions.equals(sample.interactions)  # seeded
    with pytest.raises(SystemExit, match="ask for fewer"):
        quality.sampled_users(raw, 10**6)


def test_a_run_killed_part_way_resumes_from_its_last_epoch(tiny_synthetic, tmp_path):
    """A run stopped after its first epoch (its checkpoint left behind) continues from there and ends exactly as
    an uninterrupted run: a killed study loses at most one epoch of each run in flight."""
    def run(epochs: int, folder: str) -> dict:
        train = TrainParams(epochs=epochs, batch_size=32, patience=50, progress=False)
        return quality.train_job(str(tiny_synthetic), "sasrec", quality.DEFAULT_POINT, 42, train,
                                 str(tmp_path / folder))[0]

    whole = run(2, "whole")
    first = run(1, "killed")
    resumed = run(2, "killed")
    assert len(first["curve"]) == 1 and resumed["curve"][0] == first["curve"][0]
    assert resumed["curve"] == pytest.approx(whole["curve"]) and len(resumed["curve"]) == 2
    np.testing.assert_array_equal(resumed["ranks"], whole["ranks"])


def test_a_placed_variant_read_from_its_models_run_equals_one_trained_on_its_own(tiny_synthetic, tmp_path):
    """Placing untrained items by their text acts after training, so the cold-start study reads the placed default
    from the default's own run (one run fewer): what it reads equals a placed run trained on its own, and differs
    from the model as trained where the held-out items are the targets."""
    train = TrainParams(epochs=2, batch_size=32, patience=50, impute_untrained=False, progress=False)
    data = quality._dataset(str(tiny_synthetic))
    held_out = tuple(quality.held_out_items(data, 42).tolist())
    as_trained, read = quality.train_job(str(tiny_synthetic), "m2rec_default", quality.DEFAULT_POINT, 42, train,
                                         str(tmp_path / "base"), held_out, also_placed=True)
    [alone] = quality.train_job(str(tiny_synthetic), "m2rec_default_placed", quality.DEFAULT_POINT, 42, train,
                                str(tmp_path / "placed"), held_out)
    np.testing.assert_array_equal(read["ranks"], alone["ranks"])
    cold = quality.item_mask(data.num_items, held_out)[data.histories("test")[1]]
    assert cold.any() and not np.array_equal(read["ranks"][cold], as_trained["ranks"][cold])


def test_a_field_added_later_changes_only_the_keys_of_runs_that_read_it(tiny_synthetic, tmp_path, monkeypatch):
    """text_in_sequence came after runs were stored: a SASRec run keeps its key whatever the field's value (SASRec
    ignores it), an M2Rec run at the value stored runs trained with keeps its key, and at another value gets a new
    one (it is another model)."""
    study = quality.Study(tiny_synthetic, TrainParams(epochs=1), runs_dir=tmp_path)
    sasrec, paper = ("sasrec", quality.DEFAULT_POINT, 42), ("m2rec", quality.DEFAULT_POINT, 42)
    before = {job[0]: study._stored(job) for job in (sasrec, paper)}
    monkeypatch.setitem(quality.VARIANTS, "sasrec", ("sasrec", {"text_in_sequence": False}))
    assert study._stored(sasrec) == before["sasrec"]
    monkeypatch.setitem(quality.VARIANTS, "m2rec", ("m2rec", {**quality.PAPER, "text_in_sequence": True}))
    assert study._stored(paper) != before["m2rec"]


def test_item_text_embeddings_are_computed_once_and_kept_beside_the_prepared_dataset(tiny_synthetic, tmp_path,
                                                                                        monkeypatch):
    """Every run reads one embeddings file kept in the dataset's folder, so a machine that has the prepared folder
    (a lent GPU) needs neither the text encoder nor its cache."""
    data = tmp_path / "tiny"
    shutil.copytree(tiny_synthetic, data)
    (data / quality.TEXT_EMBEDDINGS).unlink(missing_ok=True)  # an earlier study of the shared fixture wrote one
    texts = quality.PreparedDataset.load(data).items["text"].tolist()
    embedded = []
    monkeypatch.setattr(quality, "embed_texts", lambda batch, params: embedded.append(batch) or
                        np.arange(len(batch) * 3, dtype=np.float32).reshape(len(batch), 3))
    first = quality.dataset_text_embeddings(data)
    assert embedded == [texts] and first.shape == (len(texts), 3)
    assert (data / quality.TEXT_EMBEDDINGS).exists()
    monkeypatch.setattr(quality, "_LOADED", {})  # another process: nothing loaded yet
    assert np.array_equal(quality.dataset_text_embeddings(data), first) and len(embedded) == 1


def test_a_study_without_paired_tests_draws_no_effects_plot(tmp_path):
    """Baselines alone (a tuning grid of SASRec, say) have no M2Rec to test against: nothing to draw, no error."""
    quality.plot_effects({"tiny": {"_meta": {}, "sasrec": {}}}, tmp_path / "effects.png")
    assert not (tmp_path / "effects.png").exists()


def test_a_pool_worker_ends_when_its_study_is_killed(tmp_path):
    """SIGKILL reaches the study's process, not its pool workers: each ends on its own once its parent is gone,
    instead of training on beside the resumed study and writing the same checkpoint."""
    study = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import concurrent.futures, multiprocessing, os, sys, time
        sys.path.insert(0, {str(BENCHMARKS)!r})
        import quality
        pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                                      initializer=quality._init_worker, initargs=(1,))
        print(pool.submit(os.getpid).result(), flush=True)
        pool.submit(time.sleep, 300)  # a run in flight
        time.sleep(300)
        """)], stdout=subprocess.PIPE, text=True)
    worker = int(study.stdout.readline())
    study.send_signal(signal.SIGKILL)
    study.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(worker):
        time.sleep(0.2)
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the pool worker outlived its study"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by init, counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
