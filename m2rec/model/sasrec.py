"""SASRec (Kang & McAuley, 2018): causal self-attention over item sequences; the Transformer baseline."""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import SequentialRecommender, gather_last
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
        self.apply(_init_weights)

    def embed_items(self, items: torch.Tensor) -> torch.Tensor:
        """(B, L) -> (B, L, H): what the sequence is read as (the ID embeddings, tied to the output)."""
        return self.item_embedding(items)

    def _embed(self, items: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> embedded input (B, L, H) and the causal attention mask (L, L)."""
        length = items.shape[1]
        positions = torch.arange(length, device=items.device)
        hidden = self.dropout(self.norm(self.embed_items(items) + self.position_embedding(positions)))
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=items.device, dtype=hidden.dtype)
        return hidden, causal

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        hidden, causal = self._embed(items)
        return self.blocks(hidden, mask=causal, is_causal=True)

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # -> (B, H)
        """The last block runs only for each row's last real position (its query), over all earlier keys."""
        hidden, causal = self._embed(items)
        for block in self.blocks.layers[:-1]:
            hidden = block(hidden, src_mask=causal, is_causal=True)
        block = self.blocks.layers[-1]
        query = gather_last(hidden, lengths)  # (B, 1, H)
        padding = torch.arange(items.shape[1], device=items.device).unsqueeze(0) >= lengths.unsqueeze(1)  # (B, L)
        attended = block.self_attn(query, hidden, hidden, key_padding_mask=padding, need_weights=False)[0]
        x = block.norm1(query + block.dropout1(attended))
        x = block.norm2(x + block.dropout2(block.linear2(block.dropout(block.activation(block.linear1(x))))))
        return x.squeeze(1)


def _init_weights(module: nn.Module) -> None:
    """RecBole's SASRec initialisation: N(0, 0.02) weights, zero biases. (PyTorch's default N(0, 1) position
    embeddings would drown the item embeddings and stall training.)"""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Embedding) and module.padding_idx is not None:
        with torch.no_grad():
            module.weight[module.padding_idx].zero_()
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)
    if isinstance(module, nn.MultiheadAttention):
        nn.init.normal_(module.in_proj_weight, std=0.02)
        nn.init.zeros_(module.in_proj_bias)
