"""Next-item losses whose memory does not grow with the catalog times the batch.

`full`: cross-entropy over every trained item, exact. The (positions x items) logits are computed a chunk of
positions at a time under activation checkpointing, so a step holds one chunk's logits, not the batch's: on a
27k-item catalog a batch of 256 windows of 200 items would otherwise hold 5.5 GB of logits, and as much again
for their gradient.

`sampled`: cross-entropy of the target against `negatives` items drawn uniformly from the trained items, shared
by every position of the step (sampled softmax; a uniform proposal needs no log-Q correction). Its work per
position is constant, so an epoch grows linearly with the data even when the catalog grows with it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from m2rec.model.base import SequentialRecommender

LossKind = Literal["full", "sampled"]
LOGITS_PER_CHUNK = 16 * 2**20  # float32 logits held at once by the full loss (64 MiB)


def _chunk_cross_entropy(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                         untrained: torch.Tensor | None) -> torch.Tensor:
    """Summed cross-entropy of one chunk: hidden (n, H), items (I+1, H), targets (n,) -> ()."""
    logits = (hidden @ items.t()).float()  # (n, I+1)
    if untrained is not None:
        logits = logits.masked_fill(untrained, float("-inf"))
    return nn.functional.cross_entropy(logits, targets, reduction="sum")


def full_cross_entropy(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                       untrained: torch.Tensor | None = None, logits_per_chunk: int = LOGITS_PER_CHUNK
                       ) -> torch.Tensor:
    """Mean cross-entropy over all items of hidden (N, H) against targets (N,), items (I+1, H), never holding
    more than `logits_per_chunk` logits (one chunk's, recomputed in the backward pass)."""
    rows = max(1, logits_per_chunk // items.shape[0])
    if rows >= len(hidden):
        return _chunk_cross_entropy(hidden, items, targets, untrained) / len(hidden)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, len(hidden), rows):
        total = total + checkpoint(_chunk_cross_entropy, hidden[start : start + rows], items,
                                   targets[start : start + rows], untrained, use_reentrant=False)
    return total / len(hidden)


def sampled_cross_entropy(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                          candidates: torch.Tensor, negatives: int) -> torch.Tensor:
    """Mean cross-entropy of each target against `negatives` items drawn uniformly (with replacement) from
    `candidates` (K,) item ids, shared by all positions; a draw equal to a position's target is not its negative.
    hidden (N, H), items (I+1, H), targets (N,)."""
    drawn = candidates[torch.randint(len(candidates), (negatives,), device=candidates.device)]  # (S,)
    positive = (hidden * items[targets]).sum(-1, keepdim=True).float()  # (N, 1)
    negative = (hidden @ items[drawn].t()).float()  # (N, S)
    negative = negative.masked_fill(drawn.unsqueeze(0) == targets.unsqueeze(1), float("-inf"))
    logits = torch.cat([positive, negative], dim=1)  # (N, 1 + S)
    return nn.functional.cross_entropy(logits, torch.zeros_like(targets))


class NextItemLoss(nn.Module):
    """The loss of every real position's next item (target 0: padding or history, ignored), `full` or `sampled`
    (see the module). Items that never occur in training are no negatives: a softmax would otherwise push their
    embeddings away from every user, so that a new catalog item could never be recommended, even by its text.
    Wrapping the model this way lets DistributedDataParallel see one forward per step."""

    def __init__(self, model: SequentialRecommender, trained_items: torch.Tensor | None = None,
                 kind: LossKind = "full", negatives: int = 1024):
        super().__init__()
        self.model, self.kind, self.negatives = model, kind, negatives
        trained = trained_items if trained_items is not None else torch.ones(model.num_items + 1, dtype=torch.bool)
        trained = trained.clone()
        trained[0] = False
        self.register_buffer("untrained", None if trained_items is None else ~trained_items)  # (I+1,) bool
        self.register_buffer("candidates", trained.nonzero().squeeze(1))  # (K,) ids a negative is drawn from

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        hidden = self.model.encode(inputs)  # (B, L, H)
        real = targets > 0  # (B, L)
        items = self.model.item_representations()  # (I+1, H), once per step (item-ID dropout draws here)
        if self.kind == "sampled":
            return sampled_cross_entropy(hidden[real], items, targets[real], self.candidates, self.negatives)
        return full_cross_entropy(hidden[real], items, targets[real], self.untrained)
