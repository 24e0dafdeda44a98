"""Building blocks shared by the models: the position-wise feed-forward and the Mamba4Rec layer."""

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
        hidden = self.norm(hidden + x if self.residual else hidden)
        return self.ffn(hidden)


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
