"""Mamba4Rec-style baseline (Liu et al., 2024): item embedding, Mamba layer(s), feed-forward, tied output."""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import RecurrentRecommender, RecurrentState, empty_window, push_window, window_of
from m2rec.model.config import ModelParams
from m2rec.model.layers import init_stack_state, mamba_stack, run_stack, run_stack_with_state, step_stack


class Mamba4Rec(RecurrentRecommender):
    """Embedding -> dropout -> LayerNorm -> Mamba layers -> last position, scored against item embeddings."""

    model_type = "mamba4rec"

    def __init__(self, num_items: int, params: ModelParams):
        super().__init__(num_items, params.hidden_size, params.max_length)
        self.dropout = nn.Dropout(params.dropout)
        self.norm = nn.LayerNorm(params.hidden_size, eps=1e-12)
        self.layers = mamba_stack(params.hidden_size, params.num_layers, params.d_state, params.d_conv,
                                  params.expand, params.dropout)

    def _embed(self, items: torch.Tensor) -> torch.Tensor:  # (...) -> (..., H)
        return self.norm(self.dropout(self.item_embedding(items)))

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        return run_stack(self.layers, self._embed(items))

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # -> (B, H)
        return run_stack(self.layers, self._embed(items), lengths).squeeze(1)

    # State: "layer{i}.conv" (B, d_inner, d_conv) and "layer{i}.ssm" (B, d_inner, d_state) per layer, "window"
    # (B, max_length), "hidden" (B, H), "length" (B,).
    def init_state(self, batch: int) -> RecurrentState:
        weight = self.item_embedding.weight
        return {**init_stack_state("", self.layers, batch), **empty_window(batch, self.max_length, weight.device),
                "hidden": weight.new_zeros(batch, weight.shape[1])}

    def step(self, items: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, None, RecurrentState]:
        hidden = step_stack("", self.layers, self._embed(items), state)  # (B, H)
        push_window(state, items)
        state["hidden"].copy_(hidden)
        return hidden, None, state

    def state_from_history(self, items: torch.Tensor) -> RecurrentState:
        hidden, state = run_stack_with_state("", self.layers, self._embed(items.unsqueeze(0)))  # (1, L, H)
        return {**state, **window_of(items, self.max_length), "hidden": hidden[:, -1].clone()}
