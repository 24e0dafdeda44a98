"""Turn variable-length item sequences into right-padded tensors."""

from __future__ import annotations

from typing import Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch


def pad_right(sequences: Sequence[np.ndarray], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each sequence's last `max_length` items, right-pad with 0 -> items (B, L), lengths (B,)."""
    clipped = [np.asarray(s[-max_length:], dtype=np.int64) for s in sequences]
    lengths = np.array([len(s) for s in clipped], dtype=np.int64)
    items = np.zeros((len(clipped), max(1, int(lengths.max(initial=1)))), dtype=np.int64)
    for row, seq in enumerate(clipped):
        items[row, : len(seq)] = seq
    return torch.from_numpy(items), torch.from_numpy(lengths)


class Window(NamedTuple):
    """A stretch of one training sequence; only its last `targets` next items are trained (the earlier ones are
    history, trained in another window)."""

    items: np.ndarray  # (n,) item ids
    targets: int  # 1 <= targets <= n - 1


def training_windows(sequences: Sequence[np.ndarray], max_length: int, stride: int | None = None) -> list[Window]:
    """Windows of at most max_length + 1 items ending every `stride` items, from the most recent back, each
    training its last `stride` next items, so every (prefix -> next item) pair is trained once. With stride
    max_length (the default) the windows do not overlap and the first targets of each see little history; a
    smaller stride gives each target up to max_length items of history (stride 1: every prefix, as RecBole), at
    about max_length / stride times the work. Sequences shorter than 2 give nothing."""
    stride = min(stride or max_length, max_length)
    windows = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            start = max(0, end - max_length - 1)
            windows.append(Window(np.asarray(seq[start:end]), min(stride, end - start - 1)))
            end -= stride
    return windows


BatchUnit = Literal["windows", "targets"]


def epoch_batches(windows: list[Window], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                  bucket: int = 50, unit: BatchUnit = "windows") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (inputs (B, L), targets (B, L)) batches of windows of similar length; each rank of a
    data-parallel run gets its share of an equal number of batches. Target 0 marks padding and the history
    positions of a window that are not its targets.

    `batch_size` counts windows, or with unit `targets` the trained targets (next items) a batch holds, about:
    RecBole's batch of 512 (prefix, next item) pairs is 512 targets: on ml-100k about 5 windows, where 512
    windows hold about 50,000 targets and an epoch is 3 steps.

    Windows are shuffled, cut into chunks of `bucket` batches, sorted by length inside each chunk and batched,
    and the batch order is shuffled: each batch pads to little more than its own length (on short-sequence
    data such as Amazon reviews this removes most of the padded work) while every epoch still sees a new
    random grouping. `bucket=1` gives plain shuffled batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=generator).numpy()
    lengths = np.array([len(w.items) for w in windows])
    units = np.array([w.targets for w in windows]) if unit == "targets" else np.ones(len(windows), dtype=np.int64)
    per_batch = batch_size / units.mean() if len(units) else batch_size  # windows a batch holds, about
    chunk = max(1, round(per_batch)) * bucket
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        order[start : start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batch_of = (np.cumsum(units[order]) - 1) // batch_size  # (W,) a window joins the batch its units end in
    batches = np.split(order, np.flatnonzero(np.diff(batch_of)) + 1) if len(order) else []
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    batches = batches[: len(batches) - len(batches) % world_size] if world_size > 1 else batches
    for indices in batches[rank::world_size]:
        chosen = [windows[i] for i in indices]
        padded, sizes = pad_right([w.items for w in chosen], int(lengths[indices].max()))
        targets = padded[:, 1:].clone()  # (B, L-1)
        first_target = sizes - 1 - torch.tensor([w.targets for w in chosen])  # (B,) positions before are history
        targets[torch.arange(targets.shape[1]).unsqueeze(0) < first_target.unsqueeze(1)] = 0
        yield padded[:, :-1], targets
