"""SASRec (Kang & McAuley, 2018): causal self-attention over item sequences; the Transformer baseline."""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import SequentialRecommender
from m2rec.model.config import ModelParams


class SASRec(SequentialRecommender):
    """Item + learned position embeddings, post-LN Transformer blocks with a causal mask, tied output."""

    model_type = "sasrec"

    def __init__(self, num_items: int, params: ModelParams):
        super().__init__(num_items, params.hidden_size, params.max_length)
        self.position_embedding = nn.Embedding(params.max_length, params.hidden_size)
        self.norm = nn.LayerNorm(params.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(params.dropout)
        block = nn.TransformerEncoderLayer(
            params.hidden_size, params.num_heads, dim_feedforward=4 * params.hidden_size, dropout=params.dropout,
            activation="gelu", batch_first=True, layer_norm_eps=1e-12,
        )
        self.blocks = nn.TransformerEncoder(block, params.sasrec_layers, enable_nested_tensor=False)

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        length = items.shape[1]
        positions = torch.arange(length, device=items.device)
        hidden = self.dropout(self.norm(self.item_embedding(items) + self.position_embedding(positions)))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=items.device, dtype=hidden.dtype)
        return self.blocks(hidden, mask=causal, is_causal=True)
