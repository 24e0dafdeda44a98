"""New items without retraining (what POST /items does), against retraining with them.

About 10% of the items are held out: a model is trained without them (never a target, never in a history, no
negative in the softmax, as in benchmarks/quality.py's cold start) and served without them, then they are added
through `Recommender.add_items`: each gets the ID embedding its text predicts (`TextToId`, fitted on the served
items weighted by their training counts) and its projected text from the same encoder. A second model is trained
with every item. Both rank the test targets that are held-out items among all items, with the same histories;
reported: HR@10, HR@100 and median rank of those targets, and HR@10 on the other test users.

    python benchmarks/new_items.py --data /work/shared/datasets/ml-100k --epochs 5

Writes benchmarks/results/new_items.json and new_items.md. A small model (width 64, length 50) keeps it to CPU
minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from m2rec.data.prepared import PreparedDataset
from m2rec.evaluation.metrics import rank_targets
from m2rec.inference import Recommender
from m2rec.model.base import SequentialRecommender
from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model, save_model
from m2rec.model.files import ITEMS_FILE
from m2rec.stages.train import fit, text_matrix
from m2rec.text.embeddings import DEFAULT_TEXT_MODEL, TextEncoderParams
from m2rec.training.trainer import TrainParams, item_counts

sys.path.insert(0, str(Path(__file__).resolve().parent))  # a script beside quality.py, not a package
from quality import load_dataset  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def served_without(model: SequentialRecommender, params: ModelParams, data: PreparedDataset, held_out: np.ndarray,
                   folder: Path) -> Path:
    """Save `model` as a served model folder whose catalog lacks the `held_out` item indices (renumbered)."""
    keep = np.setdiff1d(np.arange(1, data.num_items + 1), held_out)
    rows = torch.as_tensor(np.concatenate([[0], keep]))  # new item_idx i <- old row rows[i]
    state = {name: value[rows] if name in ("item_embedding.weight", "item_text") else value
             for name, value in model.state_dict().items()}
    smaller = build_model("m2rec", len(keep), params, state["item_text"])
    smaller.load_state_dict(state)
    save_model(folder, smaller, params, {"text_model": DEFAULT_TEXT_MODEL})
    counts = item_counts(data.train_sequences(), data.num_items).numpy()[keep]  # (I',) kept items
    items = data.items.set_index("item_idx").loc[keep].reset_index(drop=True)
    items.assign(item_idx=np.arange(1, len(keep) + 1), train_count=counts)[
        ["item_id", "item_idx", "text", "train_count"]].to_parquet(folder / ITEMS_FILE)
    return folder


def ranks_of(model: SequentialRecommender, histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return rank_targets(model, histories, targets)


def summary(ranks: np.ndarray, cold: np.ndarray) -> dict:
    return {"HR@10": float((ranks[cold] < 10).mean()), "HR@100": float((ranks[cold] < 100).mean()),
            "median_rank": float(np.median(ranks[cold])) + 1, "warm_HR@10": float((ranks[~cold] < 10).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/work/shared/datasets/ml-100k"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--share", type=float, default=0.1, help="share of items held out")
    parser.add_argument("--item-id-dropout", type=float, default=0.5, help="model.item_id_dropout of both models")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    name, data_dir = load_dataset(args.data, None)
    data = PreparedDataset.load(data_dir)
    params = ModelParams(hidden_size=64, max_length=50, item_id_dropout=args.item_id_dropout)
    train = TrainParams(epochs=args.epochs, patience=args.epochs, progress=False, seed=args.seed)
    text = text_matrix(data, "m2rec", params, TextEncoderParams())  # (I+1, T)
    rng = np.random.default_rng(args.seed)
    held_out = np.sort(rng.choice(np.arange(1, data.num_items + 1), size=max(1, int(data.num_items * args.share)),
                                  replace=False))
    is_held = np.zeros(data.num_items + 1, dtype=bool)
    is_held[held_out] = True
    histories, targets = data.histories("test")
    cold = is_held[targets]
    with tempfile.TemporaryDirectory() as work:
        retrained, _ = fit(data, "m2rec", params, train, Path(work) / "all", text)
        without, _ = fit(data, "m2rec", params, train, Path(work) / "without", text,
                         train_sequences=[s[~is_held[s]] for s in data.train_sequences()])
        recommender = Recommender(served_without(without, params, data, held_out, Path(work) / "served"))
        by_idx = data.items.set_index("item_idx")
        added = recommender.add_items(by_idx.loc[held_out, "item_id"].astype(str).tolist(),
                                      text[torch.as_tensor(held_out)].numpy(),
                                      by_idx.loc[held_out, "text"].astype(str).tolist())
        ids = np.array([""] + data.items.sort_values("item_idx")["item_id"].astype(str).tolist(), dtype=object)
        served = {i: recommender.index_of[i] for i in ids[1:]}  # original item_idx -> served item_idx, via ids
        remap = np.array([0] + [served[i] for i in ids[1:]])
        result = {
            "dataset": name, "held_out_items": int(len(held_out)), "test_cases": int(cold.sum()),
            "added_indices": [int(added[0]), int(added[-1])], "chance_HR@10": 10 / data.num_items,
            "added_via_items": summary(ranks_of(recommender.model, [remap[h] for h in histories], remap[targets]),
                                       cold),
            "retrained_with_them": summary(ranks_of(retrained, histories, targets), cold),
            "params": {"hidden_size": 64, "max_length": 50, "epochs": args.epochs,
                       "item_id_dropout": args.item_id_dropout, "seed": args.seed},
            "load_1min": os.getloadavg()[0], "command": " ".join(sys.argv),
        }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "new_items.json").write_text(json.dumps(result, indent=2))
    table = pd.DataFrame({k: result[k] for k in ("added_via_items", "retrained_with_them")}).T
    text_out = (f"Command: `{result['command']}` (load {result['load_1min']:.1f})\n\n{name}: "
                f"{result['held_out_items']} items held out, {result['test_cases']} test targets among them; chance "
                f"HR@10 {result['chance_HR@10']:.4f}.\n\n{table.to_markdown(floatfmt='.4f')}\n")
    (RESULTS / "new_items.md").write_text(text_out)
    print(text_out)


if __name__ == "__main__":
    main()
