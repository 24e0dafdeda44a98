"""Rank the target among all items and turn ranks into HR / NDCG / MRR at K (RecBole's full-sort protocol)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from m2rec.model.base import SequentialRecommender
from m2rec.training.batching import pad_right

KS = (5, 10, 20)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based rank of each target: how many items score strictly higher. scores (B, I+1), targets (B,)."""
    target_scores = scores.gather(1, targets.view(-1, 1))  # (B, 1)
    return (scores > target_scores).sum(1)


def per_user_metrics(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Each user's HR@K, NDCG@K and MRR@K from 0-based ranks (for paired significance tests)."""
    ranks = np.asarray(ranks)
    hit = ranks < k
    return {
        f"HR@{k}": hit.astype(float),
        f"NDCG@{k}": np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0),
        f"MRR@{k}": np.where(hit, 1.0 / (ranks + 1.0), 0.0),
    }


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """Mean HR@K, NDCG@K and MRR@K from 0-based ranks."""
    return {name: float(values.mean()) for k in ks for name, values in per_user_metrics(ranks, k).items()}


@torch.no_grad()
def rank_targets(
    model: SequentialRecommender,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    batch_size: int = 512,
    mask_history: bool = False,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> np.ndarray:
    """Rank every user's target among all items given their history -> (n_users,) 0-based ranks.
    With `mask_history`, items already in the history (other than the target) cannot be ranked above it.

    Users are batched by history length, so a batch pads to about its own length, not to its longest member's:
    on short-sequence data (Amazon reviews, about 9 items a user against a cap of 200) unsorted batches would
    run the model over mostly padding. A user's ranks do not depend on who shares the batch."""
    model.eval()
    order = np.argsort([len(h) for h in histories], kind="stable")
    targets = np.asarray(targets)
    ranks = np.empty(len(histories), dtype=np.int64)
    starts = range(0, len(histories), batch_size)
    for start in tqdm(starts, desc="evaluating", unit="batch", disable=None if progress else True, leave=False):
        users = order[start : start + batch_size]
        batch = [histories[u] for u in users]
        items, lengths = pad_right(batch, model.max_length)
        scores = model(items.to(device), lengths.to(device)).float()  # (B, I+1)
        scores[:, 0] = -torch.inf  # padding is never recommended
        target = torch.as_tensor(targets[users], device=device)
        if mask_history:
            seen = torch.zeros_like(scores, dtype=torch.bool)
            for row, history in enumerate(batch):
                seen[row, torch.as_tensor(history, device=device)] = True
            seen[torch.arange(len(batch)), target] = False
            scores = scores.masked_fill(seen, -torch.inf)
        ranks[users] = target_ranks(scores, target).cpu().numpy()
    return ranks
