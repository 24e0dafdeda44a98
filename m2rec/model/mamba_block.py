"""Mamba (S6) block with the parameters of ``mamba_ssm.modules.mamba_simple.Mamba``.

State dicts are interchangeable with ``mamba_ssm.Mamba`` (same names, shapes and init).
On CUDA with ``mamba_ssm`` installed the forward pass uses its fused kernels; everywhere
else it runs the exact CPU selective scan of :mod:`m2rec.model.selective_scan`.

Recurrent use (e.g. serving a user's session one item at a time)::

    out, (conv_state, ssm_state) = block(prefix, return_state=True)   # full pass
    y, conv_state, ssm_state = block.step(next_item, conv_state, ssm_state)  # O(1)

or, item by item from scratch, ``allocate_inference_cache(batch)`` then ``step``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from m2rec.model.base import gather_last
from m2rec.model.selective_scan import (causal_conv_silu, selective_scan, selective_scan_last, selective_scan_step,
                                        time_steps)

__all__ = ["Mamba"]

MambaState = Tuple[Tensor, Tensor]  # (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state))


@functools.lru_cache(maxsize=1)
def _cuda_ops() -> Optional[Tuple[Callable[..., Any], Optional[Callable[..., Any]]]]:
    """(mamba_inner_fn, causal_conv1d_fn or None) if mamba_ssm imports, else None."""
    try:
        from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn
    except Exception:  # noqa: BLE001 - ImportError or a CUDA/ABI error at import
        return None
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:  # noqa: BLE001
        causal_conv1d_fn = None
    return mamba_inner_fn, causal_conv1d_fn


def _param_dtype(p: Tensor) -> torch.dtype:
    """At least float32 (A_log and D are kept in fp32 by mamba_ssm; float64 stays)."""
    return torch.promote_types(p.dtype, torch.float32)


class Mamba(nn.Module):
    """Selective state-space block (Gu & Dao, 2023); input and output (B, L, d_model)."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: Union[int, str] = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        use_fast_path: bool = True,
        layer_idx: Optional[int] = None,
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        factory_kwargs: Dict[str, Any] = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(self.expand * self.d_model)
        self.dt_rank = math.ceil(self.d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(self.d_model, self.d_inner * 2, bias=bias, **factory_kwargs)
        self.conv1d = nn.Conv1d(
            in_channels=self.d_inner,
            out_channels=self.d_inner,
            bias=conv_bias,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            **factory_kwargs,
        )
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(
            self.d_inner, self.dt_rank + self.d_state * 2, bias=False, **factory_kwargs
        )
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory_kwargs)

        # dt projection init that preserves variance.
        dt_init_std = self.dt_rank**-0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(self.dt_proj.weight, dt_init_std)
        elif dt_init == "random":
            nn.init.uniform_(self.dt_proj.weight, -dt_init_std, dt_init_std)
        else:
            raise NotImplementedError(f"dt_init={dt_init!r}")
        # dt bias such that softplus(bias) is log-uniform in [dt_min, dt_max].
        dt = torch.exp(
            torch.rand(self.d_inner, **factory_kwargs) * (math.log(dt_max) - math.log(dt_min))
            + math.log(dt_min)
        ).clamp(min=dt_init_floor)
        inv_dt = dt + torch.log(-torch.expm1(-dt))  # inverse of softplus
        with torch.no_grad():
            self.dt_proj.bias.copy_(inv_dt)
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]

        # S4D-real init: A[d, n] = -(n + 1), stored as log in fp32.
        A = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)
        A = A.unsqueeze(0).expand(self.d_inner, -1).contiguous()  # (d_inner, d_state)
        self.A_log = nn.Parameter(torch.log(A))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # fp32 skip
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

        self.out_proj = nn.Linear(self.d_inner, self.d_model, bias=bias, **factory_kwargs)

    # ------------------------------------------------------------------ helpers

    def _A(self) -> Tensor:
        """A = -exp(A_log), (d_inner, d_state), at least float32."""
        return -torch.exp(self.A_log.to(_param_dtype(self.A_log)))

    def _conv_weight(self) -> Tensor:
        return self.conv1d.weight.squeeze(1)  # (d_inner, d_conv)

    def _use_cuda_fast_path(self, hidden_states: Tensor) -> bool:
        if not (hidden_states.is_cuda and self.use_fast_path):
            return False
        ops = _cuda_ops()
        return ops is not None and ops[1] is not None

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        hidden_states: Tensor,
        inference_params: Any = None,
        *,
        state: Optional[MambaState] = None,
        return_state: bool = False,
    ) -> Union[Tensor, Tuple[Tensor, MambaState]]:
        """Causal forward pass.

        hidden_states: (B, L, d_model). ``state``: optional (conv_state, ssm_state) to
        continue from (as returned by a previous call or by :meth:`step`); default is an
        empty history. With ``return_state`` also returns the (conv_state, ssm_state)
        after the last position, ready for :meth:`step` or another ``forward``.
        ``inference_params`` follows mamba_ssm's convention (cache keyed by layer_idx).
        Returns (B, L, d_model).
        """
        batch, seqlen, _ = hidden_states.shape

        if inference_params is not None:
            if state is not None:
                raise ValueError("pass either inference_params or state, not both")
            conv_cache, ssm_cache = self._get_states_from_cache(inference_params, batch)
            if inference_params.seqlen_offset > 0:
                out, _, _ = self.step(hidden_states, conv_cache, ssm_cache)  # in place
                return out
            out, new_state = self._forward_scan(hidden_states, None, True)
            assert new_state is not None
            conv_state, ssm_state = new_state
            conv_cache.copy_(conv_state)
            ssm_cache.copy_(ssm_state)
            return (out, (conv_state, ssm_state)) if return_state else out

        if state is None and not return_state and self._use_cuda_fast_path(hidden_states):
            return self._forward_cuda_fused(hidden_states)
        out, new_state = self._forward_scan(hidden_states, state, return_state)
        return (out, new_state) if return_state else out  # type: ignore[return-value]

    def forward_last(self, hidden_states: Tensor, lengths: Tensor) -> Tensor:
        """The output at each row's last real position only: (B, L, d_model), (B,) -> (B, 1, d_model), equal to
        ``gather_last(self(hidden_states), lengths)`` within float tolerance. The conv and the scan run up to that
        position in channel-last layout (no transposes), the scan forms y there only, and the position-wise rest
        (the z half of in_proj, the D skip, the silu(z) gate, out_proj) runs at that one position."""
        if self._use_cuda_fast_path(hidden_states):
            return gather_last(self._forward_cuda_fused(hidden_states), lengths)
        in_x, in_z = self.in_proj.weight.chunk(2, dim=0)  # (d_inner, d_model) each
        bias_x, bias_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        x = F.linear(hidden_states, in_x, bias_x)  # (B, L, d_inner)
        x = causal_conv_silu(x, self._conv_weight(), self.conv1d.bias)  # (B, L, d_inner)
        x_dbl = self.x_proj(x)  # (B, L, dt_rank + 2*d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = time_steps(dt, self.dt_proj.weight, self.dt_proj.bias)  # (B, L, d_inner), final time steps
        last = (lengths - 1).clamp_min(0)  # (B,)
        y_last = selective_scan_last(x, dt, self._A(), B, C, last)  # (B, d_inner), without the D skip and the gate
        x_last = x[torch.arange(len(x), device=x.device), last]  # (B, d_inner)
        z_last = F.linear(gather_last(hidden_states, lengths).squeeze(1), in_z, bias_z)  # (B, d_inner)
        y_last = (y_last + x_last * self.D.to(_param_dtype(self.D))) * self.act(z_last)
        return self.out_proj(y_last.to(hidden_states.dtype)).unsqueeze(1)  # (B, 1, d_model)

    def _forward_cuda_fused(self, hidden_states: Tensor) -> Tensor:
        """mamba_ssm's fused conv + scan + projections (CUDA only)."""
        ops = _cuda_ops()
        assert ops is not None
        mamba_inner_fn = ops[0]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        return mamba_inner_fn(
            xz,
            self.conv1d.weight,
            self.conv1d.bias,
            self.x_proj.weight,
            self.dt_proj.weight,
            self.out_proj.weight,
            self.out_proj.bias,
            self._A().float(),
            None,  # input-dependent B
            None,  # input-dependent C
            self.D.float(),
            delta_bias=self.dt_proj.bias.float(),
            delta_softplus=True,
        )

    def _forward_scan(
        self,
        hidden_states: Tensor,
        state: Optional[MambaState],
        return_state: bool,
    ) -> Tuple[Tensor, Optional[MambaState]]:
        """Unfused path: projections + causal depthwise conv + selective scan."""
        seqlen = hidden_states.shape[1]
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (B, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)  # (B, d_inner, L) each
        conv_state0: Optional[Tensor] = None
        ssm_state0: Optional[Tensor] = None
        if state is not None:
            conv_state0, ssm_state0 = state

        # Causal depthwise conv: left context is zeros, or the cached last inputs.
        if conv_state0 is None:
            x_ctx = F.pad(x, (self.d_conv - 1, 0))  # (B, d_inner, d_conv - 1 + L)
        else:
            x_ctx = torch.cat([conv_state0[:, :, 1:].to(x.dtype), x], dim=-1)
        new_conv_state = x_ctx[:, :, -self.d_conv:] if return_state else None  # (B, d_inner, d_conv)
        if new_conv_state is not None and new_conv_state.shape[-1] < self.d_conv:
            new_conv_state = F.pad(new_conv_state, (self.d_conv - new_conv_state.shape[-1], 0))
        x = F.conv1d(x_ctx, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner)
        x = self.act(x)  # (B, d_inner, L)

        x_dbl = self.x_proj(x.transpose(1, 2))  # (B, L, dt_rank + 2*d_state)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight).transpose(1, 2)  # (B, d_inner, L), no bias
        B = B.transpose(1, 2)  # (B, d_state, L)
        C = C.transpose(1, 2)  # (B, d_state, L)
        pdt = _param_dtype(self.D)
        res = selective_scan(
            x,
            dt,
            self._A(),
            B,
            C,
            self.D.to(pdt),
            z=z,
            delta_bias=self.dt_proj.bias.to(_param_dtype(self.dt_proj.bias)),
            delta_softplus=True,
            return_last_state=return_state,
            initial_state=ssm_state0,
        )
        if return_state:
            y, last = res  # type: ignore[misc]
        else:
            y, last = res, None
        out = self.out_proj(y.transpose(1, 2))  # (B, L, d_model)
        assert out.shape[1] == seqlen
        if return_state:
            assert new_conv_state is not None and last is not None
            return out, (new_conv_state.contiguous(), last)
        return out, None

    # ------------------------------------------------------------- recurrent API

    def step(
        self, hidden_states: Tensor, conv_state: Tensor, ssm_state: Tensor
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """One decoding step; updates ``conv_state`` and ``ssm_state`` in place.

        hidden_states: (B, 1, d_model); conv_state: (B, d_inner, d_conv);
        ssm_state: (B, d_inner, d_state). Returns (out (B, 1, d_model), conv_state, ssm_state).
        """
        dtype = hidden_states.dtype
        if hidden_states.shape[1] != 1:
            raise ValueError("step decodes one position at a time: hidden_states must be (B, 1, d_model)")
        xz = self.in_proj(hidden_states.squeeze(1))  # (B, 2*d_inner)
        x, z = xz.chunk(2, dim=-1)  # (B, d_inner)

        conv_state.copy_(torch.roll(conv_state, shifts=-1, dims=-1))
        conv_state[:, :, -1] = x
        x = torch.sum(conv_state * self._conv_weight(), dim=-1)  # (B, d_inner)
        if self.conv1d.bias is not None:
            x = x + self.conv1d.bias
        x = self.act(x).to(dtype=dtype)

        x_db = self.x_proj(x)  # (B, dt_rank + 2*d_state)
        dt, B, C = torch.split(x_db, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, d_inner), bias added in the scan step
        y, new_state = selective_scan_step(
            ssm_state,
            x,
            dt,
            self._A(),
            B,
            C,
            self.D.to(_param_dtype(self.D)),
            z_t=z,
            delta_bias=self.dt_proj.bias.to(_param_dtype(self.dt_proj.bias)),
            delta_softplus=True,
        )
        ssm_state.copy_(new_state)
        out = self.out_proj(y.to(dtype))  # (B, d_model)
        return out.unsqueeze(1), conv_state, ssm_state

    def allocate_inference_cache(
        self,
        batch_size: int,
        max_seqlen: Optional[int] = None,
        dtype: Optional[torch.dtype] = None,
        **kwargs: Any,
    ) -> MambaState:
        """Zero (conv_state (B, d_inner, d_conv), ssm_state (B, d_inner, d_state))."""
        device = self.out_proj.weight.device
        conv_dtype = self.conv1d.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(
            batch_size, self.d_inner, self.d_conv, device=device, dtype=conv_dtype
        )
        ssm_dtype = self.dt_proj.weight.dtype if dtype is None else dtype
        ssm_state = torch.zeros(
            batch_size, self.d_inner, self.d_state, device=device, dtype=ssm_dtype
        )
        return conv_state, ssm_state

    def _get_states_from_cache(
        self, inference_params: Any, batch_size: int, initialize_states: bool = False
    ) -> MambaState:
        if self.layer_idx is None:
            raise ValueError("inference_params needs the block to have a layer_idx")
        cache = inference_params.key_value_memory_dict
        if self.layer_idx not in cache:
            cache[self.layer_idx] = self.allocate_inference_cache(batch_size)
        conv_state, ssm_state = cache[self.layer_idx]
        if initialize_states:
            conv_state.zero_()
            ssm_state.zero_()
        return conv_state, ssm_state
