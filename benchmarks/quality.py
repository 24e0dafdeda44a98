"""Quality study: M2Rec against SASRec and the Mamba4Rec-style baseline, with ablations, on real data.

One protocol and one code path for every model (RecBole's: k-core, leave-one-out by time, full ranking over all
items, history not masked): the same data, loss, training loop (m2rec.stages.train.fit), early stopping on
validation NDCG@10, and the same tuning budget (a grid chosen on validation NDCG@10, never on test).

    python benchmarks/quality.py --dataset ../shared/datasets/ml-100k --seeds 3
    python benchmarks/quality.py --dataset ../shared/datasets/amazon-games --seeds 3
    python benchmarks/quality.py --quick          # one seed of each model on ml-100k, no grid, few epochs

Writes benchmarks/results/quality.json ({dataset: {model: {metric: {mean, std}, seeds, best_epochs,
train_seconds}}}), quality.md (tables, significance, cold start) and quality_curves.png (validation NDCG@10
per epoch per model).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from m2rec.data.prepare import PrepareParams
from m2rec.data.prepared import PreparedDataset
from m2rec.data.sources import SourceSpec
from m2rec.evaluation.metrics import per_user_metrics
from m2rec.model.config import ModelParams
from m2rec.stages.prepare import prepare
from m2rec.stages.train import evaluate_split, fit, text_matrix
from m2rec.text.embeddings import TextEncoderParams
from m2rec.training.trainer import TrainParams

log = logging.getLogger("quality")
ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache"
REPORTED = ("HR@10", "NDCG@10", "MRR@10", "HR@20", "NDCG@20")
VARIANTS = {  # name -> (model type, ModelParams overrides)
    "m2rec": ("m2rec", {}),
    "sasrec": ("sasrec", {}),
    "mamba4rec": ("mamba4rec", {}),
    "m2rec_no_fft": ("m2rec", {"use_frequency": False}),
    "m2rec_no_text": ("m2rec", {"use_text": False}),
    "m2rec_no_gate": ("m2rec", {"gate": "mean"}),
    "m2rec_single_scale": ("m2rec", {"scales": [[0.001, 0.1]]}),
}
BASELINES = ("sasrec", "mamba4rec")
MAX_LENGTH = 200  # RecBole protocol
GRID = {"learning_rate": [1e-3, 3e-3], "dropout": [0.2, 0.4], "depth": [1, 2]}  # depth = layers per stack


def detect_format(path: Path) -> str:
    """The data layer's --format for a dataset folder."""
    if (path / "u.data").exists() or (path / "ratings.dat").exists() or (path / "ratings.csv").exists():
        return "movielens"
    if (path / "sequences.txt").exists():
        return "sequences"
    if list(path.glob("*.inter")) or path.suffix == ".inter":
        return "recbole"
    raise SystemExit(f"cannot tell the format of {path}; pass --format")


def load_dataset(path: Path, fmt: str | None) -> tuple[str, PreparedDataset]:
    """Prepare (once, cached under benchmarks/.cache) and load a dataset read from where it lies."""
    name = path.name
    out = CACHE / "data" / name
    if not (out / "stats.json").exists():
        prepare(SourceSpec(fmt or detect_format(path), str(path)), out, PrepareParams())
    return name, PreparedDataset.load(out)


def configure(variant: str, point: dict, max_length: int) -> tuple[str, ModelParams, dict]:
    """Model type and params for a variant at one grid point (depth means layers per Mamba stack, or
    Transformer blocks for SASRec)."""
    model_type, overrides = VARIANTS[variant]
    params = ModelParams(max_length=max_length, dropout=point["dropout"], **overrides)
    if model_type == "sasrec":
        params.sasrec_layers = point["depth"]
    else:
        params.num_layers = point["depth"]
    return model_type, params, {"learning_rate": point["learning_rate"]}


def run_one(data: PreparedDataset, variant: str, point: dict, train: TrainParams, seed: int, text_cache: dict,
            train_sequences=None) -> dict:
    """Train one model with one seed; return validation metrics, per-user test ranks and the curve."""
    model_type, params, train_overrides = configure(variant, point, MAX_LENGTH)
    train = dataclasses.replace(train, seed=seed, **train_overrides)
    key = (model_type, params.use_text)
    if key not in text_cache:
        text_cache[key] = text_matrix(data, model_type, params, TextEncoderParams())
    with tempfile.TemporaryDirectory() as checkpoints:
        model, result = fit(data, model_type, params, train, checkpoints, text_cache[key],
                            train_sequences=train_sequences)
    valid, _ = evaluate_split(model, data, "valid")
    test, ranks = evaluate_split(model, data, "test")
    return {"valid": valid, "test": test, "ranks": ranks, "best_epoch": result.best_epoch,
            "train_seconds": result.train_seconds,
            "curve": [h["valid_NDCG@10"] for h in result.history]}


def tune(data: PreparedDataset, variant: str, grid: list[dict], train: TrainParams, text_cache: dict) -> dict:
    """The grid point with the best validation NDCG@10 (first seed only: the same budget for every model)."""
    if len(grid) == 1:
        return grid[0]
    scored = []
    for point in grid:
        outcome = run_one(data, variant, point, train, train.seed, text_cache)
        log.info("%s %s: valid NDCG@10 %.4f", variant, point, outcome["valid"]["NDCG@10"])
        scored.append((outcome["valid"]["NDCG@10"], point))
    return max(scored, key=lambda s: s[0])[1]


def paired_test(ours: np.ndarray, theirs: np.ndarray, rounds: int = 10000, seed: int = 0) -> dict:
    """Paired comparison of per-user scores: sign-flip permutation p-value (two-sided) for the mean difference
    and a bootstrap 95% interval of the relative difference mean(ours)/mean(theirs) - 1."""
    rng = np.random.default_rng(seed)
    diff = ours - theirs
    observed = diff.mean()
    signs = rng.choice([-1.0, 1.0], size=(rounds, len(diff)))
    null = (signs * diff).mean(1)
    p_value = float((np.abs(null) >= abs(observed) - 1e-12).mean())
    idx = rng.integers(0, len(diff), size=(2000, len(diff)))
    relative = ours[idx].mean(1) / np.maximum(theirs[idx].mean(1), 1e-12) - 1
    return {"relative_difference": float(ours.mean() / max(theirs.mean(), 1e-12) - 1), "p_value": p_value,
            "ci95": [float(np.percentile(relative, 2.5)), float(np.percentile(relative, 97.5))]}


def cold_start(data: PreparedDataset, point_of: dict, train: TrainParams, text_cache: dict, seed: int) -> dict:
    """Hold 10% of items out of training entirely (their text stays known); HR@10 on test targets among them."""
    rng = np.random.default_rng(seed)
    held_out = rng.choice(np.arange(1, data.num_items + 1), size=max(1, data.num_items // 10), replace=False)
    mask = np.zeros(data.num_items + 1, dtype=bool)
    mask[held_out] = True
    sequences = [s[~mask[s]] for s in data.train_sequences()]
    _, targets = data.histories("test")
    cases = mask[targets]
    out = {"held_out_items": int(len(held_out)), "test_cases": int(cases.sum())}
    for variant in ("m2rec", *BASELINES):
        outcome = run_one(data, variant, point_of[variant], train, seed, text_cache, train_sequences=sequences)
        out[variant] = {"HR@10": float((outcome["ranks"][cases] < 10).mean()) if cases.any() else None}
    out["chance_HR@10"] = 10 / data.num_items
    return out


def summarize(runs: list[dict]) -> dict:
    summary = {}
    for metric in REPORTED:
        values = [r["test"][metric] for r in runs]
        summary[metric] = {"mean": float(np.mean(values)), "std": float(np.std(values))}
    summary["valid_NDCG@10"] = {"mean": float(np.mean([r["valid"]["NDCG@10"] for r in runs])),
                                "std": float(np.std([r["valid"]["NDCG@10"] for r in runs]))}
    summary["seeds"] = [r["seed"] for r in runs]
    summary["best_epochs"] = [r["best_epoch"] for r in runs]
    summary["train_seconds"] = [round(r["train_seconds"], 1) for r in runs]
    return summary


def markdown(results: dict, command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    for dataset, block in results.items():
        lines += [f"## {dataset}", "", "| model | " + " | ".join(REPORTED) + " | best epochs | train s |",
                  "|---" * (len(REPORTED) + 3) + "|"]
        for variant in VARIANTS:
            if variant not in block["models"]:
                continue
            m = block["models"][variant]
            cells = [f"{m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in REPORTED]
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {m['best_epochs']} | "
                         f"{np.mean(m['train_seconds']):.0f} |")
        lines += ["", "| M2Rec vs | metric | relative difference | 95% interval | p-value |", "|---|---|---|---|---|"]
        for baseline, tests in block["significance"].items():
            for metric, t in tests.items():
                lines.append(f"| {baseline} | {metric} | {t['relative_difference']:+.1%} | "
                             f"[{t['ci95'][0]:+.1%}, {t['ci95'][1]:+.1%}] | {t['p_value']:.3f} |")
        cold = block.get("cold_start")
        if cold:
            lines += ["", f"Cold start: {cold['held_out_items']} items held out of training, {cold['test_cases']} "
                      f"test targets among them; chance HR@10 {cold['chance_HR@10']:.4f}.", "",
                      "| model | cold-start HR@10 |", "|---|---|"]
            lines += [f"| {v} | {cold[v]['HR@10']} |" for v in ("m2rec", *BASELINES)]
        lines += ["", f"Tuning grid: {block['grid']}; chosen: {block['chosen']}", ""]
    return "\n".join(lines)


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), squeeze=False)
    for ax, (dataset, block) in zip(axes[0], results.items()):
        for variant, curve in block["curves"].items():
            ax.plot(range(1, len(curve) + 1), curve, label=variant,
                    linestyle="--" if variant.startswith("m2rec_") else "-")  # ablations dashed
        ax.set(title=dataset, xlabel="epoch", ylabel="validation NDCG@10")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", action="append", type=Path, help="dataset folder (repeatable)")
    parser.add_argument("--format", help="data layer format, if it cannot be detected")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-grid", action="store_true", help="use Mamba4Rec's defaults, no tuning")
    parser.add_argument("--no-cold-start", action="store_true")
    parser.add_argument("--quick", action="store_true",
                        help="ml-100k, one seed, no grid, no cold start, batch 128, at most 10 epochs")
    parser.add_argument("--output", type=Path, default=RESULTS / "quality.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.quick:
        args.seeds, args.no_grid, args.no_cold_start = 1, True, True
        args.epochs, args.patience, args.batch_size = 10, 3, 128
        args.dataset = args.dataset or [ROOT.parent.parent / "shared" / "datasets" / "ml-100k"]
        args.output = args.output if args.output != RESULTS / "quality.json" else RESULTS / "quality_quick.json"
    if not args.dataset:
        parser.error("give --dataset PATH (repeatable) or --quick")
    grid = [{"learning_rate": 1e-3, "dropout": 0.2, "depth": 1}] if args.no_grid else [
        dict(zip(GRID, values)) for values in itertools.product(*GRID.values())]
    train = TrainParams(epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, progress=False)
    results = {}
    for path in args.dataset:
        name, data = load_dataset(path.resolve(), args.format)
        text_cache: dict = {}
        chosen = {v: tune(data, v, grid, train, text_cache) for v in args.models}
        runs: dict[str, list[dict]] = {v: [] for v in args.models}
        for seed, variant in itertools.product(range(args.seeds), args.models):
            outcome = run_one(data, variant, chosen[variant], train, train.seed + seed, text_cache)
            outcome["seed"] = train.seed + seed
            runs[variant].append(outcome)
            log.info("%s %s seed %d: test HR@10 %.4f NDCG@10 %.4f", name, variant, outcome["seed"],
                     outcome["test"]["HR@10"], outcome["test"]["NDCG@10"])
        block = {"models": {v: summarize(r) for v, r in runs.items()}, "grid": GRID if not args.no_grid else None,
                 "chosen": chosen, "curves": {v: r[0]["curve"] for v, r in runs.items()}, "significance": {},
                 "users": int(data.num_users)}
        if "m2rec" in runs:
            ours = {m: np.concatenate([per_user_metrics(r["ranks"], 10)[m] for r in runs["m2rec"]])
                    for m in ("HR@10", "NDCG@10")}
            for baseline in (b for b in BASELINES if b in runs):
                theirs = {m: np.concatenate([per_user_metrics(r["ranks"], 10)[m] for r in runs[baseline]])
                          for m in ("HR@10", "NDCG@10")}
                block["significance"][baseline] = {m: paired_test(ours[m], theirs[m]) for m in ours}
            if not args.no_cold_start and all(b in runs for b in BASELINES):
                block["cold_start"] = cold_start(data, chosen, train, text_cache, train.seed)
        results[name] = block
    RESULTS.mkdir(exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    flat = {name: {**block["models"], "_meta": {k: v for k, v in block.items() if k != "models"}}
            for name, block in results.items()}
    args.output.write_text(json.dumps({"command": command, **flat}, indent=2, default=float))
    report = markdown(results, command)
    args.output.with_suffix(".md").write_text(report)
    plot_curves(results, args.output.with_name(args.output.stem + "_curves.png"))
    print(report)


if __name__ == "__main__":
    main()
