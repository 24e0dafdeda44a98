"""The training loop: next-item cross-entropy over all items, AdamW, early stopping on validation NDCG@10,
atomic checkpoints with exact resume, bf16 autocast on CUDA and `torchrun` data parallelism."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import torch
import torch.distributed as dist
from annotated_types import Ge, Gt
from torch import nn
from tqdm.auto import tqdm

from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets
from m2rec.model.base import SequentialRecommender
from m2rec.model.files import CHECKPOINT_FILE
from m2rec.training.batching import epoch_batches, training_windows
from m2rec.utils.atomic import atomic_write_bytes

log = logging.getLogger(__name__)


@dataclass
class TrainParams:
    """Optimisation settings (section `train` of params.yaml)."""

    epochs: Annotated[int, Ge(1)] = 50
    batch_size: Annotated[int, Ge(1)] = 256
    learning_rate: Annotated[float, Gt(0.0)] = 1e-3
    weight_decay: Annotated[float, Ge(0.0)] = 0.0
    patience: Annotated[int, Ge(1)] = 5  # epochs without a better validation NDCG@10 before stopping
    seed: Annotated[int, Ge(0)] = 42
    eval_batch_size: Annotated[int, Ge(1)] = 512
    mask_history: bool = False  # RecBole's default protocol ranks history items too
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # bf16 autocast when training on CUDA
    progress: bool = True


@dataclass
class TrainResult:
    best_epoch: int
    best_valid_ndcg: float
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    train_seconds: float = 0.0


def choose_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present (the local rank's GPU under torchrun), else the CPU."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(requested)


class NextItemLoss(nn.Module):
    """Cross-entropy of every position's next item over the items of the training data (padding targets
    ignored). Items that never occur in training are no negatives either: a softmax would otherwise push their
    embeddings away from every user, so that a new catalog item could never be recommended, even by its text.
    Wrapping the model this way lets DistributedDataParallel see one forward per step."""

    def __init__(self, model: SequentialRecommender, trained_items: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.register_buffer("untrained", None if trained_items is None else ~trained_items)  # (I+1,) bool

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encode(inputs)  # (B, L, H)
        real = targets > 0  # (B, L)
        logits = self.model.scores(hidden[real]).float()  # (N, I+1): only real positions, to bound memory
        if self.untrained is not None:
            logits = logits.masked_fill(self.untrained, float("-inf"))
        return nn.functional.cross_entropy(logits, targets[real])


def trained_item_mask(train_sequences: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    """(num_items + 1,) bool: which item ids occur in the training sequences (padding id 0 never does)."""
    mask = torch.zeros(num_items + 1, dtype=torch.bool)
    if len(train_sequences):
        mask[torch.from_numpy(np.concatenate([np.asarray(s, dtype=np.int64) for s in train_sequences]))] = True
    mask[0] = False
    return mask


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_main_process() -> bool:
    """True outside data-parallel runs and on rank 0 inside them."""
    return not dist.is_initialized() or dist.get_rank() == 0


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_model(
    model: SequentialRecommender,
    train_sequences: Sequence[np.ndarray],
    valid_histories: Sequence[np.ndarray],
    valid_targets: np.ndarray,
    params: TrainParams,
    checkpoint_dir: str | Path,
    resume: bool = False,
) -> TrainResult:
    """Train `model` in place, keep the best-validation weights, checkpoint every epoch; returns the history.
    With `resume`, continue from `checkpoint_dir/checkpoint.pt` and end with the same weights as an
    uninterrupted run."""
    rank, world = _distributed()
    device = choose_device(params.device)
    model.to(device)
    loss_module = NextItemLoss(model, trained_item_mask(train_sequences, model.item_embedding.num_embeddings - 1))
    loss_module.to(device)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and params.amp
                else contextlib.nullcontext())
    windows = training_windows(train_sequences, model.max_length)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_FILE

    start_epoch, best_metric, best_epoch, bad_epochs, history = 0, -1.0, 0, 0, []
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.manual_seed(params.seed)
    if resume and checkpoint_path.exists():
        saved = torch.load(checkpoint_path, map_location=device, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state, best_metric, best_epoch = saved["best_state"], saved["best_metric"], saved["best_epoch"]
        start_epoch, bad_epochs, history = saved["epoch"], saved["bad_epochs"], saved["history"]
        torch.set_rng_state(saved["rng"].cpu())
        log.info("resuming from %s after epoch %d (best NDCG@10 %.4f at epoch %d)", checkpoint_path, start_epoch,
                 best_metric, best_epoch)
    elif resume:
        log.info("no checkpoint at %s: starting from scratch", checkpoint_path)

    started = time.perf_counter()
    for epoch in range(start_epoch, params.epochs):
        if bad_epochs >= params.patience:
            break
        epoch_start = time.perf_counter()
        loss_module.train()
        losses = []
        batches = epoch_batches(windows, params.batch_size, params.seed + epoch, rank, world)
        total = (len(windows) + params.batch_size - 1) // params.batch_size // world
        for inputs, targets in tqdm(batches, total=total, desc=f"epoch {epoch + 1}/{params.epochs}", unit="batch",
                                    disable=None if params.progress and rank == 0 else True, leave=False):
            with autocast:
                loss = loss_module(inputs.to(device), targets.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        ranks = rank_targets(model, valid_histories, valid_targets, params.eval_batch_size, params.mask_history,
                             device)
        valid = metrics_from_ranks(ranks)
        improved = valid["NDCG@10"] > best_metric
        if improved:
            best_metric, best_epoch, bad_epochs = valid["NDCG@10"], epoch + 1, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)) if losses else float("nan"),
                  "seconds": time.perf_counter() - epoch_start, **{f"valid_{k}": v for k, v in valid.items()}}
        history.append(record)
        if rank == 0:
            log.info("epoch %d/%d loss %.4f valid NDCG@10 %.4f HR@10 %.4f (best %.4f at epoch %d) %.1fs",
                     epoch + 1, params.epochs, record["loss"], valid["NDCG@10"], valid["HR@10"], best_metric,
                     best_epoch, record["seconds"])
            _save_checkpoint(checkpoint_path, {
                "epoch": epoch + 1, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "best_state": best_state, "best_metric": best_metric, "best_epoch": best_epoch,
                "bad_epochs": bad_epochs, "history": history, "rng": torch.get_rng_state(),
            })
    if bad_epochs >= params.patience and rank == 0:
        log.info("early stop: no better validation NDCG@10 for %d epochs", params.patience)
    model.load_state_dict(best_state)
    return TrainResult(best_epoch, best_metric, len(history), history, time.perf_counter() - started)
