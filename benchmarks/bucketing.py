"""Training time per epoch with plain shuffled batches against length-bucketed ones (m2rec.training.batching).

Times the first batches of an epoch (forward, backward, AdamW) for each model and extrapolates to the epoch; also
counts the padded positions of the whole epoch. Writes benchmarks/results/bucketing.json and prints a table.

    python benchmarks/bucketing.py --data benchmarks/.cache/data/amazon-games   # a prepared dataset folder
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from m2rec.data.prepared import PreparedDataset
from m2rec.model.config import ModelParams
from m2rec.model.factory import build_model
from m2rec.stages.train import text_matrix
from m2rec.text.embeddings import TextEncoderParams
from m2rec.training.batching import epoch_batches, training_windows
from m2rec.training.loss import NextItemLoss

RESULTS = Path(__file__).resolve().parent / "results"


def time_epoch(model_type: str, data: PreparedDataset, windows: list, batch_size: int, bucket: int,
               batches: int) -> dict:
    """Seconds per epoch (extrapolated from `batches` timed batches) and the share of padded positions."""
    params = ModelParams()
    model = build_model(model_type, data.num_items, params, text_matrix(data, model_type, params,
                                                                        TextEncoderParams()))
    loss_fn, optimizer = NextItemLoss(model), torch.optim.AdamW(model.parameters(), lr=1e-3)
    padded = total = 0
    for inputs, targets in epoch_batches(windows, batch_size, seed=0, bucket=bucket):
        padded, total = padded + int((targets == 0).sum()), total + targets.numel()
    started, timed = time.perf_counter(), 0
    for inputs, targets in epoch_batches(windows, batch_size, seed=0, bucket=bucket):
        loss = loss_fn(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        timed += 1
        if timed == batches:
            break
    per_batch = (time.perf_counter() - started) / timed
    return {"epoch_seconds": per_batch * -(-len(windows) // batch_size), "padded_share": padded / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a prepared dataset folder (m2rec data prepare)")
    parser.add_argument("--models", nargs="*", default=["m2rec", "sasrec", "mamba4rec"])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per case")
    args = parser.parse_args()
    data = PreparedDataset.load(args.data)
    windows = training_windows(data.train_sequences(), ModelParams().max_length)
    rows = [{"model": m, "bucket": b, **time_epoch(m, data, windows, args.batch_size, b, args.batches)}
            for m in args.models for b in (1, 50)]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "bucketing.json").write_text(json.dumps({"data": str(args.data), "batch_size": args.batch_size,
                                                        "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    print("| model | batches | padded positions | epoch (s) |\n|---|---|---|---|")
    for r in rows:
        kind = "shuffled" if r["bucket"] == 1 else "length-bucketed"
        print(f"| {r['model']} | {kind} | {r['padded_share']:.0%} | {r['epoch_seconds']:.0f} |")


if __name__ == "__main__":
    main()
