"""M2Rec: multi-scale Mamba (temporal) + causal Fourier filter (frequency) + LLM item text (semantic), fused by a
learned per-position gate. Paper: "M2Rec: Multi-scale Mamba for Efficient Sequential Recommendation".

Unlike the authors' released code, every branch here does what the paper says and is causal:
- temporal: parallel Mamba stacks whose time steps are initialised in different ranges (short vs long memory;
  one scale by default, see config.PAPER_DESIGN);
- frequency: a learnable frequency response over the *sequence* axis, applied as a causal FFT convolution;
- semantic: frozen text embeddings of each item, projected into the model's width, kept (never overwritten);
- gate: softmax over the branches, per position, returned so a recommendation can be explained.
Items are scored against their ID embedding plus their projected text, so an item with text but no
interactions can still be recommended.
"""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import RecurrentRecommender, RecurrentState, empty_window, push_window, window_of
from m2rec.model.config import ModelParams
from m2rec.model.frequency import CausalFourierFilter
from m2rec.model.item_text import ScoredThroughText
from m2rec.model.layers import (FeedForward, init_stack_state, mamba_stack, run_stack, run_stack_with_state,
                                step_stack)

BRANCHES = ("temporal", "frequency", "semantic")


class M2Rec(ScoredThroughText, RecurrentRecommender):
    """The gated three-branch model; `params.use_frequency`, `use_text`, `gate`, `scales` give its ablations."""

    model_type = "m2rec"

    def __init__(self, num_items: int, params: ModelParams, item_text_embeddings: torch.Tensor | None = None):
        super().__init__(num_items, params.hidden_size, params.max_length)
        hidden = params.hidden_size
        self.params = params
        self.dropout = nn.Dropout(params.dropout)
        self.norm = nn.LayerNorm(hidden, eps=1e-12)
        self.scales = nn.ModuleList(
            mamba_stack(hidden, params.num_layers, params.scale_d_state or params.d_state, params.d_conv,
                        params.scale_expand or params.expand, params.dropout, dt_min=dt_min, dt_max=dt_max)
            for dt_min, dt_max in params.scales
        )
        self.scale_mix = nn.Linear(hidden * len(params.scales), hidden) if len(params.scales) > 1 else None
        if params.use_frequency:
            self.frequency_filter = CausalFourierFilter(hidden, params.max_length, params.dropout)
            self.frequency_ffn = FeedForward(hidden, params.dropout)
        if params.use_text:
            if item_text_embeddings is None or item_text_embeddings.shape[0] != num_items + 1:
                raise ValueError("use_text needs item_text_embeddings of shape (num_items + 1, text_dim)")
            self.text_input = nn.Sequential(nn.Linear(item_text_embeddings.shape[1], hidden),
                                            nn.LayerNorm(hidden, eps=1e-12))  # before text_output: same init draws
            self._init_item_text(item_text_embeddings, hidden, params.item_id_dropout)
        self.branch_names = [n for n, on in zip(BRANCHES, (True, params.use_frequency, params.use_text)) if on]
        self.gate = nn.Linear(hidden * len(self.branch_names), len(self.branch_names)) \
            if params.gate == "learned" and len(self.branch_names) > 1 else None
        self.output_norm = nn.LayerNorm(hidden, eps=1e-12)

    def item_representations(self) -> torch.Tensor:  # (I+1, H)
        """ID embedding plus projected text (see ScoredThroughText), so text alone can place an unseen item; the
        ID embedding alone without the text branch."""
        return super().item_representations() if self.params.use_text else self.item_embedding.weight

    def _embed(self, items: torch.Tensor) -> torch.Tensor:  # (...) -> (..., H): what the sequence branches read
        embedded = self.item_embedding(items)
        if self.params.use_text and self.params.text_in_sequence:
            embedded = embedded + self.projected_text(items)  # as the item is scored; zero for padding
        return self.norm(self.dropout(embedded))

    def _text(self, items: torch.Tensor) -> torch.Tensor:  # (...) -> (..., H): the semantic branch
        return self.dropout(self.text_input(self.item_text[items]))

    def _fuse(self, per_scale: list[torch.Tensor], branches: list[torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Temporal scales (..., H) each, then the other branches (..., H) -> hidden (..., H), gates (..., n)."""
        temporal = self.scale_mix(torch.cat(per_scale, -1)) if self.scale_mix is not None else per_scale[0]
        stacked = torch.stack([temporal, *branches], dim=-2)  # (..., n_branches, H)
        if self.gate is not None:
            gates = torch.softmax(self.gate(stacked.flatten(-2)), dim=-1)  # (..., n_branches)
        else:
            gates = stacked.new_full(stacked.shape[:-1], 1.0 / stacked.shape[-2])
        fused = (gates.unsqueeze(-1) * stacked).sum(-2)  # (..., H)
        return self.output_norm(fused), gates

    def encode_with_gates(self, items: torch.Tensor, lengths: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L) -> hidden (B, L, H) and gate weights (B, L, n_branches) over `self.branch_names`. With
        `lengths`, only each row's last real position is returned (B, 1, ...): the sequence-mixing parts run
        over the whole history, the position-wise parts only where the output is used."""
        embedded = self._embed(items)  # (B, L, H)
        per_scale = [run_stack(stack, embedded, lengths) for stack in self.scales]  # n_scales x (B, L|1, H)
        branches = []
        if self.params.use_frequency:
            filtered = (self.frequency_filter(embedded) if lengths is None
                        else self.frequency_filter.forward_last(embedded, lengths))
            branches.append(self.frequency_ffn(filtered))
        if self.params.use_text:
            current = items if lengths is None else items.gather(1, (lengths - 1).view(-1, 1))  # (B, L|1)
            branches.append(self._text(current))
        return self._fuse(per_scale, branches)

    def encode(self, items: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, L, H)
        return self.encode_with_gates(items)[0]

    def last_hidden(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:  # -> (B, H)
        return self.encode_with_gates(items, lengths)[0].squeeze(1)

    # State: per temporal scale s and layer i "scale{s}.layer{i}.conv" (B, d_inner, d_conv) and
    # "scale{s}.layer{i}.ssm" (B, d_inner, d_state); "window" (B, max_length), the last items right-aligned (0:
    # none), which makes the frequency branch one (max_length x H) product with its causal kernel; "hidden" (B, H),
    # "gates" (B, n_branches), "length" (B,).
    def init_state(self, batch: int) -> RecurrentState:
        state: RecurrentState = {}
        for s, stack in enumerate(self.scales):
            state.update(init_stack_state(f"scale{s}.", stack, batch))
        weight = self.item_embedding.weight
        return {**state, **empty_window(batch, self.max_length, weight.device),
                "hidden": weight.new_zeros(batch, weight.shape[1]),
                "gates": weight.new_zeros(batch, len(self.branch_names))}

    def _readout(self, per_scale: list[torch.Tensor], window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last temporal outputs (B, H) per scale and the window (B, W) -> hidden (B, H), gates (B, n)."""
        branches = []
        if self.params.use_frequency:
            embedded = self._embed(window) * (window != 0).unsqueeze(-1)  # (B, W, H), empty slots add nothing
            full = torch.full((len(window),), window.shape[1], device=window.device)
            branches.append(self.frequency_ffn(self.frequency_filter.forward_last(embedded, full)).squeeze(1))
        if self.params.use_text:
            branches.append(self._text(window[:, -1]))
        return self._fuse(per_scale, branches)

    def step(self, items: torch.Tensor, state: RecurrentState) -> tuple[torch.Tensor, torch.Tensor, RecurrentState]:
        embedded = self._embed(items)  # (B, H)
        per_scale = [step_stack(f"scale{s}.", stack, embedded, state) for s, stack in enumerate(self.scales)]
        push_window(state, items)
        hidden, gates = self._readout(per_scale, state["window"])
        state["hidden"].copy_(hidden)
        state["gates"].copy_(gates)
        return hidden, gates, state

    def state_from_history(self, items: torch.Tensor) -> RecurrentState:
        embedded = self._embed(items.unsqueeze(0))  # (1, L, H)
        state: RecurrentState = {}
        per_scale = []
        for s, stack in enumerate(self.scales):
            hidden, scale_state = run_stack_with_state(f"scale{s}.", stack, embedded)  # (1, L, H)
            per_scale.append(hidden[:, -1])
            state.update(scale_state)
        state.update(window_of(items, self.max_length))
        hidden, gates = self._readout(per_scale, state["window"])
        return {**state, "hidden": hidden, "gates": gates}
