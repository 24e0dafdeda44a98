"""Mamba4Rec-style baseline (Liu et al., 2024): item embedding, Mamba layer(s), feed-forward, tied output."""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import SequentialRecommender
from m2rec.model.config import ModelParams
from m2rec.model.layers import mamba_stack, run_stack


class Mamba4Rec(SequentialRecommender):
    """Embedding -> dropout -> LayerNorm -> Mamba layers -> last position, scored against item embeddings."""

    model_type = "mamba4rec"

    def __init__(self, num_items: int, params: ModelParams):
        super().__init__(num_items, params.hidden_size, params.max_length)
        self.dropout = nn.Dropout(params.dropout)
        self.norm = nn.LayerNorm(params.hidden_size, eps=1e-12)
        self.layers = mamba_stack(params.hidden_size, params.num_layers, params.d_state, params.d_conv,
                                  params.expand, params.dropout)

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        return run_stack(self.layers, self.norm(self.dropout(self.item_embedding(items))))

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # -> (B, H)
        return run_stack(self.layers, self.norm(self.dropout(self.item_embedding(items))), lengths).squeeze(1)
