"""Turn variable-length item sequences into right-padded tensors."""

from __future__ import annotations

from typing import Iterator, Sequence

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


def training_windows(sequences: Sequence[np.ndarray], max_length: int) -> list[np.ndarray]:
    """Cut each training sequence into windows of at most max_length + 1 items, from the most recent back,
    so every (prefix -> next item) pair is trained once; sequences shorter than 2 give nothing."""
    windows = []
    for seq in sequences:
        end = len(seq)
        while end >= 2:
            windows.append(np.asarray(seq[max(0, end - max_length - 1) : end]))
            end -= max_length
    return windows


def epoch_batches(windows: list[np.ndarray], batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                  bucket: int = 50) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (inputs (B, L), targets (B, L)) batches of windows of similar length; each rank of a
    data-parallel run gets its share of an equal number of batches. Target 0 marks padding.

    Windows are shuffled, cut into chunks of `bucket` batches, sorted by length inside each chunk and batched,
    and the batch order is shuffled: each batch pads to little more than its own length (on short-sequence
    data such as Amazon reviews this removes most of the padded work) while every epoch still sees a new
    random grouping. `bucket=1` gives plain shuffled batches."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(windows), generator=generator).numpy()
    lengths = np.array([len(w) for w in windows])
    chunk = batch_size * bucket
    for start in range(0, len(order), chunk):
        part = order[start : start + chunk]
        order[start : start + chunk] = part[np.argsort(lengths[part], kind="stable")]
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    batches = batches[: len(batches) - len(batches) % world_size] if world_size > 1 else batches
    for indices in batches[rank::world_size]:
        chosen = [windows[i] for i in indices]
        padded, _ = pad_right(chosen, len(max(chosen, key=len)))
        yield padded[:, :-1], padded[:, 1:]
