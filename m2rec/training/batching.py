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


def epoch_batches(windows: list[np.ndarray], batch_size: int, seed: int, rank: int = 0, world_size: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled (inputs (B, L), targets (B, L)) batches; each rank of a data-parallel run gets its share of an
    equal number of batches. Target 0 marks padding."""
    order = torch.randperm(len(windows), generator=torch.Generator().manual_seed(seed)).numpy()
    starts = list(range(0, len(order), batch_size))
    starts = starts[: len(starts) - len(starts) % world_size] if world_size > 1 else starts
    for start in starts[rank::world_size]:
        chosen = [windows[i] for i in order[start : start + batch_size]]
        padded, _ = pad_right(chosen, len(max(chosen, key=len)))
        yield padded[:, :-1], padded[:, 1:]
