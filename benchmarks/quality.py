"""Quality study: M2Rec against SASRec, SASRec with item text and the Mamba4Rec-style baseline, with ablations.

One protocol and one code path for every model (RecBole's: k-core, leave-one-out by time, full ranking over all
items, history not masked): the same data, loss, training loop (m2rec.stages.train.fit), early stopping on
smoothed validation NDCG@10, and the same tuning budget (a grid chosen on validation NDCG@10, never on test).

    python benchmarks/quality.py --dataset ../shared/datasets/ml-100k --seeds 3 --jobs 2
    python benchmarks/quality.py --dataset ../shared/datasets/amazon-games --seeds 3 --batch-size 512
    python benchmarks/quality.py --quick          # one seed of each model on ml-100k, no grid, 10 epochs

Every finished run is stored under benchmarks/results/quality_runs (committed: a killed or unfinished study resumes,
here or on another machine; datasets can run as separate processes). Writes benchmarks/results/quality.json ({dataset: {model: {metric: {mean, std}, seeds, best_epochs,
train_seconds, ...}, "_meta": {...}}}), quality.md (tables, significance, gate weights, cold start) and
quality_curves.png (validation NDCG@10 per epoch per model).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import fcntl
import hashlib
import io
import itertools
import json
import logging
import multiprocessing
import os
import platform
import shutil
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from m2rec.data.prepare import PrepareParams, build_tables, write_tables
from m2rec.data.prepared import PreparedDataset
from m2rec.data.schema import RawDataset
from m2rec.data.sources import SourceSpec, read_source
from m2rec.evaluation.metrics import per_user_metrics
from m2rec.model.cold_start import impute_untrained_embeddings
from m2rec.model.config import PAPER_DESIGN, ModelParams, uses_text
from m2rec.stages.prepare import prepare
from m2rec.stages.train import evaluate_split, fit, text_matrix
from m2rec.text.embeddings import TextEncoderParams, embed_texts
from m2rec.training.batching import pad_right
from m2rec.training.trainer import TrainParams, item_counts
from m2rec.utils.atomic import atomic_write_bytes

log = logging.getLogger("quality")
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
RUNS = RESULTS / "quality_runs"  # every finished run, committed: a study resumes across machines and sessions
CHECKPOINTS = CACHE / "checkpoints"  # each unfinished run's last epoch: a killed run resumes on this machine
REPORTED = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")
PAPER = PAPER_DESIGN
VARIANTS = {  # name -> (model type, ModelParams overrides); M2Rec as the paper designs it, whatever the defaults
    "m2rec": ("m2rec", PAPER),
    # the shipped default: one temporal scale, the sequence branches reading each history item's text
    "m2rec_default": ("m2rec", {}),
    "sasrec": ("sasrec", {}),
    # SASRec with M2Rec's item representation (ID + projected frozen text): what the text gives any model
    "sasrec_text": ("sasrec_text", {}),
    "mamba4rec": ("mamba4rec", {}),
    "m2rec_no_fft": ("m2rec", {**PAPER, "use_frequency": False}),
    "m2rec_no_text": ("m2rec", {**PAPER, "use_text": False}),
    "m2rec_no_gate": ("m2rec", {**PAPER, "gate": "mean"}),
    "m2rec_single_scale": ("m2rec", {**PAPER, "scales": [[0.001, 0.1]]}),
    # both simplifications the ablations point to at once: one temporal scale and no frequency branch
    "m2rec_single_scale_no_fft": ("m2rec", {**PAPER, "scales": [[0.001, 0.1]], "use_frequency": False}),
    # ablations of the shipped default: what its frequency branch and learned gate add beside the text
    "m2rec_default_no_fft": ("m2rec", {"use_frequency": False}),
    "m2rec_default_no_gate": ("m2rec", {"gate": "mean"}),
}
BASELINES = ("sasrec", "mamba4rec")  # the baselines without text
# The models compared, each tuned on the grid with the same budget; every other variant is an ablation or candidate
# and takes the point of the model it changes (`ablated`).
COMPARED = ("m2rec", "m2rec_default", "sasrec", "sasrec_text", *BASELINES)
# The study measures every model as trained (`train.impute_untrained` off). Cold start measures the shipped default
# twice, as trained and as shipped, with the ID embeddings of untrained items placed by their text after training
# (m2rec.model.cold_start.TextToId; runs before December 6 named `m2rec_default_imputed` used equal weights and
# ridge 0.01), beside the text-aware and a text-free baseline, at the default's chosen grid point.
COLD_START_VARIANTS = {"m2rec_default_placed": ("m2rec", {})}
# Variants that differ from their model in how it is trained, not in the model: TrainParams overrides.
TRAIN_OVERRIDES = {"m2rec_default_placed": {"impute_untrained": True}}  # untrained items' IDs from their text
# The placement acts after training, so a placed variant is read from its model's run when both are to be trained
# (one run, evaluated before and after placing), and trains on its own only when that run is stored already.
PLACED_FROM = {"m2rec_default_placed": "m2rec_default"}
COLD_START_MODELS = ("m2rec_default", *COLD_START_VARIANTS, "sasrec_text", "sasrec")
# The paired tests: the paper's design against every other model, and the shipped default against the baselines
# (sasrec_text: what M2Rec gives beyond the text) and against the paper's design.
SIGNIFICANCE = {"significance": ("m2rec", None), "default_significance": (
    "m2rec_default", ("m2rec", "sasrec_text", *BASELINES, "m2rec_default_no_fft", "m2rec_default_no_gate"))}
# Regularisation candidates against early overfitting on small text-rich data, each on the one-scale paper design
# (`--models`; not in the default study): item-ID dropout makes the text carry the item, weight decay shrinks the
# ID embeddings that memorise the few training targets. Neither helped (README: Quality); the text in the sequence
# branches did, and is the default (m2rec_default). The paper's two scales with the text in the sequence branches
# asks whether the default's loss on ml-100k comes from the second scale it dropped.
SINGLE_SCALE = VARIANTS["m2rec_single_scale"][1]
CANDIDATES = {"m2rec_text_in_sequence": ("m2rec", {**PAPER, "text_in_sequence": True}),
              "m2rec_single_scale_id_dropout": ("m2rec", {**SINGLE_SCALE, "item_id_dropout": 0.3}),
              "m2rec_single_scale_decay": ("m2rec", SINGLE_SCALE)}
TRAIN_OVERRIDES["m2rec_single_scale_decay"] = {"weight_decay": 0.5}
# ModelParams fields added after runs were stored: the value those runs trained with and the model types that read
# the field. At that value, or in a model that ignores it, a field is left out of a run's key, so the stored runs
# stay valid.
NEWER_FIELDS = {"text_in_sequence": (False, ("m2rec",))}
NEWER_TRAIN_FIELDS = {"batch_unit": "windows"}  # TrainParams fields added later, at what earlier runs trained with
MAX_LENGTH = 200  # RecBole protocol
TEXT_EMBEDDINGS = f"text_embeddings-{TextEncoderParams().model}.npy"  # in a prepared dataset's folder
GRID = {"learning_rate": [1e-3, 3e-3], "dropout": [0.2, 0.4], "depth": [1, 2]}  # depth = layers per stack
DEFAULT_POINT = {"learning_rate": 1e-3, "dropout": 0.2, "depth": 1}  # Mamba4Rec's published defaults


def grid_points(kind: str) -> list[dict]:
    """`full`: every combination of GRID (8 points); `half`: the 2^(3-1) half fraction, in which each level of
    each factor and each pair of levels of two factors occurs equally often (4 points); `none`: DEFAULT_POINT."""
    if kind == "none":
        return [dict(DEFAULT_POINT)]
    levels = list(itertools.product(*(range(len(v)) for v in GRID.values())))
    if kind == "half":
        levels = [lv for lv in levels if sum(lv) % 2 == 0]
    return [{name: GRID[name][i] for name, i in zip(GRID, lv)} for lv in levels]


def detect_format(path: Path) -> str:
    """The data layer's --format for a dataset folder."""
    if (path / "u.data").exists() or (path / "ratings.dat").exists() or (path / "ratings.csv").exists():
        return "movielens"
    if (path / "sequences.txt").exists():
        return "sequences"
    if list(path.glob("*.inter")) or path.suffix == ".inter":
        return "recbole"
    raise SystemExit(f"cannot tell the format of {path}; pass --format")


def load_dataset(path: Path, fmt: str | None, sample_users: int | None = None) -> tuple[str, Path]:
    """Prepare a dataset read from where it lies (once, cached under benchmarks/.cache); its name and folder. With
    `sample_users`, a seeded sample of that many users (before the k-core filter) under the name
    `<dataset>-<N>users`: a small dataset with the large one's item text, for questions of small data."""
    name = path.name if sample_users is None else f"{path.name}-{sample_users}users"
    out = CACHE / "data" / name
    if not (out / "stats.json").exists():
        source = SourceSpec(fmt or detect_format(path), str(path))
        if sample_users is None:
            prepare(source, out, PrepareParams())
        else:
            write_tables(out, *build_tables(sampled_users(read_source(source), sample_users), PrepareParams()))
    return name, out


def sampled_users(raw: RawDataset, users: int, seed: int = 0) -> RawDataset:
    """`raw` with the interactions of `users` users drawn at random (seeded); the item table is kept whole."""
    ids = raw.interactions["user_id"].unique()
    if users >= len(ids):
        raise SystemExit(f"--sample-users {users}: the dataset has only {len(ids)} users; ask for fewer")
    kept = np.random.default_rng(seed).choice(ids, size=users, replace=False)
    interactions = raw.interactions[raw.interactions["user_id"].isin(kept)].reset_index(drop=True)
    return dataclasses.replace(raw, interactions=interactions, notes=[*raw.notes, f"{users} users sampled (seed {seed})"])


def configure(variant: str, point: dict, max_length: int) -> tuple[str, ModelParams, dict]:
    """Model type, model params and TrainParams overrides for a variant at one grid point (depth means layers per
    Mamba stack, or Transformer blocks for SASRec)."""
    model_type, overrides = {**VARIANTS, **COLD_START_VARIANTS, **CANDIDATES}[variant]
    params = ModelParams(max_length=max_length, dropout=point["dropout"], **overrides)
    if model_type in ("sasrec", "sasrec_text"):
        params.sasrec_layers = point["depth"]
    else:
        params.num_layers = point["depth"]
    return model_type, params, {"learning_rate": point["learning_rate"], **TRAIN_OVERRIDES.get(variant, {})}


def mean_gates(model, data: PreparedDataset, batch_size: int = 512) -> dict[str, float]:
    """M2Rec's mean gate weight per branch at the test users' last position (what the fused output draws on)."""
    histories, _ = data.histories("test")
    device = next(model.parameters()).device
    model.eval()
    weights = []
    with torch.no_grad():
        for start in range(0, len(histories), batch_size):
            items, lengths = pad_right(histories[start : start + batch_size], model.max_length)
            gates = model.encode_with_gates(items.to(device), lengths.to(device))[1]  # (B, 1, n_branches)
            weights.append(gates.squeeze(1).float().cpu())
    return dict(zip(model.branch_names, torch.cat(weights).mean(0).tolist()))


_LOADED: dict = {}  # per process: prepared datasets and text matrices, loaded once


def _dataset(data_dir: str | Path) -> PreparedDataset:
    if str(data_dir) not in _LOADED:
        _LOADED[str(data_dir)] = PreparedDataset.load(data_dir)
    return _LOADED[str(data_dir)]


def dataset_text_embeddings(data_dir: str | Path) -> np.ndarray:
    """(num_items, T) item-text embeddings of a prepared dataset, in its items' order, kept beside it in one file
    (TEXT_EMBEDDINGS): computed once through the encoder's cache, then read by every run, also on a machine
    that has the prepared folder but neither the encoder nor its cache (a lent GPU, benchmarks/device_study.sh)."""
    file = Path(data_dir) / TEXT_EMBEDDINGS
    if not file.exists():
        vectors = embed_texts(_dataset(data_dir).items["text"].tolist(), TextEncoderParams())
        buffer = io.BytesIO()
        np.save(buffer, vectors)
        atomic_write_bytes(file, buffer.getvalue())
    return np.load(file, allow_pickle=False)


def item_mask(num_items: int, items) -> np.ndarray:
    """(num_items + 1,) bool, True at `items`."""
    mask = np.zeros(num_items + 1, dtype=bool)
    mask[np.asarray(items, dtype=np.int64)] = True
    return mask


def train_job(data_dir: str, variant: str, point: dict, seed: int, train: TrainParams, checkpoint_dir: str,
              held_out: tuple[int, ...] = (), also_placed: bool = False) -> list[dict]:
    """Train one model with one seed (without the `held_out` items, for cold start) and return its outcome:
    validation metrics, per-user test ranks, best epoch, time, validation curve and (M2Rec) mean gate weights. With
    `also_placed`, a second outcome follows: the same model after its untrained items were placed by their text
    (what `train.impute_untrained` does at the end of training), so a placed variant needs no run of its own. Runs
    in the calling process or in a worker of the pool; a run killed part-way continues from its last epoch in
    `checkpoint_dir` (the trainer's exact resume) and ends as an uninterrupted run would."""
    data = _dataset(data_dir)
    model_type, params, train_overrides = configure(variant, point, MAX_LENGTH)
    text_key = (data_dir, model_type, params.use_text)
    if text_key not in _LOADED:
        _LOADED[text_key] = text_matrix(data, model_type, params, TextEncoderParams(),
                                        dataset_text_embeddings(data_dir) if uses_text(model_type, params) else None)
    sequences = data.train_sequences()
    if held_out:
        mask = item_mask(data.num_items, held_out)
        sequences = [s[~mask[s]] for s in sequences]
    model, result = fit(data, model_type, params, dataclasses.replace(train, seed=seed, **train_overrides),
                        checkpoint_dir, _LOADED[text_key], resume=True, train_sequences=sequences)
    outcomes = [_outcome(model, data, model_type, result, seed, variant, point, held_out)]
    if also_placed:
        placed = impute_untrained_embeddings(model, item_counts(sequences, data.num_items))
        log.info("%s seed %d: %d untrained items placed by their text", variant, seed, placed)
        outcomes.append(_outcome(model, data, model_type, result, seed, f"{variant} placed", point, held_out))
    return outcomes


def _outcome(model, data: PreparedDataset, model_type: str, result, seed: int, label: str, point: dict,
             held_out: tuple[int, ...]) -> dict:
    """One trained model's evaluation: what `train_job` returns for it."""
    valid, _ = evaluate_split(model, data, "valid")
    test, ranks = evaluate_split(model, data, "test")
    log.info("%s %s seed %d%s: valid NDCG@10 %.4f, test HR@10 %.4f NDCG@10 %.4f", label, point, seed,
             " (cold start)" if held_out else "", valid["NDCG@10"], test["HR@10"], test["NDCG@10"])
    device = next(model.parameters()).device
    return {"valid": valid, "test": test, "ranks": ranks, "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds, "seed": seed,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "curve": [h["valid_NDCG@10"] for h in result.history],
            "gates": mean_gates(model, data) if model_type == "m2rec" else None}


def _store(path: Path, outcome: dict, job: tuple) -> None:
    variant, point, seed, *held_out = job
    described = {"variant": variant, "point": point, "seed": seed,
                 "held_out_items": len(held_out[0]) if held_out else 0}
    atomic_write_bytes(path, json.dumps({**outcome, "job": described, "ranks": outcome["ranks"].tolist()}).encode())


def _load(path: Path) -> dict:
    outcome = json.loads(path.read_text())
    return {**outcome, "ranks": np.asarray(outcome["ranks"], dtype=np.int64)}


def _init_worker(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(threads)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()


def _exit_with_parent(parent: int, every_s: float = 2.0) -> None:
    """End this pool worker once the study that started it is gone (killed, say): otherwise it trains its run on
    for up to an hour, reparented, writing the same checkpoint as the resumed study's run of that job."""
    while os.getppid() == parent:
        time.sleep(every_s)
    os._exit(1)


@dataclasses.dataclass
class Study:
    """One dataset's runs, each (variant, grid point, seed, held-out items) trained once: the tuning run at the
    chosen point doubles as that model's first seed, and every finished run is stored under
    `runs_dir` (benchmarks/results/quality_runs, committed), so an interrupted study resumes where it stopped.
    With a pool, independent runs train in parallel."""

    data_dir: Path
    train: TrainParams
    pool: concurrent.futures.Executor | None = None
    runs_dir: Path = RUNS
    checkpoints_dir: Path = CHECKPOINTS
    train_missing: bool = True  # False: report what is stored, train nothing (a missing run's outcome is None)

    @property
    def data(self) -> PreparedDataset:
        return _dataset(self.data_dir)

    def _stored(self, job: tuple) -> Path:
        """Where a job's outcome is kept: named by a hash of the job, the model configuration it resolves to, the
        training settings and the data (so a changed default or variant never reuses an old run)."""
        model_type, params, _ = configure(job[0], job[1], MAX_LENGTH)
        described = {k: v for k, v in dataclasses.asdict(params).items()
                     if k not in NEWER_FIELDS or (v != NEWER_FIELDS[k][0] and model_type in NEWER_FIELDS[k][1])}
        training = {k: v for k, v in dataclasses.asdict(self.train).items()
                    if k not in NEWER_TRAIN_FIELDS or v != NEWER_TRAIN_FIELDS[k]}
        key = json.dumps([job, model_type, described, training,
                          self.data.stats.get("dataset_version")], sort_keys=True, default=str)
        return self.runs_dir / self.data_dir.name / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def run_all(self, jobs: list[tuple]) -> list[dict | None]:
        """Outcomes of (variant, point, seed[, held_out]) jobs, training those not stored yet (or, without
        `train_missing`, None for them)."""
        stored = [self._stored(job) for job in jobs]
        todo = {path: job for path, job in zip(stored, jobs) if not path.exists()}
        if todo and not self.train_missing:
            log.info("%s: %d of %d runs not stored, left out: %s", self.data_dir.name, len(todo), len(jobs),
                     ", ".join(f"{job[0]} (seed {job[2]}{', cold start' if len(job) > 3 else ''})"
                               for job in todo.values()))
            return [_load(path) if path not in todo else None for path in stored]
        if todo:
            log.info("%s: %d of %d runs to train", self.data_dir.name, len(todo), len(jobs))
        riders = self._placed_riders(todo)
        calls = {path: (str(self.data_dir), *job[:3], self.train, str(self._checkpoints(path)), *job[3:])
                 for path, job in todo.items() if path not in riders.values()}
        if self.pool is None:
            for path, call in calls.items():
                self._finish(path, train_job(*call, also_placed=path in riders), todo, riders)
        else:
            futures = {self.pool.submit(train_job, *call, also_placed=path in riders): path
                       for path, call in calls.items()}
            for future in concurrent.futures.as_completed(futures):
                self._finish(futures[future], future.result(), todo, riders)
        return [_load(path) for path in stored]

    @staticmethod
    def _placed_riders(todo: dict[Path, tuple]) -> dict[Path, Path]:
        """Runs to train -> the placed variant read from each (`PLACED_FROM`), where both are to be trained."""
        riders = {}
        for path, job in todo.items():
            if job[0] in PLACED_FROM:
                base = (PLACED_FROM[job[0]], *job[1:])
                riders.update({other: path for other, queued in todo.items() if queued == base})
        return riders

    def _checkpoints(self, stored: Path) -> Path:
        """The folder of a run's epoch checkpoints until it is stored (ignored by git: local to this machine)."""
        return self.checkpoints_dir / stored.parent.name / stored.stem

    def _finish(self, stored: Path, outcomes: list[dict], todo: dict[Path, tuple], riders: dict[Path, Path]) -> None:
        """Store a finished run (and the placed variant read from it) and drop its epoch checkpoints."""
        for path, outcome in zip((stored, riders.get(stored)), outcomes):
            _store(path, outcome, todo[path])
            shutil.rmtree(self._checkpoints(path), ignore_errors=True)

    def choose(self, variants: list[str], grid: list[dict]) -> dict[str, dict]:
        """Each variant's grid point with the best validation NDCG@10 at the first seed (the same budget for
        every model); with one point, that point (its first-seed run is the study's first seed anyway)."""
        if len(grid) == 1:
            return {v: grid[0] for v in variants}
        outcomes = self.run_all([(v, point, self.train.seed) for v in variants for point in grid])
        if None in outcomes:
            raise SystemExit(f"{self.data_dir.name}: tuning runs are not stored, so no grid point can be chosen "
                             "from stored runs alone; run without --stored-only, or pass --chosen-from")
        scores = iter(o["valid"]["NDCG@10"] for o in outcomes)
        scored = {v: [(next(scores), i) for i in range(len(grid))] for v in variants}
        return {v: grid[max(pairs)[1]] for v, pairs in scored.items()}


def paired_test(ours: np.ndarray, theirs: np.ndarray, rounds: int = 10000, seed: int = 0, chunk: int = 250) -> dict:
    """Paired comparison of per-user scores: sign-flip permutation p-value (two-sided) for the mean difference
    and a bootstrap 95% interval of the relative difference mean(ours)/mean(theirs) - 1 (both drawn `chunk`
    rounds at a time, so that 100,000 users fit in memory)."""
    rng = np.random.default_rng(seed)
    diff = ours - theirs
    observed = abs(diff.mean())
    null = np.concatenate([(rng.choice([-1.0, 1.0], size=(min(chunk, rounds - start), len(diff))) * diff).mean(1)
                           for start in range(0, rounds, chunk)])
    relative = np.concatenate([ours[idx].mean(1) / np.maximum(theirs[idx].mean(1), 1e-12) - 1
                               for idx in (rng.integers(0, len(diff), size=(min(chunk, 2000 - start), len(diff)))
                                           for start in range(0, 2000, chunk))])
    return {"relative_difference": float(ours.mean() / max(theirs.mean(), 1e-12) - 1),
            "p_value": float((np.abs(null) >= observed - 1e-12).mean()), "rounds": rounds,
            "ci95": [float(np.percentile(relative, 2.5)), float(np.percentile(relative, 97.5))]}


def held_out_items(data: PreparedDataset, seed: int) -> np.ndarray:
    """10% of the items, drawn at random (seeded), to hold out of training for cold start."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(1, data.num_items + 1), size=max(1, data.num_items // 10), replace=False))


def cold_start_jobs(data: PreparedDataset, point_of: dict, seed: int) -> tuple[np.ndarray, list[tuple]]:
    """Hold 10% of items out of training entirely (their text stays known): the held-out items and the runs."""
    held_out = held_out_items(data, seed)
    point_of = {**point_of, **{v: point_of["m2rec_default"] for v in COLD_START_VARIANTS}}
    return held_out, [(v, point_of[v], seed, tuple(held_out.tolist())) for v in COLD_START_MODELS]


def cold_start_report(data: PreparedDataset, held_out: np.ndarray, outcomes: list[dict]) -> dict:
    """HR@10 on the test cases whose target is a held-out item, per model, beside chance."""
    _, targets = data.histories("test")
    cases = item_mask(data.num_items, held_out)[targets]
    out = {"held_out_items": int(len(held_out)), "test_cases": int(cases.sum()), "chance_HR@10": 10 / data.num_items}
    for variant, outcome in zip(COLD_START_MODELS, outcomes):
        cold = outcome["ranks"][cases]
        out[variant] = {"HR@10": None, "HR@100": None, "median_rank": None,
                        "warm_HR@10": float((outcome["ranks"][~cases] < 10).mean()), "device": outcome["device"]}
        if cases.any():
            out[variant].update({"HR@10": float((cold < 10).mean()), "HR@100": float((cold < 100).mean()),
                                 "median_rank": float(np.median(cold)) + 1})
    return out


def summarize(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each reported test metric, with the per-seed records."""
    summary = {}
    for metric in REPORTED:
        values = [r["test"][metric] for r in runs]
        summary[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    valid = [r["valid"]["NDCG@10"] for r in runs]
    summary["valid_NDCG@10"] = {"mean": float(np.mean(valid)), "std": float(np.std(valid))}
    summary["seeds"] = [r["seed"] for r in runs]
    summary["best_epochs"] = [r["best_epoch"] for r in runs]
    summary["epochs_run"] = [len(r["curve"]) for r in runs]
    summary["train_seconds"] = [round(r["train_seconds"], 1) for r in runs]
    summary["devices"] = sorted({r["device"] for r in runs})
    if runs[0]["gates"] is not None:
        summary["mean_gates"] = {b: float(np.mean([r["gates"][b] for r in runs])) for b in runs[0]["gates"]}
    return summary


def ablated(variant: str) -> str | None:
    """The model a variant removes a part from (the shipped default for `m2rec_default_*`, the paper's design for
    other `m2rec_*`), whose grid point it takes; None for a compared model (`COMPARED`), which is tuned itself."""
    if variant in COMPARED or not variant.startswith("m2rec_"):
        return None
    return "m2rec_default" if variant.startswith("m2rec_default_") else "m2rec"


def study_dataset(study: Study, models: list[str], grid: list[dict], seeds: int, with_cold_start: bool,
                  carried: dict[str, dict] | None = None) -> dict:
    """Tune, train every model with every seed, test M2Rec's lead for significance and measure cold start;
    returns the dataset's entry of quality.json. Ablations take the chosen grid point of the model they ablate
    (`ablated`), so each differs from it only in the part it removes. `carried`: grid points already chosen on validation by an earlier
    study of the same dataset (variant -> point); those variants are not tuned again. An ablation's carried point is
    ignored: it follows the model it ablates, also when that model is tuned again."""
    carried = {v: p for v, p in (carried or {}).items() if v in models and ablated(v) not in models}
    tuned = [v for v in models if ablated(v) not in models and v not in carried]
    chosen = {**carried, **study.choose(tuned, grid)}

    def point(variant: str) -> dict:  # an ablation's point is that of the model it ablates
        return chosen[variant] if variant in chosen else point(ablated(variant))

    chosen.update({v: point(v) for v in models if v not in chosen})
    seed_list = [study.train.seed + i for i in range(seeds)]
    jobs = [(v, chosen[v], s) for s in seed_list for v in models]
    with_cold_start = with_cold_start and all(v in models for v in COLD_START_MODELS if v not in COLD_START_VARIANTS)
    if with_cold_start:
        held_out, cold_jobs = cold_start_jobs(study.data, chosen, study.train.seed)
        jobs += cold_jobs
    outcomes = study.run_all(jobs)
    runs = {v: [o for job, o in zip(jobs, outcomes) if job[0] == v and len(job) == 3 and o is not None]
            for v in models}
    runs = {v: r for v, r in runs.items() if r}  # (stored only) a model with no stored run is left out
    if with_cold_start and None in outcomes[-len(cold_jobs):]:
        log.info("cold start left out: not every cold-start run is stored")
        with_cold_start = False
    meta = {"grid": grid, "chosen": {v: chosen[v] for v in runs}, "carried_over": sorted(carried),
            "curves": {v: r[0]["curve"] for v, r in runs.items()},
            "users": int(study.data.num_users), "items": int(study.data.num_items),
            "batch_size": study.train.batch_size, "max_epochs": study.train.epochs, "patience": study.train.patience,
            "min_epochs": study.train.min_epochs, "smoothing": study.train.smoothing,
            "window_stride": study.train.window_stride}
    if with_cold_start:
        meta["cold_start"] = cold_start_report(study.data, held_out, outcomes[-len(cold_jobs):])
    for key, (ours, others) in SIGNIFICANCE.items():
        if ours in runs:
            meta[key] = paired_tests(runs, ours, [v for v in (others or runs) if v in runs and v != ours])
    return {**{v: summarize(r) for v, r in runs.items()}, "_meta": meta}


def paired_tests(runs: dict[str, list[dict]], ours: str, others: list[str]) -> dict:
    """`ours` against each of `others` on HR@10 and NDCG@10, paired per test user. The user is the unit: each
    user's score is the mean over seeds, since one user's runs share a target and are not independent draws (treating
    each (user, seed) as one would overstate significance by up to the square root of the number of seeds)."""
    def per_user(variant: str) -> dict[str, np.ndarray]:  # (users,) scores, mean over seeds
        return {m: np.mean([per_user_metrics(r["ranks"], 10)[m] for r in runs[variant]], axis=0)
                for m in ("HR@10", "NDCG@10")}

    mine = per_user(ours)
    return {other: {m: paired_test(mine[m], theirs) for m, theirs in per_user(other).items()} for other in others}


def p_value(test: dict) -> str:
    """A permutation p-value as text; 0 permutations as extreme as observed reads as below the test's resolution."""
    return f"{test['p_value']:.4f}" if test["p_value"] > 0 else f"< {1 / test['rounds']:g}"


def stopping_rule(meta: dict) -> str:
    """The early-stopping rule of a study, in words (studies stored before the smoothed rule used raw patience)."""
    if meta.get("smoothing", 1.0) == 1.0 and not meta.get("min_epochs"):
        return f"early stop after {meta['patience']} epochs without a better validation NDCG@10"
    return (f"early stop after {meta['patience']} epochs without a new best of validation NDCG@10 smoothed by an "
            f"EMA of weight {meta['smoothing']}, not before epoch {meta['min_epochs']}")


def epochs_cell(model: dict) -> str:
    """Best epoch / epochs run per seed, e.g. `20/29, 18/30` (studies stored before epochs_run: best epochs)."""
    if "epochs_run" not in model:
        return str(model["best_epochs"])
    return ", ".join(f"{b}/{r}" for b, r in zip(model["best_epochs"], model["epochs_run"]))


def seeds_note(models: dict) -> str:
    """Which seeds the means are over: one list for all, or each model's where they differ (a study reported from
    stored runs before every model has all its seeds)."""
    seeds = {v: m["seeds"] for v, m in models.items()}
    if len({tuple(s) for s in seeds.values()}) == 1:
        return f"Mean ± std over seeds {next(iter(seeds.values()))}."
    return ("Mean ± std over each model's stored seeds (one seed: ± 0): " +
            "; ".join(f"{v} {s}" for v, s in seeds.items()) + ".")


def stop_check(models: dict, max_epochs: int) -> str:
    """Which runs ended at the epoch cap (the stopping rule had not fired: stopped before their plateau) and which
    had their best epoch in the first quarter of the run."""
    if not all("epochs_run" in m for m in models.values()):
        return "This study did not record the epochs each run trained."
    capped, early = [], []
    for variant, m in models.items():
        for seed, best, run in zip(m["seeds"], m["best_epochs"], m["epochs_run"]):
            capped += [f"{variant} (seed {seed})"] if run >= max_epochs else []
            early += [f"{variant} (seed {seed}: {best}/{run})"] if best <= run / 4 else []
    return (f"Runs that reached the {max_epochs}-epoch cap before the stopping rule fired: "
            f"{', '.join(capped) or 'none'}. Runs whose best epoch is in the first quarter of the run: "
            f"{', '.join(early) or 'none'}.")


def models_of(entry: dict) -> dict:
    return {k: v for k, v in entry.items() if k != "_meta"}


def significance_table(ours: str, tests: dict) -> list[str]:
    """Markdown lines for `ours`'s paired tests against other models (none: no lines)."""
    if not tests:
        return []
    lines = ["", "Paired over test users (each user's score the mean over seeds): relative difference of "
             f"{ours}'s mean to the other model's, bootstrap 95% interval, two-sided sign-flip permutation p-value.",
             "",
             f"| {ours} vs | metric | relative difference | 95% interval | p-value |", "|---|---|---|---|---|"]
    for other, by_metric in tests.items():
        lines += [f"| {other} | {metric} | {t['relative_difference']:+.1%} | [{t['ci95'][0]:+.1%}, "
                  f"{t['ci95'][1]:+.1%}] | {p_value(t)} |" for metric, t in by_metric.items()]
    return lines


def markdown(results: dict) -> str:
    """quality.md: per dataset, the metric table, M2Rec's paired tests, gate weights, cold start and tuning."""
    lines = []
    for dataset, entry in results.items():
        meta, models = entry["_meta"], models_of(entry)
        lines += [f"## {dataset}", "", f"Command: `{meta['command']}`", "",
                  f"{meta['users']} test users, {meta['items']} items; batch {meta['batch_size']}, at most "
                  f"{meta['max_epochs']} epochs, {stopping_rule(meta)}. {seeds_note(models)} "
                  "Trained on: "
                  f"{', '.join(sorted({d for m in models.values() for d in m['devices']}))}.", "",
                  "| model | " + " | ".join(REPORTED) + " | valid NDCG@10 | best epoch / epochs run | train s |",
                  "|---" * (len(REPORTED) + 4) + "|"]
        for variant, m in models.items():  # valid NDCG@10: what the grid and the stopping rule read (older: none)
            cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" if k in m else "-" for k in (*REPORTED, "valid_NDCG@10")]
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {epochs_cell(m)} | "
                         f"{np.mean(m['train_seconds']):.0f} |")
        lines += ["", stop_check(models, meta["max_epochs"])]
        for key, (ours, _) in SIGNIFICANCE.items():
            lines += significance_table(ours, meta.get(key, {}))
        gated = {v: m["mean_gates"] for v, m in models.items() if "mean_gates" in m}
        if gated:
            lines += ["", "Mean gate weight per branch at the test users' last position:", "",
                      "| model | temporal | frequency | semantic |", "|---|---|---|---|"]
            lines += [f"| {v} | " + " | ".join(f"{g[b]:.3f}" if b in g else "-" for b in
                                               ("temporal", "frequency", "semantic")) + " |" for v, g in gated.items()]
        cold = meta.get("cold_start")
        if cold:
            lines += ["", f"Cold start: {cold['held_out_items']} items held out of training, {cold['test_cases']} "
                      f"test targets among them; chance HR@10 {cold['chance_HR@10']:.4f}."]
        if cold and cold["test_cases"]:  # without test targets among the held-out items there is nothing to rank
            lines += ["", "| model | cold HR@10 | cold HR@100 | cold median rank | HR@10, other test users | "
                      "trained on |", "|---|---|---|---|---|---|"]
            lines += [f"| {v} | {cold[v]['HR@10']:.4f} | {cold[v]['HR@100']:.4f} | {cold[v]['median_rank']:.0f} | "
                      f"{cold[v]['warm_HR@10']:.4f} | {cold[v]['device']} |" for v in cold if isinstance(cold[v], dict)]
        lines += ["", f"Grid ({len(meta['grid'])} point{'s' * (len(meta['grid']) > 1)}, chosen on validation NDCG@10 at the first seed): "
                  f"{meta['grid']}", "", f"Chosen: {meta['chosen']}", ""]
        if meta.get("carried_over"):
            lines += [f"Points carried over from an earlier study's validation choice (not tuned again): "
                      f"{', '.join(meta['carried_over'])}.", ""]
    return "\n".join(lines)


def _pyplot():
    """matplotlib.pyplot drawing to files only (no display on servers and in CI)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(results: dict, path: Path) -> None:
    """Validation NDCG@10 per epoch per model (first seed), one panel per dataset."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (dataset, entry) in zip(axes[0], results.items()):
        for variant, curve in entry["_meta"]["curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=variant,
                    linestyle="--" if variant.startswith("m2rec_") else "-")  # ablations dashed
        ax.set(title=dataset, xlabel="epoch", ylabel="validation NDCG@10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_effects(results: dict, path: Path) -> None:
    """The paired tests as a forest plot: per dataset (rows) and compared model (columns: M2Rec, the shipped
    default), the relative difference of HR@10 and NDCG@10 to each other model with its bootstrap 95% interval."""
    plt = _pyplot()
    keys = [k for k in SIGNIFICANCE if any(e["_meta"].get(k) for e in results.values())]
    if not keys:  # a study of baselines only (a tuning grid, say) has no paired tests to draw
        return
    rows = max(len(e["_meta"].get(k, {})) for e in results.values() for k in keys)  # most models in one panel
    fig, axes = plt.subplots(len(results), len(keys), squeeze=False,
                             figsize=(6 * len(keys), (0.45 * rows + 1) * len(results)))
    for row, (dataset, entry) in zip(axes, results.items()):
        for ax, key in zip(row, keys):
            tests = entry["_meta"].get(key, {})
            ax.set_title(f"{dataset}: {SIGNIFICANCE[key][0]} vs" + ("" if tests else " (not in this study)"))
            if not tests:
                ax.set_axis_off()
                continue
            others = list(tests)[::-1]  # (others,) top to bottom in the order of the tables
            for offset, metric, color in ((0.15, "HR@10", "tab:blue"), (-0.15, "NDCG@10", "tab:orange")):
                diffs = np.array([tests[o][metric]["relative_difference"] for o in others]) * 100
                ci = np.array([tests[o][metric]["ci95"] for o in others]) * 100  # (others, 2)
                ax.errorbar(diffs, np.arange(len(others)) + offset, xerr=[diffs - ci[:, 0], ci[:, 1] - diffs],
                            fmt="o", color=color, capsize=3, label=metric)
            ax.axvline(0, color="grey", linewidth=0.8)
            ax.set_yticks(range(len(others)), others, fontsize=8)
            ax.set(ylim=(-0.5, len(others) - 0.5), xlabel="relative difference, % (95% interval)")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save(output: Path, dataset: str, entry: dict) -> dict:
    """Put one dataset's entry into `output` (other datasets' entries are kept, so datasets can run as
    separate processes) and rewrite the .md table, the curves and the effects plots from the whole file."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        stored = json.loads(output.read_text()) if output.exists() else {}
        results = {name: e for name, e in stored.items() if isinstance(e, dict) and "_meta" in e}  # this layout only
        results[dataset] = entry
        atomic_write_bytes(output, json.dumps(results, indent=2, default=float).encode())
        output.with_suffix(".md").write_text(markdown(results))
        plot_curves(results, output.with_name(output.stem + "_curves.png"))
        plot_effects(results, output.with_name(output.stem + "_effects.png"))
    return results


def stored_runs_table(runs_dir: Path) -> str:
    """Markdown table of the runs stored under `runs_dir` (one folder per dataset): what an unfinished study has."""
    lines = ["| dataset | variant | point | seed | cold start | valid NDCG@10 | test HR@10 | test NDCG@10 | best epoch "
             "| epochs run | device |", "|---" * 11 + "|"]
    for path in sorted(runs_dir.glob("*/*.json")):
        run = json.loads(path.read_text())
        job = run["job"]
        lines.append(f"| {path.parent.name} | {job['variant']} | {job['point']} | {job['seed']} | "
                     f"{job['held_out_items'] or '-'} | {run['valid']['NDCG@10']:.4f} | {run['test']['HR@10']:.4f} | "
                     f"{run['test']['NDCG@10']:.4f} | {run['best_epoch']} | {len(run['curve'])} | {run['device']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", type=Path, help="dataset folder (repeatable)")
    parser.add_argument("--format", help="data layer format, if it cannot be detected")
    parser.add_argument("--sample-users", type=int,
                        help="study a seeded sample of this many users of each dataset (named <dataset>-<N>users)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(VARIANTS), choices=[*VARIANTS, *CANDIDATES])
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=TrainParams.patience)
    parser.add_argument("--min-epochs", type=int, default=TrainParams.min_epochs)
    parser.add_argument("--smoothing", type=float, default=TrainParams.smoothing,
                        help="EMA weight of the newest epoch in the stopping rule (1: raw validation NDCG@10)")
    parser.add_argument("--window-stride", type=int, default=TrainParams.window_stride,
                        help="training windows end every N items (default: max length, no overlap)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--grid", choices=("half", "full", "none"), default="half",
                        help="tuning grid over learning rate x dropout x depth (see grid_points)")
    parser.add_argument("--chosen-from", type=Path,
                        help="an earlier quality.json: take its validation-chosen grid points per model instead of "
                             "tuning those models again (models it lacks are tuned)")
    parser.add_argument("--retune", nargs="*", default=[], choices=COMPARED,
                        help="models to tune again on the grid though --chosen-from has a point for them")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--jobs", type=int, default=1, help="runs trained in parallel (worker processes)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: the cores divided among the jobs)")
    parser.add_argument("--quick", action="store_true",
                        help="ml-100k, one seed, no grid, no cold start, batch 128, 10 epochs (no early stop)")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality.json")
    parser.add_argument("--status", action="store_true", help="list the stored runs (of unfinished studies too)")
    parser.add_argument("--stored-only", action="store_true",
                        help="train nothing: report the stored runs, each model with the seeds it has (a model "
                             "without any is left out, and so is cold start unless all its runs are stored)")
    parser.add_argument("--prepare-only", action="store_true",
                        help="prepare each dataset and its item-text embeddings under benchmarks/.cache/data and stop "
                             "(what benchmarks/device_study.sh carries to a lent GPU)")
    args = parser.parse_args()
    if args.status:
        print(stored_runs_table(RUNS))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.jobs)
    torch.set_num_threads(threads)
    if args.quick:
        args.seeds, args.grid, args.no_cold_start = 1, "none", True
        args.epochs, args.patience, args.batch_size = 10, 10, 128  # no early stop: early plateaus are common
        args.dataset = args.dataset or [ROOT.parent.parent / "shared" / "datasets" / "ml-100k"]
        args.output = args.output if args.output != RESULTS / "quality.json" else RESULTS / "quality_quick.json"
    if not args.dataset:
        parser.error("give --dataset PATH (repeatable) or --quick")
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    train = TrainParams(epochs=args.epochs, patience=args.patience, min_epochs=args.min_epochs,
                        smoothing=args.smoothing, window_stride=args.window_stride, batch_size=args.batch_size,
                        impute_untrained=False, progress=False)
    pool = None if args.jobs == 1 else concurrent.futures.ProcessPoolExecutor(
        args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(threads,))
    for path in args.dataset:
        name, data_dir = load_dataset(path.resolve(), args.format, args.sample_users)
        if args.prepare_only:
            log.info("%s: prepared in %s, text embeddings %s", name, data_dir, dataset_text_embeddings(data_dir).shape)
            continue
        carried = json.loads(args.chosen_from.read_text()).get(name, {}).get("_meta", {}).get("chosen", {}) \
            if args.chosen_from else {}
        carried = {v: p for v, p in carried.items() if v not in args.retune}
        entry = study_dataset(Study(data_dir, train, pool, train_missing=not args.stored_only), args.models, grid_points(args.grid), args.seeds,
                              not args.no_cold_start, carried)
        entry["_meta"]["command"] = command
        results = save(args.output, name, entry)
    if pool is not None:
        pool.shutdown()
    if not args.prepare_only:
        print(markdown(results))


if __name__ == "__main__":
    main()
