"""Building blocks shared by the models: the position-wise feed-forward and the Mamba4Rec layer, run over whole
sequences or carried one item at a time (recurrent serving)."""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import gather_last
from m2rec.model.mamba_block import Mamba


class FeedForward(nn.Module):
    """Position-wise feed-forward with residual and LayerNorm (as in SASRec / Mamba4Rec)."""

    def __init__(self, hidden_size: int, dropout: float, inner_factor: int = 4):
        super().__init__()
        self.w_1 = nn.Linear(hidden_size, hidden_size * inner_factor)
        self.w_2 = nn.Linear(hidden_size * inner_factor, hidden_size)
        self.activation = nn.GELU()
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, L, H)
        hidden = self.dropout(self.w_2(self.dropout(self.activation(self.w_1(x)))))
        return self.norm(hidden + x)


class MambaLayer(nn.Module):
    """Mamba -> dropout -> LayerNorm (residual when stacked) -> feed-forward: Mamba4Rec's layer."""

    def __init__(self, hidden_size: int, d_state: int, d_conv: int, expand: int, dropout: float,
                 residual: bool, dt_min: float = 0.001, dt_max: float = 0.1):
        super().__init__()
        self.mamba = Mamba(d_model=hidden_size, d_state=d_state, d_conv=d_conv, expand=expand,
                           dt_min=dt_min, dt_max=dt_max)
        self.residual = residual
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.ffn = FeedForward(hidden_size, dropout)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H) -> (B, L, H); with `lengths`, only each row's last real position -> (B, 1, H)."""
        if lengths is None:
            hidden = self.dropout(self.mamba(x))
        else:  # everything after the scan is position-wise: run it where the output is used
            hidden, x = self.dropout(self.mamba.forward_last(x, lengths)), gather_last(x, lengths)
        return self._after_mamba(hidden, x)

    def _after_mamba(self, hidden: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Residual (when stacked), LayerNorm and feed-forward of the Mamba output: (..., H) -> (..., H)."""
        return self.ffn(self.norm(hidden + x if self.residual else hidden))

    def forward_with_state(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """(B, L, H) from an empty history -> (B, L, H) and the Mamba (conv_state, ssm_state) after position L."""
        hidden, state = self.mamba(x, return_state=True)
        return self._after_mamba(self.dropout(hidden), x), state

    def step(self, x: torch.Tensor, conv_state: torch.Tensor, ssm_state: torch.Tensor) -> torch.Tensor:
        """One more position: x (B, H) -> (B, H); the states (see `Mamba.step`) advance in place."""
        hidden = self.mamba.step(x.unsqueeze(1), conv_state, ssm_state)[0].squeeze(1)
        return self._after_mamba(self.dropout(hidden), x)


def mamba_stack(hidden_size: int, num_layers: int, d_state: int, d_conv: int, expand: int, dropout: float,
                dt_min: float = 0.001, dt_max: float = 0.1) -> nn.Sequential:
    """`num_layers` Mamba layers; a single layer has no residual, stacked ones do (Mamba4Rec's choice)."""
    return nn.Sequential(*[
        MambaLayer(hidden_size, d_state, d_conv, expand, dropout, residual=num_layers > 1, dt_min=dt_min,
                   dt_max=dt_max)
        for _ in range(num_layers)
    ])


def run_stack(stack: nn.Sequential, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """Apply Mamba layers; with `lengths`, the last layer returns only the last real positions (B, 1, H)."""
    for layer in stack[:-1]:
        x = layer(x)
    return stack[-1](x, lengths)


def stack_state_names(prefix: str, stack: nn.Sequential) -> list[tuple[str, str]]:
    """(conv, ssm) state names of each layer of `stack`, e.g. ("scale0.layer1.conv", "scale0.layer1.ssm")."""
    return [(f"{prefix}layer{i}.conv", f"{prefix}layer{i}.ssm") for i in range(len(stack))]


def init_stack_state(prefix: str, stack: nn.Sequential, batch: int) -> dict[str, torch.Tensor]:
    """Zero states of every layer: conv (B, d_inner, d_conv) and ssm (B, d_inner, d_state), by name."""
    state = {}
    for (conv_name, ssm_name), layer in zip(stack_state_names(prefix, stack), stack):
        state[conv_name], state[ssm_name] = layer.mamba.allocate_inference_cache(batch)
    return state


def run_stack_with_state(prefix: str, stack: nn.Sequential, x: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Apply Mamba layers to (B, L, H) from an empty history; return (B, L, H) and every layer's state after L."""
    state = {}
    for (conv_name, ssm_name), layer in zip(stack_state_names(prefix, stack), stack):
        x, (state[conv_name], state[ssm_name]) = layer.forward_with_state(x)
    return x, state


def step_stack(prefix: str, stack: nn.Sequential, x: torch.Tensor, state: dict[str, torch.Tensor]) -> torch.Tensor:
    """One position through every layer: (B, H) -> (B, H); the layers' states in `state` advance in place."""
    for (conv_name, ssm_name), layer in zip(stack_state_names(prefix, stack), stack):
        x = layer.step(x, state[conv_name], state[ssm_name])
    return x
