"""Where to put the ID embedding of an item the model never trained on: placement rules compared on held-out items.

The shipped default is trained without 10% of the items (their text stays known), drawn as `quality.py`'s cold
start draws them, at the grid point and with the training settings that study chose for the dataset, once per seed
(cached under benchmarks/.cache/cold_start_rules). Each rule then sets the held-out items' ID embeddings, and the
validation and test targets are ranked among all items. Reported per rule: HR@10, HR@100 and median rank of the
targets that are held-out items, and HR@10 of the other users (what the placed items cost the warm ones).
Rules are chosen on the validation targets; the test targets report.

    python benchmarks/cold_start_rules.py --dataset ../shared/datasets/ml-100k --seeds 3
    python benchmarks/cold_start_rules.py --dataset ../shared/datasets/amazon-games --sample-users 8000 --seeds 3
    python benchmarks/cold_start_rules.py --dataset ../shared/datasets/amazon-games --seeds 1 \
        --rules as_trained zero ridge_0.01 ridge_by_count_1

Writes benchmarks/results/cold_start_rules.json (one entry per dataset) and cold_start_rules.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from m2rec.data.prepared import PreparedDataset
from m2rec.model.base import SequentialRecommender
from m2rec.model.cold_start import RIDGE, TextToId
from m2rec.model.factory import load_model, save_model
from m2rec.stages.train import evaluate_split, fit, text_matrix
from m2rec.text.embeddings import TextEncoderParams
from m2rec.training.trainer import TrainParams, item_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script beside quality.py, not a package
from quality import CACHE, MAX_LENGTH, RESULTS, configure, held_out_items, item_mask, load_dataset  # noqa: E402

log = logging.getLogger("cold_start_rules")
MODEL = "m2rec_default"
Rule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (ids, text, counts) -> (U, H)


def ridge_rule(ridge: float, power: float = 0.0) -> Rule:
    """`TextToId`: ridge regression from text to ID embedding, fitted on the trained items, each weighted by its
    training occurrences to the `power` (0: equal weights; 1: as often as it is a target)."""
    def place(ids: torch.Tensor, text: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return TextToId.fit(ids, text, counts, ridge, power)(text[counts == 0])  # (U, H)
    return place


def mean_rule(power: float) -> Rule:
    """The trained items' mean ID embedding, each weighted by its training occurrences to the `power`."""
    def place(ids: torch.Tensor, text: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        weights = torch.where(counts > 0, counts ** power, 0.0)  # (I,)
        mean = (weights[:, None] * ids).sum(0, keepdim=True) / weights.sum()  # (1, H)
        return mean.expand(int((counts == 0).sum()), -1)
    return place


def knn_rule(k: int) -> Rule:
    """Mean ID embedding of the `k` trained items whose text is most similar (cosine)."""
    def place(ids: torch.Tensor, text: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        trained = counts > 0
        unit = torch.nn.functional.normalize(text, dim=1)  # (I, T)
        nearest = (unit[~trained] @ unit[trained].T).topk(k, dim=1).indices  # (U, k)
        return ids[trained][nearest].mean(1)  # (U, H)
    return place


RULES: dict[str, Rule] = {
    "as_trained": lambda ids, text, counts: ids[counts == 0],  # random initial draw, std 0.02
    "zero": lambda ids, text, counts: torch.zeros_like(ids[counts == 0]),  # POST /items until now
    "mean": mean_rule(0.0), "mean_by_sqrt_count": mean_rule(0.5), "mean_by_count": mean_rule(1.0),
    **{f"ridge_{r:g}": ridge_rule(r) for r in (0.01, 0.1, 1.0, 10.0)},
    **{f"ridge_by_sqrt_count_{r:g}": ridge_rule(r, 0.5) for r in (0.01, 0.1, 1.0, 10.0)},
    **{f"ridge_by_count_{r:g}": ridge_rule(r, 1.0) for r in (0.01, 0.1, 1.0, 10.0)},
    **{f"knn_{k}": knn_rule(k) for k in (5, 20, 100)},
}
SHIPPED = f"ridge_by_count_{RIDGE:g}"  # what training and POST /items do (TextToId's defaults)


def study_settings(name: str) -> tuple[dict, TrainParams]:
    """The grid point the quality study chose for the default on this dataset, and its training settings."""
    for results in ("quality.json", "quality_small.json"):
        meta = json.loads((RESULTS / results).read_text()).get(name, {}).get("_meta")
        if meta:
            return meta["chosen"][MODEL], TrainParams(
                epochs=meta["max_epochs"], patience=meta["patience"], min_epochs=meta["min_epochs"],
                smoothing=meta["smoothing"], window_stride=meta["window_stride"], batch_size=meta["batch_size"],
                impute_untrained=False, progress=False)
    raise SystemExit(f"{name}: no quality study in benchmarks/results; run benchmarks/quality.py on it first")


def trained_without(data: PreparedDataset, name: str, held_out: np.ndarray, seed: int) -> SequentialRecommender:
    """The default trained without `held_out` (cached by dataset and seed)."""
    folder = CACHE / "cold_start_rules" / f"{name}-seed{seed}"
    if not (folder / "config.json").exists():
        point, train = study_settings(name)
        model_type, params, overrides = configure(MODEL, point, MAX_LENGTH)
        mask = item_mask(data.num_items, held_out)
        sequences = [s[~mask[s]] for s in data.train_sequences()]
        text = text_matrix(data, model_type, params, TextEncoderParams())
        with tempfile.TemporaryDirectory() as checkpoints:
            model, _ = fit(data, model_type, params, dataclasses.replace(train, seed=seed, **overrides), checkpoints,
                           text, train_sequences=sequences)
        save_model(folder, model, params, {})
    return load_model(folder)


def measure(model: SequentialRecommender, data: PreparedDataset, held_out: np.ndarray, rule: Rule) -> dict:
    """Place the held-out items by `rule` and rank the validation and test targets."""
    held = item_mask(data.num_items, held_out)
    counts = item_counts(data.train_sequences(), data.num_items)[1:].double()  # (I,)
    counts[torch.as_tensor(held[1:])] = 0
    original = model.item_embedding.weight.detach().clone()  # (I+1, H)
    with torch.no_grad():
        ids, text = original[1:].double(), model.item_text[1:].double()  # (I, H), (I, T)
        model.item_embedding.weight[1:][counts == 0] = rule(ids, text, counts).float()
    out = {}
    for split in ("valid", "test"):
        _, targets = data.histories(split)
        _, ranks = evaluate_split(model, data, split)
        cold = held[targets]
        out[split] = {"cold_ranks": ranks[cold].tolist(), "warm_hits": int((ranks[~cold] < 10).sum()),
                      "warm_cases": int((~cold).sum())}
    with torch.no_grad():
        model.item_embedding.weight.copy_(original)
    return out


def summary(runs: list[dict]) -> dict:
    """Pooled over seeds, per split: cold HR@10, HR@100 and median rank (1-based), warm HR@10, and HR@10 of all
    users (cold and warm together: what a rule gains on new items against what it costs on the others)."""
    out = {}
    for split in ("valid", "test"):
        cold = np.concatenate([r[split]["cold_ranks"] for r in runs])
        warm_hits, warm_cases = (sum(r[split][key] for r in runs) for key in ("warm_hits", "warm_cases"))
        out[split] = {"cases": int(len(cold)), "HR@10": float((cold < 10).mean()),
                      "HR@100": float((cold < 100).mean()), "median_rank": float(np.median(cold) + 1),
                      "warm_HR@10": warm_hits / warm_cases,
                      "all_HR@10": (warm_hits + int((cold < 10).sum())) / (warm_cases + len(cold))}
    return out


def markdown(results: dict) -> str:
    lines = ["# Placing items the model never trained on", ""]
    for name, entry in results.items():
        meta = entry["_meta"]
        lines += [f"## {name}", "", f"`{meta['command']}`: seeds {meta['seeds']}, {meta['items']} items, "
                  f"{meta['held_out']} held out per seed; chance HR@10 {10 / meta['items']:.4f}.", ""]
        rows = {rule + " (shipped)" * (rule == SHIPPED): {f"{split} {key}": s[split][key] for split in ("valid", "test")
                       for key in ("HR@10", "HR@100", "median_rank", "warm_HR@10", "all_HR@10")}
                for rule, s in entry.items() if rule != "_meta"}
        lines += [pd.DataFrame(rows).T.to_markdown(floatfmt=".4f"), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--format", default=None)
    parser.add_argument("--sample-users", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES),
                        help="rules to measure (default: all; each ranks every validation and test user twice)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    name, data_dir = load_dataset(args.dataset.resolve(), args.format, args.sample_users)
    data = PreparedDataset.load(data_dir)
    runs: dict[str, list[dict]] = {rule: [] for rule in args.rules}
    seeds = [42 + i for i in range(args.seeds)]
    for seed in seeds:
        held_out = held_out_items(data, seed)
        model = trained_without(data, name, held_out, seed)
        for rule in args.rules:
            runs[rule].append(measure(model, data, held_out, RULES[rule]))
            log.info("%s seed %d %s: %s", name, seed, rule, summary(runs[rule][-1:]))
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    path = RESULTS / "cold_start_rules.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    results[name] = {**{rule: summary(r) for rule, r in runs.items()},
                     "_meta": {"command": command, "seeds": seeds, "items": int(data.num_items),
                               "held_out": int(len(held_out_items(data, seeds[0])))}}
    path.write_text(json.dumps(results, indent=2))
    (RESULTS / "cold_start_rules.md").write_text(markdown(results))
    print(markdown({name: results[name]}))


if __name__ == "__main__":
    main()
