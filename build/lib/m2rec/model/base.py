"""What every sequential recommender here shares: item embeddings, scoring against all items, gathering."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def gather_last(hidden: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each row's last real position of right-padded states: (B, L, H), (B,) -> (B, 1, H)."""
    index = (lengths - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])
    return hidden.gather(1, index)


class SequentialRecommender(nn.Module):
    """Base class: `encode` maps right-padded item sequences (B, L) to hidden states (B, L, H); items are
    scored by a dot product with `item_representations()` (tied to the input embeddings)."""

    model_type = "base"
    branch_names: Sequence[str] = ()  # names of the gated branches (M2Rec); none for single-path models

    def __init__(self, num_items: int, hidden_size: int, max_length: int):
        super().__init__()
        self.num_items = num_items  # real items are 1..num_items; 0 is padding
        self.max_length = max_length
        self.item_embedding = nn.Embedding(num_items + 1, hidden_size, padding_idx=0)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        with torch.no_grad():
            self.item_embedding.weight[0].zero_()

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        raise NotImplementedError

    def item_representations(self) -> torch.Tensor:
        """(num_items + 1, H): what hidden states are scored against."""
        return self.item_embedding.weight

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., num_items + 1) logits over all items."""
        return hidden @ self.item_representations().t()

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Hidden state at each sequence's last real position: (B, L), (B,) -> (B, H). Models override this to
        skip position-wise work at positions whose output is not needed."""
        return gather_last(self.encode(items), lengths).squeeze(1)

    def encode_with_gates(self, items: torch.Tensor, lengths: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, L) -> hidden (B, L, H) and per-position branch weights (B, L, n_branches) over
        `self.branch_names`, or None for a model without branches; with `lengths`, only each row's last real
        position (B, 1, ...). What a recommendation is explained with."""
        if lengths is None:
            return self.encode(items), None
        return self.last_hidden(items, lengths).unsqueeze(1), None

    def forward(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Next-item logits after each sequence: (B, L), (B,) -> (B, num_items + 1)."""
        return self.scores(self.last_hidden(items, lengths))
