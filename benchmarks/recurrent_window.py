"""What recurrent serving's long-history semantics do to quality: for test users (leave-one-out), rank the target
from the last `max_length` items re-encoded (what training and re-encoding serve) and from a recurrent state over
the whole history (what recurrent serving keeps); report HR@10 and NDCG@10 for all users and for those whose
history is longer than max_length (the only ones where the two differ). A third column measures a bounded span,
an alternative not served: a state re-anchored to the last max_length items every max_length events (amortized
O(1)), so it covers between max_length and 2 x max_length - 1 items.

    python benchmarks/recurrent_window.py --model-dir MODEL --data PREPARED_DATA

Writes benchmarks/results/recurrent_window.json and prints it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from m2rec.data.prepared import PreparedDataset
from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets, target_ranks
from m2rec.model.factory import load_model

RESULTS = Path(__file__).resolve().parent / "results" / "recurrent_window.json"


@torch.no_grad()
def whole_history_ranks(model, histories: list[np.ndarray], targets: np.ndarray) -> np.ndarray:
    """0-based target ranks from each user's state over the whole history."""
    hidden = torch.cat([model.state_from_history(torch.as_tensor(h))["hidden"] for h in histories])  # (U, H)
    scores = model.scores(hidden).float()
    scores[:, 0] = -torch.inf
    return target_ranks(scores, torch.as_tensor(targets)).numpy()


def bounded(history: np.ndarray, max_length: int) -> np.ndarray:
    """The items a state re-anchored every max_length events (from 2 x max_length on) covers."""
    n = len(history)
    span = n if n < 2 * max_length else max_length + (n - 2 * max_length) % max_length
    return history[n - span:]


def summary(ranks: np.ndarray) -> dict[str, float]:
    metrics = metrics_from_ranks(ranks, ks=(10,))
    return {name: round(metrics[name], 4) for name in ("HR@10", "NDCG@10")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", required=True, help="The prepared dataset the model was trained on.")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    model = load_model(args.model_dir)
    histories, targets = PreparedDataset.load(args.data).histories("test")
    window = rank_targets(model, histories, targets)
    whole = whole_history_ranks(model, histories, targets)
    span = whole_history_ranks(model, [bounded(h, model.max_length) for h in histories], targets)
    long = np.array([len(h) > model.max_length for h in histories])
    result = {
        "model_type": model.model_type, "max_length": model.max_length, "users": len(histories),
        "long_users": int(long.sum()),
        "all_users": {"window": summary(window), "whole_history": summary(whole), "bounded_span": summary(span)},
        "long_users_only": {"window": summary(window[long]), "whole_history": summary(whole[long]),
                            "bounded_span": summary(span[long])},
        "long_users_hits_lost_won": {name: [int(((window < 10) & ~(other < 10))[long].sum()),
                                            int((~(window < 10) & (other < 10))[long].sum())]
                                     for name, other in (("whole_history", whole), ("bounded_span", span))},
        "data": str(args.data), "model_dir": str(args.model_dir),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
