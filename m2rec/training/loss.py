"""Next-item losses whose memory does not grow with the catalog times the batch.

`full`: cross-entropy over every trained item, exact. The (positions x items) logits are computed a chunk of
positions at a time and again in the backward pass, so a step holds one chunk's logits, not the batch's: on a
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

from m2rec.model.base import SequentialRecommender

LossKind = Literal["full", "sampled"]
LOGITS_PER_CHUNK = 16 * 2**20  # float32 logits held at once by the full loss (64 MiB)


def _softmax_numerators(hidden: torch.Tensor, items: torch.Tensor, untrained: torch.Tensor | None,
                        shift: torch.Tensor | None = None, out: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """exp(logits - shift) of one chunk, hidden (n, H) against items (I+1, H) -> (n, I+1) float32 (float64 stays
    float64), computed in place of the logits, and the shift (n,): each row's largest logit unless given (the
    log-sum-exp in the backward pass, which makes the result the softmax). Untrained items get exp(-inf) = 0.
    `out` (>= n, I+1): a buffer the logits are written to instead of a new block (not under autocast, which has
    no `out=`)."""
    logits = hidden @ items.t() if out is None else torch.matmul(hidden, items.t(), out=out[: len(hidden)])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if untrained is not None:
        logits.masked_fill_(untrained, float("-inf"))
    if shift is None:
        shift = logits.amax(dim=1)  # (n,)
    return logits.sub_(shift.unsqueeze(1)).exp_(), shift


def _logits_buffer(hidden: torch.Tensor, items: torch.Tensor, rows: int) -> torch.Tensor | None:
    """One (rows, I+1) block for every chunk of a pass to write its logits to; None under autocast."""
    if torch.is_autocast_enabled(hidden.device.type):
        return None
    return hidden.new_empty((min(rows, len(hidden)), items.shape[0]), dtype=torch.promote_types(hidden.dtype,
                                                                                                 items.dtype))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """Summed softmax cross-entropy of hidden (N, H) against targets (N,) over items (I+1, H), `rows` positions
    at a time. Forward keeps only each position's log-sum-exp (N,); backward recomputes a chunk's softmax and
    turns it into the gradients in place. Each pass writes every chunk's logits to one (rows, I+1) block, where
    autograd's cross_entropy under activation checkpointing allocated about eight per chunk (logits, masked copy,
    log-softmax, their recomputation and gradients): on the CPU, where the trainer maps every large block afresh
    (m2rec.utils.memory), the kernel zeroed them page by page, about half of an amazon-games epoch's time
    (benchmarks/loss_speed.py)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                untrained: torch.Tensor | None, rows: int) -> torch.Tensor:
        log_norm, buffer = [], _logits_buffer(hidden, items, rows)  # per chunk (n,): log-sum-exp of the logits
        for start in range(0, len(hidden), rows):
            numerators, shift = _softmax_numerators(hidden[start : start + rows], items, untrained, out=buffer)
            log_norm.append(numerators.sum(dim=1).log_() + shift)
        log_norm = torch.cat(log_norm)  # (N,)
        target_logits = (hidden * items[targets]).sum(dim=1).to(log_norm.dtype)  # (N,)
        ctx.save_for_backward(hidden, items, targets, log_norm)
        ctx.untrained, ctx.rows = untrained, rows
        return (log_norm - target_logits).sum()

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        hidden, items, targets, log_norm = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        grad_items = torch.zeros(items.shape, dtype=log_norm.dtype, device=items.device)  # (I+1, H)
        buffer = _logits_buffer(hidden, items, ctx.rows)
        for start in range(0, len(hidden), ctx.rows):
            chunk = hidden[start : start + ctx.rows]  # (n, H)
            softmax, _ = _softmax_numerators(chunk, items, ctx.untrained, log_norm[start : start + ctx.rows], buffer)
            softmax[torch.arange(len(chunk), device=chunk.device), targets[start : start + ctx.rows]] -= 1.0
            grad_hidden[start : start + ctx.rows] = softmax @ items.to(softmax.dtype)  # d loss/d logits @ items
            grad_items.addmm_(softmax.t(), chunk.to(softmax.dtype))  # (I+1, H), in place (autocast or not)
        return grad_hidden * grad.to(hidden.dtype), (grad_items * grad).to(items.dtype), None, None, None


def full_cross_entropy(hidden: torch.Tensor, items: torch.Tensor, targets: torch.Tensor,
                       untrained: torch.Tensor | None = None, logits_per_chunk: int = LOGITS_PER_CHUNK
                       ) -> torch.Tensor:
    """Mean cross-entropy over all items of hidden (N, H) against targets (N,), items (I+1, H), never holding
    more than `logits_per_chunk` logits (one chunk's, recomputed in the backward pass); `untrained` (I+1,) bool
    marks items that are no candidates (padding, items absent from training)."""
    rows = max(1, logits_per_chunk // items.shape[0])
    return _ChunkedCrossEntropy.apply(hidden, items, targets, untrained, rows) / len(hidden)


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
