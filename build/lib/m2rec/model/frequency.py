"""Frequency branch: a learnable filter over the sequence axis, applied causally with FFTs.

A global FFT filter (as in FMLP-Rec, and in the M2Rec authors' code over the channel axis) mixes future items
into the past. Here the learnable frequency response W (per channel) is turned into an impulse response whose
negative-lag half is cut away, and that causal kernel is applied as a linear convolution computed with FFTs
zero-padded to 2L: y_t = sum_{s <= t} k_{t-s} x_s. The response can still single out periodic components
(e.g. a weekly routine) and damp high-frequency noise, but position t only ever sees positions <= t.
"""

from __future__ import annotations

import torch
from torch import nn

from m2rec.model.base import gather_last


class CausalFourierFilter(nn.Module):
    """Learnable per-channel frequency response, applied as a causal FFT convolution over the sequence."""

    def __init__(self, hidden_size: int, max_length: int, dropout: float = 0.0):
        super().__init__()
        self.max_length = max_length
        n_freq = max_length + 1  # rfft bins of a length-2*max_length signal
        # complex response (real, imag) per frequency and channel; initialised near an identity-like low-pass
        self.response = nn.Parameter(torch.randn(n_freq, hidden_size, 2) * 0.02)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(hidden_size)

    def kernel(self, length: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The causal impulse response truncated to `length` lags -> (length, H)."""
        response = torch.view_as_complex(self.response.to(dtype).contiguous())  # (F, H)
        impulse = torch.fft.irfft(response, n=2 * self.max_length, dim=0)  # (2*max_length, H)
        return impulse[:length]  # keep lags 0..length-1 only: the causal part

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L, H) -> (B, L, H), LayerNorm(x + filtered(x))."""
        length = x.shape[1]
        if length > self.max_length:
            raise ValueError(f"sequence length {length} exceeds the filter's max_length {self.max_length}")
        n = 2 * length  # zero-padding to 2L makes the circular convolution a linear one
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32  # FFTs in half precision drift
        spectrum = torch.fft.rfft(x.to(dtype), n=n, dim=1)  # (B, L+1, H)
        kernel_spectrum = torch.fft.rfft(self.kernel(length, dtype), n=n, dim=0)  # (L+1, H)
        filtered = torch.fft.irfft(spectrum * kernel_spectrum, n=n, dim=1)[:, :length]  # (B, L, H)
        return self.norm(x + self.dropout(filtered.to(x.dtype)))

    def forward_last(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Only each row's last real position: x (B, L, H), lengths (B,) -> (B, 1, H); a direct O(L) dot
        product with the causal kernel, the same value `forward` gives there."""
        length = x.shape[1]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        lags = (lengths.view(-1, 1) - 1) - torch.arange(length, device=x.device)  # (B, L): lag of position s
        weights = self.kernel(length, dtype)[lags.clamp(0, length - 1)]  # (B, L, H)
        weights = weights.masked_fill((lags < 0).unsqueeze(-1), 0.0)  # positions after the last see nothing
        filtered = (weights * x.to(dtype)).sum(1, keepdim=True)  # (B, 1, H)
        return self.norm(gather_last(x, lengths) + self.dropout(filtered.to(x.dtype)))
