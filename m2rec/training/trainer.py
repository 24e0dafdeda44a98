"""The training loop: next-item cross-entropy (over all items or sampled), AdamW, early stopping on smoothed validation NDCG@10,
atomic checkpoints with exact resume, bf16 autocast on CUDA and `torchrun` data parallelism."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Sequence

import numpy as np
import torch
import torch.distributed as dist
from annotated_types import Ge, Gt, Interval
from torch import nn
from tqdm.auto import tqdm

from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets
from m2rec.model.base import SequentialRecommender
from m2rec.model.cold_start import impute_untrained_embeddings
from m2rec.model.files import CHECKPOINT_FILE
from m2rec.training.batching import BatchUnit, Window, epoch_batches, training_windows
from m2rec.training.loss import LossKind, NextItemLoss
from m2rec.training.stopping import should_stop
from m2rec.utils.atomic import atomic_write_bytes
from m2rec.utils.memory import return_freed_memory

log = logging.getLogger(__name__)


@dataclass
class TrainParams:
    """Optimisation settings (section `train` of params.yaml)."""

    epochs: Annotated[int, Ge(1)] = 50
    batch_size: Annotated[int, Ge(1)] = 256
    # What batch_size counts: training windows, or the targets (next items) they train, as RecBole counts its
    # (prefix, next item) pairs; a window of a long sequence trains up to max_length targets.
    batch_unit: BatchUnit = "windows"
    learning_rate: Annotated[float, Gt(0.0)] = 1e-3
    weight_decay: Annotated[float, Ge(0.0)] = 0.0
    # Early stopping (m2rec.training.stopping): stop once an exponential moving average of validation NDCG@10
    # (weight `smoothing` on the newest epoch) has not reached a new best for `patience` epochs, never before
    # `min_epochs`. smoothing 1 and min_epochs 0 give plain patience on the raw metric, which stops on noise.
    patience: Annotated[int, Ge(1)] = 8
    min_epochs: Annotated[int, Ge(0)] = 10
    smoothing: Annotated[float, Interval(gt=0.0, le=1.0)] = 0.3
    # Training windows end every `window_stride` items and train their last `window_stride` targets, each with up
    # to max_length items of history (m2rec.training.batching.training_windows); null: max_length, windows that
    # do not overlap.
    window_stride: Annotated[int, Ge(1)] | None = None
    # After training, give items absent from the training data the ID embedding their text predicts (occurrence-
    # weighted ridge fit on the trained items, m2rec.model.cold_start), as POST /items does for an item added while
    # serving, so a new catalog item competes with trained ones; false: they keep their random initial embedding.
    impute_untrained: bool = True
    # full: exact cross-entropy over every trained item (memory bounded by computing it in chunks); sampled:
    # against `negatives` items drawn uniformly per step, constant work per position for catalogs of 100k+ items
    # (m2rec.training.loss).
    loss: LossKind = "full"
    negatives: Annotated[int, Ge(1)] = 1024
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


def item_counts(train_sequences: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    """(num_items + 1,) int64: how often each item id occurs in the training sequences (padding id 0: never)."""
    ids = np.concatenate([np.asarray(s, dtype=np.int64) for s in train_sequences]) if len(train_sequences) else \
        np.zeros(0, dtype=np.int64)
    counts = torch.from_numpy(np.bincount(ids, minlength=num_items + 1))
    counts[0] = 0
    return counts


def _distributed() -> tuple[int, int]:
    """(rank, world size); initialises the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def is_main_process() -> bool:
    """True outside data-parallel runs and on rank 0 inside them."""
    return not dist.is_initialized() or dist.get_rank() == 0


@dataclass
class TrainingRun:
    """What stays fixed during a run: where it runs, what it trains on and how a step is computed."""

    device: torch.device
    rank: int
    world: int
    loss_module: nn.Module  # NextItemLoss, wrapped in DistributedDataParallel when world > 1
    autocast: contextlib.AbstractContextManager
    windows: list[Window]
    checkpoint_path: Path


@dataclass
class TrainingState:
    """What each epoch changes; with the random number generators' states it is the checkpoint."""

    model: SequentialRecommender
    optimizer: torch.optim.Optimizer
    epoch: int = 0  # epochs completed
    best_metric: float = -1.0  # best validation NDCG@10 so far
    best_epoch: int = 0
    best_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)  # one record per epoch; the stopping rule reads it

    def checkpoint(self) -> dict:
        return {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "best_state": self.best_weights, "best_metric": self.best_metric, "best_epoch": self.best_epoch,
                "history": self.history, "rng": rng_states()}

    def restore(self, saved: dict) -> None:
        self.model.load_state_dict(saved["model"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.best_weights, self.best_metric, self.best_epoch = saved["best_state"], saved["best_metric"], \
            saved["best_epoch"]
        self.epoch, self.history = saved["epoch"], saved["history"]
        restore_rng_states(saved["rng"])


def seed_everything(seed: int) -> None:
    """Seed every generator a run draws from: Python's, numpy's global one and torch's (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_states() -> dict:
    """The states of every generator a run draws from, as tensors and plain values (loadable with
    weights_only=True): torch CPU, CUDA (each device, when present), numpy's global MT19937, Python's."""
    _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    states = {"torch": torch.get_rng_state(),
              "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                        "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
              "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict | torch.Tensor) -> None:
    """Put back what `rng_states` saved (a bare tensor: a checkpoint from before numpy and Python were kept)."""
    if isinstance(states, torch.Tensor):
        torch.set_rng_state(states.cpu())
        return
    torch.set_rng_state(states["torch"].cpu())
    numpy_state = states["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].cpu().numpy().astype(np.uint32), numpy_state["position"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = states["python"]
    random.setstate((python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([state.cpu() for state in states["cuda"]])


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def _set_up(model: SequentialRecommender, train_sequences: Sequence[np.ndarray], params: TrainParams,
            checkpoint_dir: str | Path) -> tuple[TrainingRun, TrainingState]:
    """Place the model (and its data-parallel wrapper) on the device; a fresh state with its optimizer."""
    rank, world = _distributed()
    device = choose_device(params.device)
    model.to(device)
    loss_module = NextItemLoss(model, item_counts(train_sequences, model.num_items) > 0, params.loss,
                               params.negatives)
    loss_module.to(device)
    if world > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            loss_module, device_ids=[device.index] if device.type == "cuda" else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and params.amp
                else contextlib.nullcontext())
    windows = training_windows(train_sequences, model.max_length, params.window_stride)
    run = TrainingRun(device, rank, world, loss_module, autocast, windows, Path(checkpoint_dir) / CHECKPOINT_FILE)
    state = TrainingState(model, optimizer, best_weights=_copy_weights(model))
    return run, state


def _copy_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _start(run: TrainingRun, state: TrainingState, params: TrainParams, resume: bool) -> None:
    """Seed the generators, or with `resume` and a checkpoint, continue from it (generators included)."""
    seed_everything(params.seed)
    if resume and run.checkpoint_path.exists():
        state.restore(torch.load(run.checkpoint_path, map_location=run.device, weights_only=True))
        log.info("resuming from %s after epoch %d (best NDCG@10 %.4f at epoch %d)", run.checkpoint_path,
                 state.epoch, state.best_metric, state.best_epoch)
    elif resume:
        log.info("no checkpoint at %s: starting from scratch", run.checkpoint_path)


def _train_epoch(run: TrainingRun, state: TrainingState, params: TrainParams) -> float:
    """One pass over the training windows in a new random order; returns the mean loss."""
    run.loss_module.train()
    losses = []
    shuffle_seed = int(np.random.randint(0, 2**31 - 1))  # from the seeded (and checkpointed) numpy generator
    batches = epoch_batches(run.windows, params.batch_size, shuffle_seed, run.rank, run.world, unit=params.batch_unit)
    units = sum(w.targets for w in run.windows) if params.batch_unit == "targets" else len(run.windows)
    total = (units + params.batch_size - 1) // params.batch_size // run.world  # at most; for the progress bar
    for inputs, targets in tqdm(batches, total=total, desc=f"epoch {state.epoch + 1}/{params.epochs}", unit="batch",
                                disable=None if params.progress and run.rank == 0 else True, leave=False):
        with run.autocast:
            loss = run.loss_module(inputs.to(run.device), targets.to(run.device))
        state.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        state.optimizer.step()
        losses.append(loss.item())
    return float(np.mean(losses)) if losses else float("nan")


def _end_epoch(state: TrainingState, valid: dict[str, float], loss: float, seconds: float) -> None:
    """Count the epoch, keep the weights if validation NDCG@10 improved, and record it in the history."""
    state.epoch += 1
    if valid["NDCG@10"] > state.best_metric:
        state.best_metric, state.best_epoch = valid["NDCG@10"], state.epoch
        state.best_weights = _copy_weights(state.model)
    state.history.append({"epoch": state.epoch, "loss": loss, "seconds": seconds,
                          **{f"valid_{k}": v for k, v in valid.items()}})


def _validation_curve(state: TrainingState) -> list[float]:
    return [h["valid_NDCG@10"] for h in state.history]


def _stops(state: TrainingState, params: TrainParams) -> bool:
    return should_stop(_validation_curve(state), params.patience, params.min_epochs, params.smoothing)


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
    return_freed_memory()  # steps of varying shapes would otherwise fragment the heap and grow the process
    run, state = _set_up(model, train_sequences, params, checkpoint_dir)
    _start(run, state, params, resume)
    started = time.perf_counter()
    while state.epoch < params.epochs and not _stops(state, params):
        epoch_start = time.perf_counter()
        loss = _train_epoch(run, state, params)
        valid = metrics_from_ranks(rank_targets(model, valid_histories, valid_targets, params.eval_batch_size,
                                                params.mask_history, run.device))
        _end_epoch(state, valid, loss, time.perf_counter() - epoch_start)
        if run.rank == 0:
            log.info("epoch %d/%d loss %.4f valid NDCG@10 %.4f HR@10 %.4f (best %.4f at epoch %d) %.1fs",
                     state.epoch, params.epochs, loss, valid["NDCG@10"], valid["HR@10"], state.best_metric,
                     state.best_epoch, state.history[-1]["seconds"])
            _save_checkpoint(run.checkpoint_path, state.checkpoint())
    if _stops(state, params) and run.rank == 0:
        log.info("early stop: no better smoothed validation NDCG@10 for %d epochs", params.patience)
    model.load_state_dict(state.best_weights)
    if params.impute_untrained:
        impute_untrained_embeddings(model, item_counts(train_sequences, model.num_items))
    return TrainResult(state.best_epoch, state.best_metric, len(state.history), state.history,
                       time.perf_counter() - started)
