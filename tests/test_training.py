"""Training learns, checkpoints resume exactly after a kill, torchrun DDP works on CPU, metrics are right."""

from __future__ import annotations

import json
import io
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets, target_ranks
from m2rec.inference import Recommender
from m2rec.model.cold_start import TextToId, impute_untrained_embeddings
from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model
from m2rec.stages.train import evaluate, train
from m2rec.training.batching import epoch_batches, training_windows
from m2rec.training.stopping import epochs_since_best, should_stop, smoothed
from m2rec.training.trainer import TrainParams, item_counts, restore_rng_states, rng_states, seed_everything, train_model

BIN = Path(sys.executable).parent
FAST = dict(hidden_size=16, d_state=8, max_length=20, scales=[[0.001, 0.1], [0.1, 1.0]])


def test_metrics_from_ranks_by_hand():
    scores = torch.tensor([[0.0, 0.9, 0.1, 0.5], [0.0, 0.1, 0.2, 0.3]])
    ranks = target_ranks(scores, torch.tensor([3, 1])).numpy()
    assert ranks.tolist() == [1, 2]
    m = metrics_from_ranks(ranks, ks=(1, 2, 5))
    assert m["HR@1"] == 0.0 and m["HR@2"] == 0.5 and m["HR@5"] == 1.0
    assert m["NDCG@2"] == pytest.approx((1 / np.log2(3)) / 2)
    assert m["MRR@5"] == pytest.approx((1 / 2 + 1 / 3) / 2)


@pytest.mark.parametrize("model_type", ["m2rec", "sasrec", "mamba4rec"])
def test_ranks_come_back_in_user_order_whatever_the_length_batching(model_type):
    """rank_targets batches users by history length; each user's rank is the one it gets alone (batch of one),
    in the order the users were given, with and without masking the history."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = build_model(model_type, 30, ModelParams(**FAST), torch.randn(31, 12))
    histories = [rng.integers(1, 31, size=n) for n in rng.integers(1, 26, size=23)]  # some beyond max_length
    targets = rng.integers(1, 31, size=23)
    for mask in (False, True):
        alone = np.concatenate([rank_targets(model, [h], targets[i : i + 1], 1, mask)
                                for i, h in enumerate(histories)])
        np.testing.assert_array_equal(rank_targets(model, histories, targets, 4, mask), alone)


def trained_targets(windows) -> list[int]:
    return sorted(int(t) for _, targets in epoch_batches(windows, batch_size=4, seed=0) for t in targets[targets > 0])


def test_windows_cover_every_next_item_once():
    seq = np.arange(1, 12)
    windows = training_windows([seq], max_length=4)
    assert trained_targets(windows) == list(range(2, 12)) and all(len(w.items) <= 5 for w in windows)
    batches = list(epoch_batches(windows, batch_size=2, seed=0, rank=1, world_size=2))
    assert len(batches) == 1  # 3 windows -> 2 batches -> one per rank


@pytest.mark.parametrize("stride", [1, 2, 3])
def test_overlapping_windows_train_each_target_once_with_full_history(stride):
    seq = np.arange(1, 12)
    windows = training_windows([seq], max_length=4, stride=stride)
    assert trained_targets(windows) == list(range(2, 12))
    for window in windows:  # a trained target sees max_length - stride + 1 items of history, or all earlier ones
        for position in range(len(window.items) - window.targets, len(window.items)):
            earlier = int(window.items[position]) - 1  # items 1..11 in order: item j has j - 1 before it
            assert position >= min(4 - stride + 1, earlier)
    assert len(windows) == len(range(11, 1, -stride))
    if stride == 1:  # every prefix, as RecBole trains
        assert all(w.targets == 1 and len(w.items) == min(5, w.items[-1]) for w in windows)


def test_a_batch_counted_in_targets_holds_about_that_many_and_every_window_once():
    rng = np.random.default_rng(1)
    windows = training_windows([np.arange(1, n + 1) for n in rng.integers(2, 300, size=200)], max_length=50)
    batches = list(epoch_batches(windows, batch_size=64, seed=0, unit="targets"))
    trained = [int((targets > 0).sum()) for _, targets in batches]
    assert sum(trained) == sum(w.targets for w in windows)  # every target once
    assert sum(len(inputs) for inputs, _ in batches) == len(windows)
    assert max(trained) < 64 + 50 and np.mean(trained) > 64 * 0.8  # a batch ends with the window that reaches 64
    assert len(batches) > len(list(epoch_batches(windows, batch_size=64, seed=0))) * 10  # windows hold ~25 targets


def test_length_buckets_cut_padding_and_keep_every_window_once():
    rng = np.random.default_rng(0)
    windows = training_windows([np.arange(1, n + 1) for n in rng.integers(2, 51, size=1000)], max_length=60)

    def epoch(bucket: int) -> tuple[list[int], int]:
        seen, padded = [], 0
        for inputs, targets in epoch_batches(windows, batch_size=32, seed=3, bucket=bucket):
            seen += [int(t[t > 0][-1]) for t in targets]  # a window's last target is its length
            padded += int((targets == 0).sum())
        return sorted(seen), padded

    (bucketed, bucketed_padding), (plain, plain_padding) = epoch(50), epoch(1)
    assert bucketed == plain == sorted(len(w.items) for w in windows)
    assert bucketed_padding < plain_padding / 5


def write_params(path: Path, epochs: int, **model) -> Path:
    path.write_text(yaml.safe_dump({"model": {**FAST, **model}, "train": {"epochs": epochs, "batch_size": 32,
                                                                         "patience": 50, "progress": False}}))
    return path


@pytest.mark.parametrize("model_type", ["m2rec", "sasrec", "sasrec_text", "mamba4rec"])
def test_training_beats_chance_and_evaluate_reproduces_metrics(model_type, tiny_synthetic, tmp_path):
    metrics = train(tiny_synthetic, tmp_path / "m", model_type, ModelParams(**FAST),
                    TrainParams(epochs=8, batch_size=32, progress=False))
    n_items = len(pd.read_parquet(tiny_synthetic / "items.parquet"))
    assert metrics["valid"]["HR@10"] > 2 * 10 / n_items  # well above a random ranking
    history = json.loads((tmp_path / "m" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    again = evaluate(tmp_path / "m", tiny_synthetic)
    assert again["test"] == pytest.approx(metrics["test"], abs=1e-9)
    recs = Recommender(tmp_path / "m").recommend([[1, 2, 3], []], k=5)
    assert len(recs[0].item_ids) == 5 and recs[1].strategy == "popularity"
    assert (recs[0].gates is not None) == (model_type == "m2rec")


def test_killed_run_resumes_to_the_same_weights(tiny_synthetic, tmp_path):
    params = write_params(tmp_path / "params.yaml", epochs=4)
    command = [str(BIN / "m2rec"), "train", "--data", str(tiny_synthetic), "--model", "mamba4rec",
               "--params", str(params)]
    subprocess.run(command + ["--output", str(tmp_path / "whole")], check=True, capture_output=True)

    interrupted = tmp_path / "killed"
    process = subprocess.Popen(command + ["--output", str(interrupted)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = interrupted / "checkpoint.pt"
    deadline = time.time() + 300
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = torch.load(checkpoint, weights_only=True)["epoch"]
    assert 1 <= done < 4, "the run should have been killed part-way"
    assert not (interrupted / "model.safetensors").exists()
    subprocess.run(command + ["--output", str(interrupted), "--resume"], check=True, capture_output=True)

    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(interrupted / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        torch.testing.assert_close(resumed[name], whole[name], rtol=0, atol=0)
    history = json.loads((interrupted / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), torch.rand(1).item()


def test_checkpoint_keeps_every_random_generator():
    seed_everything(3)
    random.gauss(0, 1), np.random.randn()  # leave a cached Gaussian in both
    buffer = io.BytesIO()
    torch.save({"rng": rng_states()}, buffer)
    expected = draws()
    seed_everything(99)
    restore_rng_states(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["rng"])
    assert draws() == expected


def test_resume_needs_the_numpy_generator(tiny_synthetic, tmp_path, monkeypatch):
    """The batch order of each epoch comes from the numpy generator: a resumed run matches an uninterrupted
    one because the checkpoint restores it, and would not without it."""
    from m2rec.data.prepared import PreparedDataset

    data = PreparedDataset.load(tiny_synthetic)

    def last_weights(epochs: int, directory: Path, resume: bool = False) -> dict:
        torch.manual_seed(0)
        model = build_model("sasrec", data.num_items, ModelParams(**FAST))
        train_model(model, data.train_sequences(), *data.histories("valid"),
                    TrainParams(epochs=epochs, batch_size=32, patience=50, progress=False), directory, resume=resume)
        return torch.load(directory / "checkpoint.pt", weights_only=True)["model"]

    whole = last_weights(2, tmp_path / "whole")
    for restore_numpy in (True, False):
        directory = tmp_path / f"resumed-{restore_numpy}"
        last_weights(1, directory)
        np.random.seed(12345)  # what a new process would have
        with monkeypatch.context() as patch:
            if not restore_numpy:
                patch.setattr(np.random, "set_state", lambda state: None)
            resumed = last_weights(2, directory, resume=True)
        same = all(torch.equal(resumed[name], whole[name]) for name in whole)
        assert same == restore_numpy


def test_torchrun_data_parallel_on_cpu(tiny_synthetic, tmp_path):
    params = write_params(tmp_path / "params.yaml", epochs=2)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "m2rec.cli", "train",
         "--data", str(tiny_synthetic), "--model", "sasrec", "--params", str(params), "--output",
         str(tmp_path / "ddp"), "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["valid"]["HR@10"] > 0


def test_training_reads_features_through_feast(tiny_synthetic, tmp_path):
    from m2rec.data.prepared import PreparedDataset
    from m2rec.stages.features import build_features
    from m2rec.stages.train import features_from_store
    from m2rec.text.embeddings import embed_texts

    repo = Path(build_features(tiny_synthetic, tmp_path / "features")["repo_dir"])  # the build under the root
    data = PreparedDataset.load(tiny_synthetic)
    sequences, embeddings = features_from_store(repo, data)
    assert [s.tolist() for s in sequences] == [s.tolist() for s in data.train_sequences()]
    np.testing.assert_allclose(embeddings, embed_texts(data.items["text"].tolist()), atol=1e-6)
    metrics = train(tiny_synthetic, tmp_path / "m", "m2rec", ModelParams(**FAST),
                    TrainParams(epochs=1, batch_size=32, progress=False), feature_repo=repo)
    assert metrics["epochs_run"] == 1


def stop_epoch(curve: np.ndarray, **rule) -> int | None:
    """The epoch after which a run with validation curve `curve` stops, or None if it runs to the end."""
    return next((n for n in range(1, len(curve) + 1) if should_stop(curve[:n], **rule)), None)


DEFAULT_RULE = {k: getattr(TrainParams(), k) for k in ("patience", "min_epochs", "smoothing")}
RAW_PATIENCE_5 = {"patience": 5}  # the old rule: 5 epochs without a better raw value


def test_stopping_rule_does_not_stop_a_noisy_rise():
    """Validation NDCG@10 that rises by a quarter of its epoch-to-epoch noise per epoch (a small validation set)
    for 40 epochs: raw patience stops most such runs early, the default rule almost none."""
    rng = np.random.default_rng(0)
    curves = [0.02 + 0.0005 * np.arange(40) + rng.normal(0, 0.002, 40) for _ in range(200)]
    stopped = np.mean([stop_epoch(c, **DEFAULT_RULE) is not None for c in curves])
    stopped_raw = np.mean([stop_epoch(c, **RAW_PATIENCE_5) is not None for c in curves])
    assert stopped <= 0.05 and stopped_raw >= 0.5


def test_stopping_rule_stops_a_flat_or_falling_curve():
    rng = np.random.default_rng(1)
    for _ in range(50):
        flat = 0.04 + rng.normal(0, 0.002, 60)
        falling = 0.05 - 0.0003 * np.arange(60) + rng.normal(0, 0.002, 60)
        assert DEFAULT_RULE["min_epochs"] <= stop_epoch(flat, **DEFAULT_RULE) <= 40
        assert DEFAULT_RULE["min_epochs"] <= stop_epoch(falling, **DEFAULT_RULE) <= 25


def test_stopping_rule_smooths_with_an_exponential_average():
    assert smoothed([1.0, 0.0, 0.0], 0.5) == [1.0, 0.5, 0.25]
    assert epochs_since_best([0.1, 0.3, 0.2, 0.2], 1.0) == 2
    assert not should_stop([0.3, 0.2, 0.1], patience=2, min_epochs=4)  # too early, whatever the curve
    assert should_stop([0.3, 0.2, 0.1], patience=2)


def test_text_to_id_recovers_a_linear_map_and_weights_items_by_their_occurrences():
    """ID embeddings that are a linear function of the text are predicted exactly (tiny ridge), also when fitted
    in chunks; when the text says nothing (all items alike), the prediction is the occurrence-weighted mean ID
    embedding: a new item is placed like the items users interact with, not like the average catalog item."""
    torch.manual_seed(0)
    text, linear, offset = torch.randn(20, 8), torch.randn(8, 16), torch.randn(16)
    counts = torch.randint(1, 50, (20,))
    counts[5] = 0  # an untrained item takes no part in the fit
    ids = text @ linear + offset
    ids[5] = 100.0
    fitted = TextToId.fit(ids, text, counts, ridge=1e-9)
    new = torch.randn(3, 8)
    torch.testing.assert_close(fitted(new), new @ linear + offset, rtol=1e-4, atol=1e-4)
    alike = TextToId.fit(ids, torch.ones(20, 8), counts)(torch.ones(1, 8))
    weighted = (counts[:, None] * ids).sum(0) / counts.sum()
    torch.testing.assert_close(alike[0], weighted.float(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(alike[0], ids[counts > 0].mean(0), atol=1e-2)
    with mock.patch("m2rec.model.cold_start.CHUNK_ROWS", 7):  # a catalog fitted a few items at a time
        torch.testing.assert_close(TextToId.fit(ids, text, counts, ridge=1e-9)(new), fitted(new))


def test_training_places_items_it_never_saw_by_their_text_unless_told_not_to(tiny_synthetic, tmp_path):
    """By default an item absent from the training sequences leaves training with the ID embedding its text
    predicts from the trained items; with `impute_untrained: false` it keeps its initial draw."""
    from m2rec.data.prepared import PreparedDataset

    data = PreparedDataset.load(tiny_synthetic)
    sequences = [s[s != 1] for s in data.train_sequences()]  # item 1 never trained
    text = torch.randn(data.num_items + 1, 8)
    weights = {}
    for impute in (True, False):
        torch.manual_seed(0)
        model = build_model("sasrec_text", data.num_items, ModelParams(**FAST), text)
        initial = model.item_embedding.weight[1].detach().clone()
        train_model(model, sequences, *data.histories("valid"), TrainParams(
            epochs=1, batch_size=32, impute_untrained=impute, progress=False), tmp_path / str(impute))
        weights[impute] = model.item_embedding.weight.detach().clone()
    counts = item_counts(sequences, data.num_items)
    expected = TextToId.fit(weights[True][1:], text[1:], counts[1:])(text[1:2])[0]
    torch.testing.assert_close(weights[True][1], expected)
    assert torch.equal(weights[False][1], initial) and not torch.allclose(expected, initial)


def test_untrained_items_get_the_id_embedding_their_text_predicts():
    """Only real items without training occurrences change, to what `TextToId` predicts from their text; padding,
    trained items and models without text are left alone."""
    torch.manual_seed(0)
    text = torch.randn(31, 8)
    text[0] = 0
    model = build_model("sasrec_text", 30, ModelParams(**FAST), text)
    counts = torch.zeros(31, dtype=torch.long)
    counts[1:21] = torch.randint(1, 50, (20,))
    before = model.item_embedding.weight.detach().clone()
    expected = TextToId.fit(before[1:], text[1:], counts[1:])(text[21:])
    assert impute_untrained_embeddings(model, counts) == 10
    after = model.item_embedding.weight.detach()
    torch.testing.assert_close(after[21:], expected)
    assert torch.equal(after[:21], before[:21])
    plain = build_model("sasrec", 30, ModelParams(**FAST))
    unchanged = plain.item_embedding.weight.detach().clone()
    assert impute_untrained_embeddings(plain, counts) == 0 and torch.equal(plain.item_embedding.weight, unchanged)
