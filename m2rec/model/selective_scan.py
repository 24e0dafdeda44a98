"""Selective scan (the S6 recurrence of Mamba) for CPU, with an exact fast path.

Semantics follow ``mamba_ssm.ops.selective_scan_interface.selective_scan_ref`` for real
``A`` and input-dependent ("variable") ``B``/``C``::

    dt   = softplus(delta + delta_bias)          if delta_softplus else delta + delta_bias
    h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t        (per batch b, channel d, state n)
    y_t  = sum_n C_t[n] * h_t[n] + D * u_t
    out  = y * silu(z)                            if z is given

Structure: delta_bias, softplus, the ``D`` skip and the ``silu(z)`` gate are cheap
elementwise ops done in PyTorch under autograd; the core recurrence
``(u, dt, A, B, C, h0) -> (y, last_state)`` is an ``autograd.Function`` with a hand-written
backward (adjoint recurrence run backwards in time), implemented twice:

* C kernel (CPU, backends ``auto``/``c``): ``kernels/selective_scan.c``, compiled on first
  use with the system C compiler (portable flags, AVX2+FMA variant picked at run time on
  x86-64) into a cache directory and loaded with :mod:`ctypes`. Parallel over
  (batch, d_inner) with pthreads; the backward recomputes the states of one
  (batch, channel) row into an ``L*d_state`` buffer, so nothing but the inputs is saved.
* torch (backend ``torch``): a loop over time on ``(batch, d_inner, d_state)`` tensors,
  states checkpointed every ~sqrt(L) steps and recomputed chunk by chunk in the backward.
  Used when no compiler is available (one warning is logged), for non-CPU tensors without
  ``mamba_ssm``, or when forced.

CUDA tensors with ``mamba_ssm`` importable go to ``mamba_ssm``'s ``selective_scan_fn``
(unless an initial state is given, which it does not support).

The environment variable ``M2REC_SCAN_BACKEND`` (``auto`` | ``c`` | ``torch``) forces a
backend; ``M2REC_KERNEL_CACHE`` sets the directory that holds compiled kernels (default
``$XDG_CACHE_HOME/m2rec/kernels`` or ``~/.cache/m2rec/kernels``);
``M2REC_SCAN_NO_AVX2=1`` makes the kernel use its portable SSE2 code path.

Numerics: decays are ``exp(dt * A)`` computed one step at a time (in ``(0, 1]`` for
``A < 0``); no exponential of a cumulative sum is ever formed, so large time steps cannot
overflow. The C kernel uses its own vectorizable exp (Cody-Waite reduction + Cephes
approximations, ~1 ulp; results below the smallest normal number flush towards 0).
Half/bfloat16 inputs are computed in float32, float64 inputs in float64.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Optional, Tuple, Union, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "selective_scan",
    "selective_scan_reference",
    "selective_scan_torch",
    "selective_scan_step",
    "selective_scan_last",
    "causal_conv_silu",
    "time_steps",
    "kernel_available",
    "load_kernel",
    "resolve_backend",
    "BACKEND_ENV",
    "CACHE_ENV",
]

logger = logging.getLogger(__name__)

BACKEND_ENV = "M2REC_SCAN_BACKEND"
CACHE_ENV = "M2REC_KERNEL_CACHE"
_BACKENDS = ("auto", "c", "torch")

KERNEL_SOURCE = Path(__file__).resolve().parent / "kernels" / "selective_scan.c"
# Portable flags only (no -march=native): a cached binary may be shared between machines.
CFLAGS: Tuple[str, ...] = (
    "-O3", "-fopenmp-simd", "-fno-trapping-math", "-shared", "-fPIC", "-pthread"
)
_ABI_VERSION = 5

ScanResult = Union[Tensor, Tuple[Tensor, Tensor]]


# --------------------------------------------------------------------------- helpers


def _compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any floating input is float64, else float32 (half/bf16 are upcast)."""
    for t in tensors:
        if t is not None and t.dtype == torch.float64:
            return torch.float64
    return torch.float32


def _cast(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _check_shapes(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    initial_state: Optional[Tensor],
) -> Tuple[int, int, int, int]:
    """Validate shapes; return (batch, d_inner, d_state, L)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (batch, d_inner, L), got {tuple(u.shape)}")
    batch, dim, L = u.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must be (d_inner={dim}, d_state), got {tuple(A.shape)}")
    if A.is_complex():
        raise NotImplementedError("complex A is not supported")
    N = A.shape[1]
    if tuple(delta.shape) != (batch, dim, L):
        raise ValueError(f"delta must be {(batch, dim, L)}, got {tuple(delta.shape)}")
    for name, t in (("B", B), ("C", C)):
        if tuple(t.shape) != (batch, N, L):
            raise ValueError(
                f"{name} must be input-dependent (batch, d_state, L) = {(batch, N, L)}, "
                f"got {tuple(t.shape)}"
            )
    for name, vec in (("D", D), ("delta_bias", delta_bias)):
        if vec is not None and tuple(vec.shape) != (dim,):
            raise ValueError(f"{name} must be ({dim},), got {tuple(vec.shape)}")
    if z is not None and tuple(z.shape) != (batch, dim, L):
        raise ValueError(f"z must be {(batch, dim, L)}, got {tuple(z.shape)}")
    if initial_state is not None and tuple(initial_state.shape) != (batch, dim, N):
        raise ValueError(
            f"initial_state must be {(batch, dim, N)}, got {tuple(initial_state.shape)}"
        )
    return batch, dim, N, L


def _finish(
    y: Tensor,
    u: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
) -> Tensor:
    """y + D*u, then gate with silu(z); all (batch, d_inner, L)."""
    if D is not None:
        y = y + u * D.unsqueeze(-1)
    if z is not None:
        y = y * F.silu(z)
    return y


# ------------------------------------------------------------------------- reference


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> ScanResult:
    """Slow, obviously correct selective scan: a Python loop over time (autograd for grads).

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state); B, C: (batch, d_state, L);
    D, delta_bias: (d_inner,); initial_state: (batch, d_inner, d_state).
    Returns out (batch, d_inner, L) in u's dtype, and the last state
    (batch, d_inner, d_state) in the compute dtype if ``return_last_state``.
    """
    batch, dim, N, L = _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    D, z = _cast(D, cdt), _cast(z, cdt)
    if delta_bias is not None:
        delta = delta + delta_bias.to(cdt).unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)
    if initial_state is not None:
        h = initial_state.to(cdt)  # (batch, d_inner, d_state)
    else:
        h = u.new_zeros(batch, dim, N)
    ys = []
    for t in range(L):
        dt = delta[:, :, t]  # (batch, d_inner)
        decay = torch.exp(dt.unsqueeze(-1) * A)  # (batch, d_inner, d_state), in (0, 1] if A<0
        drive = (dt * u[:, :, t]).unsqueeze(-1) * B[:, :, t].unsqueeze(1)  # (batch, d_inner, d_state)
        h = decay * h + drive
        ys.append((h * C[:, :, t].unsqueeze(1)).sum(-1))  # (batch, d_inner)
    y = torch.stack(ys, dim=-1) if L > 0 else u.new_zeros(batch, dim, 0)
    out = _finish(y, u, D, z).to(dtype_in)
    return (out, h) if return_last_state else out


# ------------------------------------------------------------------- torch fallback


class _TorchScanCore(torch.autograd.Function):
    """y_t = C_t . h_t with h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t; dt already final.

    Forward keeps only states at chunk boundaries (every ~sqrt(L) steps); backward
    recomputes one chunk of states at a time and runs the adjoint recurrence.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: Tensor,  # (batch, d_inner, L)
        dt: Tensor,  # (batch, d_inner, L)
        A: Tensor,  # (d_inner, d_state)
        B: Tensor,  # (batch, d_state, L)
        C: Tensor,  # (batch, d_state, L)
        h0: Optional[Tensor],  # (batch, d_inner, d_state)
    ) -> Tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        batch, dim, L = u.shape
        N = A.shape[1]
        K = max(1, math.isqrt(max(L - 1, 0)) + 1)  # chunk length ~ sqrt(L)
        dtT = dt.permute(2, 0, 1).contiguous()  # (L, batch, d_inner)
        dtuT = (dt * u).permute(2, 0, 1).contiguous()  # (L, batch, d_inner)
        BT = B.permute(2, 0, 1).contiguous()  # (L, batch, d_state)
        CT = C.permute(2, 0, 1).contiguous()  # (L, batch, d_state)
        h = h0.clone() if h0 is not None else u.new_zeros(batch, dim, N)
        ckpts = []  # state before step c*K, each (batch, d_inner, d_state)
        yT = u.new_empty(L, batch, dim)  # (L, batch, d_inner)
        for t in range(L):
            if t % K == 0:
                ckpts.append(h.clone())
            h.mul_(torch.exp(dtT[t].unsqueeze(-1) * A))
            h.addcmul_(dtuT[t].unsqueeze(-1), BT[t].unsqueeze(1))
            torch.bmm(h, CT[t].unsqueeze(-1), out=yT[t].unsqueeze(-1))
        ctx.K = K
        ctx.has_h0 = h0 is not None
        saved_ckpts = torch.stack(ckpts) if ckpts else u.new_zeros(0, batch, dim, N)
        ctx.save_for_backward(u, dt, A, B, C, saved_ckpts)
        return yT.permute(1, 2, 0).contiguous(), h

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, gy: Optional[Tensor], glast: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], ...]:
        u, dt, A, B, C, ckpts = ctx.saved_tensors
        K = ctx.K
        batch, dim, L = u.shape
        N = A.shape[1]
        if gy is None and glast is None:
            return None, None, None, None, None, None
        uT = u.permute(2, 0, 1).contiguous()  # (L, batch, d_inner)
        dtT = dt.permute(2, 0, 1).contiguous()
        dtuT = dtT * uT
        BT = B.permute(2, 0, 1).contiguous()  # (L, batch, d_state)
        CT = C.permute(2, 0, 1).contiguous()
        gyT = gy.permute(2, 0, 1).contiguous() if gy is not None else None  # (L, batch, d_inner)
        gh = glast.clone() if glast is not None else u.new_zeros(batch, dim, N)
        guT = u.new_empty(L, batch, dim)
        gdtT = u.new_empty(L, batch, dim)
        gBT = u.new_empty(L, batch, N)
        gCT = u.new_empty(L, batch, N)
        gA_acc = u.new_zeros(batch, dim, N)
        for c in range(ckpts.shape[0] - 1, -1, -1):
            t0, t1 = c * K, min(L, (c + 1) * K)
            hs = [ckpts[c]]  # hs[i] = state before step t0 + i
            decays = []
            for t in range(t0, t1):
                decay = torch.exp(dtT[t].unsqueeze(-1) * A)  # (batch, d_inner, d_state)
                decays.append(decay)
                hs.append(torch.addcmul(decay * hs[-1], dtuT[t].unsqueeze(-1), BT[t].unsqueeze(1)))
            for t in range(t1 - 1, t0 - 1, -1):
                i = t - t0
                decay, h_t, h_prev = decays[i], hs[i + 1], hs[i]
                if gyT is not None:
                    gh.addcmul_(gyT[t].unsqueeze(-1), CT[t].unsqueeze(1))  # dL/dh_t
                    torch.bmm(gyT[t].unsqueeze(1), h_t, out=gCT[t].unsqueeze(1))
                else:
                    gCT[t].zero_()
                g_x = gh * h_prev * decay  # dL/d(dt*A), (batch, d_inner, d_state)
                gA_acc.addcmul_(g_x, dtT[t].unsqueeze(-1))
                ghB = torch.bmm(gh, BT[t].unsqueeze(-1)).squeeze(-1)  # (batch, d_inner)
                torch.bmm(dtuT[t].unsqueeze(1), gh, out=gBT[t].unsqueeze(1))
                gdtT[t] = (g_x * A).sum(-1) + ghB * uT[t]
                guT[t] = ghB * dtT[t]
                gh.mul_(decay)  # carry to h_{t-1}
        gu = guT.permute(1, 2, 0)
        gdt = gdtT.permute(1, 2, 0)
        gB = gBT.permute(1, 2, 0)
        gC = gCT.permute(1, 2, 0)
        gA = gA_acc.sum(0)
        gh0 = gh if ctx.has_h0 else None
        return gu, gdt, gA, gB, gC, gh0


def _scan_with_core(
    core: Any,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    z: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    return_last_state: bool,
    initial_state: Optional[Tensor],
) -> ScanResult:
    """Elementwise parts under autograd around a core recurrence (torch or C)."""
    dtype_in = u.dtype
    cdt = _compute_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    u, delta, A, B, C = (t.to(cdt) for t in (u, delta, A, B, C))
    D, z, delta_bias, h0 = (_cast(t, cdt) for t in (D, z, delta_bias, initial_state))
    if delta_bias is not None:
        delta = delta + delta_bias.unsqueeze(-1)
    if delta_softplus:
        delta = F.softplus(delta)  # (batch, d_inner, L), torch's threshold=20 convention
    y, last = core.apply(u, delta, A, B, C, h0)
    out = _finish(y, u, D, z).to(dtype_in)
    return (out, last) if return_last_state else out


def selective_scan_torch(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
) -> ScanResult:
    """Pure-PyTorch selective scan (any device); same contract as :func:`selective_scan`."""
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    return _scan_with_core(_TorchScanCore, u, delta, A, B, C, D, z, delta_bias,
                           delta_softplus, return_last_state, initial_state)


# ------------------------------------------------------------------------- C kernel

_kernel_lock = threading.Lock()
_kernel_lib: Optional[ctypes.CDLL] = None
_kernel_error: Optional[str] = None
_fallback_warned = False


def _cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "m2rec" / "kernels"


def _find_compiler() -> Optional[list]:
    """The C compiler command as an argv prefix ($CC, cc, gcc or clang), or None."""
    candidates = []
    if os.environ.get("CC"):
        candidates.append(shlex.split(os.environ["CC"]))
    candidates += [["cc"], ["gcc"], ["clang"]]
    for argv in candidates:
        if argv and shutil.which(argv[0]):
            return [shutil.which(argv[0]) or argv[0], *argv[1:]]
    return None


def _compiler_id(cc: list) -> str:
    try:
        res = subprocess.run(
            [*cc, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
        return (res.stdout or res.stderr).splitlines()[0] if (res.stdout or res.stderr) else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _build_library(cc: list, source: bytes, target: Path) -> None:
    """Compile ``source`` into ``target`` atomically (temp name, then os.replace)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = tempfile.mkdtemp(prefix=".build-", dir=target.parent)
    try:
        src = Path(tmpdir) / "selective_scan.c"
        src.write_bytes(source)
        tmp_out = Path(tmpdir) / target.name
        cmd = [*cc, *CFLAGS, "-o", str(tmp_out), str(src), "-lm"]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        if res.returncode != 0 or not tmp_out.exists():
            raise RuntimeError(
                f"compiling the selective-scan kernel failed ({shlex.join(cmd)}):\n"
                f"{res.stderr.strip()[-2000:]}"
            )
        os.replace(tmp_out, target)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)


def _declare(lib: ctypes.CDLL) -> None:
    vp, i64, ci = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    common = [vp] * 6 + [i64] * 4  # u, dt, A, Bt, Ct, h0, batch, dim, dstate, L
    for suf in ("f32", "f64"):
        fwd = getattr(lib, f"m2rec_ss_fwd_{suf}")
        fwd.argtypes = common + [vp, vp, ci]  # y, last, nthreads
        fwd.restype = ci
        bwd = getattr(lib, f"m2rec_ss_bwd_{suf}")
        # gy, glast, groups, gu, gdt, gA_part, gBt_part, gCt_part, gh0, nthreads
        bwd.argtypes = common + [vp, vp, i64] + [vp] * 6 + [ci]
        bwd.restype = ci
        last = getattr(lib, f"m2rec_ss_last_{suf}")
        # u, dt, A, Bt, Ct, bc_stride, pos, batch, dim, dstate, L, y, nthreads
        last.argtypes = [vp] * 5 + [i64, vp] + [i64] * 4 + [vp, ci]
        last.restype = ci
        conv = getattr(lib, f"m2rec_conv_silu_{suf}")
        conv.argtypes = [vp] * 3 + [i64] * 4 + [vp, ci]  # x, w, bias, batch, L, dim, width, out, nthreads
        conv.restype = None
        steps = getattr(lib, f"m2rec_dt_softplus_{suf}")
        # x, x_stride, w, bias, rows, rank, dim, out, nthreads
        steps.argtypes = [vp, i64, vp, vp] + [i64] * 3 + [vp, ci]
        steps.restype = None
    for name in ("m2rec_ss_abi_version", "m2rec_ss_uses_avx2"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = ci


def load_kernel() -> ctypes.CDLL:
    """Compile (once, cached on disk) and load the C kernel; raise RuntimeError on failure."""
    global _kernel_lib, _kernel_error
    if _kernel_lib is not None:
        return _kernel_lib
    with _kernel_lock:
        if _kernel_lib is not None:
            return _kernel_lib
        if _kernel_error is not None:
            raise RuntimeError(_kernel_error)
        try:
            source = KERNEL_SOURCE.read_bytes()
            cc = _find_compiler()
            if cc is None:
                raise RuntimeError("no C compiler found (set CC, or install cc/gcc/clang)")
            key = hashlib.sha256()
            for part in (source, *cc, _compiler_id(cc), *CFLAGS, platform.machine(),
                         platform.system()):
                key.update(part if isinstance(part, bytes) else part.encode())
                key.update(b"\0")
            name = f"selective_scan_{key.hexdigest()[:20]}.so"
            target = _cache_dir() / name
            if not target.exists():
                try:
                    _build_library(cc, source, target)
                except OSError:  # cache dir not writable: a per-user temp dir instead
                    user = getattr(os, "getuid", lambda: "user")()
                    target = Path(tempfile.gettempdir()) / f"m2rec-kernels-{user}" / name
                    if not target.exists():
                        _build_library(cc, source, target)
            lib = ctypes.CDLL(str(target))
            _declare(lib)
            if lib.m2rec_ss_abi_version() != _ABI_VERSION:
                raise RuntimeError(f"kernel ABI mismatch in {target}")
            _kernel_lib = lib
            _self_test()
        except Exception as exc:  # noqa: BLE001 - any failure means "kernel unavailable"
            _kernel_lib = None
            _kernel_error = f"selective-scan C kernel unavailable: {exc}"
            raise RuntimeError(_kernel_error) from exc
        return _kernel_lib


def _self_test() -> None:
    """Tiny float64 and float32 checks of the compiled kernel against the reference."""
    g = torch.Generator().manual_seed(0)
    b, d, n, L = 2, 3, 5, 7
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        u = torch.randn(b, d, L, dtype=dtype, generator=g)
        dt = torch.rand(b, d, L, dtype=dtype, generator=g) * 2
        A = -torch.rand(d, n, dtype=dtype, generator=g) * 3
        B = torch.randn(b, n, L, dtype=dtype, generator=g)
        C = torch.randn(b, n, L, dtype=dtype, generator=g)
        h0 = torch.randn(b, d, n, dtype=dtype, generator=g)
        with torch.no_grad():
            got, last = _CScanCore.apply(u, dt, A, B, C, h0)
            want, want_last = selective_scan_reference(
                u, dt, A, B, C, return_last_state=True, initial_state=h0
            )
        err = max((got - want).abs().max().item(), (last - want_last).abs().max().item())
        if not err <= tol * max(1.0, want.abs().max().item()):
            raise RuntimeError(f"compiled kernel failed its self-test ({dtype}: error {err:.2e})")


def kernel_available() -> bool:
    """True if the C kernel compiles and loads on this machine."""
    try:
        load_kernel()
        return True
    except RuntimeError:
        return False


def _ptr(t: Optional[Tensor]) -> Optional[int]:
    return None if t is None else t.data_ptr()


def _contig(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


class _CScanCore(torch.autograd.Function):
    """Core recurrence on CPU via the C kernel; same contract as :class:`_TorchScanCore`.

    Inputs are float32 or float64 (all the same dtype). The backward recomputes the
    forward states per (batch, channel) inside the kernel; nothing but the inputs is saved.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: Tensor,  # (batch, d_inner, L)
        dt: Tensor,  # (batch, d_inner, L)
        A: Tensor,  # (d_inner, d_state)
        B: Tensor,  # (batch, d_state, L)
        C: Tensor,  # (batch, d_state, L)
        h0: Optional[Tensor],  # (batch, d_inner, d_state)
    ) -> Tuple[Tensor, Tensor]:
        ctx.set_materialize_grads(False)
        lib = load_kernel()
        batch, dim, L = u.shape
        N = A.shape[1]
        u, dt, A = u.contiguous(), dt.contiguous(), A.contiguous()
        Bt = B.transpose(1, 2).contiguous()  # (batch, L, d_state)
        Ct = C.transpose(1, 2).contiguous()  # (batch, L, d_state)
        h0 = _contig(h0)
        y = torch.empty_like(u)  # (batch, d_inner, L)
        last = u.new_empty(batch, dim, N)  # (batch, d_inner, d_state)
        fn = lib.m2rec_ss_fwd_f64 if u.dtype == torch.float64 else lib.m2rec_ss_fwd_f32
        rc = fn(_ptr(u), _ptr(dt), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(h0), batch, dim, N, L,
                _ptr(y), _ptr(last), torch.get_num_threads())
        if rc != 0:
            raise MemoryError("selective-scan kernel could not allocate its work buffers")
        ctx.save_for_backward(u, dt, A, Bt, Ct, h0)
        return y, last

    @staticmethod
    @once_differentiable
    def backward(  # type: ignore[override]
        ctx: Any, gy: Optional[Tensor], glast: Optional[Tensor]
    ) -> Tuple[Optional[Tensor], ...]:
        if gy is None and glast is None:
            return None, None, None, None, None, None
        lib = load_kernel()
        u, dt, A, Bt, Ct, h0 = ctx.saved_tensors
        batch, dim, L = u.shape
        N = A.shape[1]
        nthreads = torch.get_num_threads()
        # Channel groups per batch element so that small batches still use every thread;
        # each (batch, group) task accumulates its own partial gB/gC.
        groups = 1 if batch >= nthreads else min(dim, -(-nthreads // batch))
        gy, glast = _contig(gy), _contig(glast)
        gu = torch.empty_like(u)
        gdt = torch.empty_like(u)
        gA_part = u.new_empty(batch, dim, N)
        gBt_part = u.new_zeros(batch, groups, L, N)
        gCt_part = u.new_zeros(batch, groups, L, N)
        gh0 = torch.empty_like(h0) if h0 is not None else None
        fn = lib.m2rec_ss_bwd_f64 if u.dtype == torch.float64 else lib.m2rec_ss_bwd_f32
        rc = fn(_ptr(u), _ptr(dt), _ptr(A), _ptr(Bt), _ptr(Ct), _ptr(h0), batch, dim, N, L,
                _ptr(gy), _ptr(glast), groups, _ptr(gu), _ptr(gdt), _ptr(gA_part),
                _ptr(gBt_part), _ptr(gCt_part), _ptr(gh0), nthreads)
        if rc != 0:
            raise MemoryError("selective-scan kernel could not allocate its work buffers")
        gB = gBt_part.sum(1).transpose(1, 2)  # (batch, d_state, L)
        gC = gCt_part.sum(1).transpose(1, 2)
        return gu, gdt, gA_part.sum(0), gB, gC, gh0


# ------------------------------------------------------------------------ dispatch


@functools.lru_cache(maxsize=1)
def _mamba_ssm_scan_fn() -> Optional[Callable[..., Any]]:
    """mamba_ssm's CUDA selective_scan_fn, or None if mamba_ssm cannot be imported."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # noqa: BLE001 - ImportError, or a CUDA/ABI error while loading
        return None
    return selective_scan_fn


def resolve_backend(device: Union[str, torch.device] = "cpu",
                    backend: Optional[str] = None,
                    needs_initial_state: bool = False) -> str:
    """Which implementation a call on ``device`` would use: 'mamba_ssm', 'c' or 'torch'.

    ``backend`` overrides ``$M2REC_SCAN_BACKEND`` ('auto' | 'c' | 'torch').
    Raises RuntimeError if 'c' is forced and the kernel cannot be built, or ValueError if
    it is forced for non-CPU tensors.
    """
    global _fallback_warned
    choice = (backend or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {_BACKENDS}, got {choice!r}")
    dev = torch.device(device)
    if dev.type != "cpu":
        if choice == "c":
            raise ValueError("the C selective-scan kernel runs on CPU tensors only")
        if (choice == "auto" and dev.type == "cuda" and not needs_initial_state
                and _mamba_ssm_scan_fn() is not None):
            return "mamba_ssm"
        return "torch"
    if choice == "torch":
        return "torch"
    if choice == "c":
        load_kernel()  # raises with the compiler's message
        return "c"
    if kernel_available():
        return "c"
    if not _fallback_warned:
        _fallback_warned = True
        logger.warning("%s; using the slower pure-PyTorch selective scan", _kernel_error)
    return "torch"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor] = None,
    z: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    initial_state: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> ScanResult:
    """Selective scan with mamba_ssm's ``selective_scan_fn`` contract (differentiable).

    u, delta, z: (batch, d_inner, L); A: (d_inner, d_state), real;
    B, C: (batch, d_state, L); D, delta_bias: (d_inner,);
    initial_state: (batch, d_inner, d_state) state before the first step (default zeros).
    Returns out (batch, d_inner, L) in u's dtype; with ``return_last_state`` also the final
    state (batch, d_inner, d_state) (float32, or float64 for float64 inputs), which is
    differentiable on the C and torch backends.
    ``backend`` ('auto' | 'c' | 'torch') overrides ``$M2REC_SCAN_BACKEND``.
    """
    _check_shapes(u, delta, A, B, C, D, z, delta_bias, initial_state)
    which = resolve_backend(u.device, backend, needs_initial_state=initial_state is not None)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if which == "c":
        return _scan_with_core(_CScanCore, *args, initial_state)
    if which == "mamba_ssm":
        fn = _mamba_ssm_scan_fn()
        assert fn is not None
        return fn(*args)
    return selective_scan_torch(*args, initial_state=initial_state)


def causal_conv_silu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """SiLU of Mamba's causal depthwise conv1d on channel-last input, for inference: x (batch, L, d_inner),
    weight (d_inner, width), bias (d_inner,) or None -> (batch, L, d_inner); what ``F.conv1d`` on the transposed,
    left-padded input computes. One fused pass in the C kernel; torch's shifted multiply-adds when gradients are
    needed or the kernel is unavailable."""
    width = weight.shape[1]
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    if resolve_backend(x.device) != "c" or needs_grad or x.dtype not in (torch.float32, torch.float64):
        out = x * weight[:, -1] if bias is None else torch.addcmul(bias, x, weight[:, -1])
        for shift in range(1, min(width, x.shape[1])):  # tap width-1-shift multiplies the input shift steps back
            out[:, shift:].addcmul_(x[:, :-shift], weight[:, -1 - shift])
        return F.silu(out)
    batch, L, dim = x.shape
    x, taps = x.contiguous(), weight.to(x.dtype).t().contiguous()  # (width, d_inner)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    out = torch.empty_like(x)
    lib = load_kernel()
    fn = lib.m2rec_conv_silu_f64 if x.dtype == torch.float64 else lib.m2rec_conv_silu_f32
    fn(_ptr(x), _ptr(taps), _ptr(bias), batch, L, dim, width, _ptr(out), torch.get_num_threads())
    return out


def time_steps(dt_low_rank: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Mamba's final time steps for inference, softplus(dt_proj(dt_low_rank)): dt_low_rank (batch, L, dt_rank) (a
    column slice of x_proj's output is read in place), weight (d_inner, dt_rank), bias (d_inner,) or None ->
    (batch, L, d_inner). One fused pass in the C kernel; torch when gradients are needed or the kernel is
    unavailable."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                 for t in (dt_low_rank, weight, bias))
    batch, L, rank = dt_low_rank.shape
    in_place = dt_low_rank.stride(2) == 1 and dt_low_rank.stride(0) == L * dt_low_rank.stride(1)
    if (resolve_backend(dt_low_rank.device) != "c" or needs_grad or not in_place
            or dt_low_rank.dtype not in (torch.float32, torch.float64)):
        return F.softplus(F.linear(dt_low_rank, weight, bias))
    dim, dtype = weight.shape[0], dt_low_rank.dtype
    taps = weight.to(dtype).t().contiguous()  # (dt_rank, d_inner)
    bias = None if bias is None else bias.to(dtype).contiguous()
    out = dt_low_rank.new_empty(batch, L, dim)
    lib = load_kernel()
    fn = lib.m2rec_dt_softplus_f64 if dtype == torch.float64 else lib.m2rec_dt_softplus_f32
    fn(_ptr(dt_low_rank), dt_low_rank.stride(1), _ptr(taps), _ptr(bias), batch * L, rank, dim, _ptr(out),
       torch.get_num_threads())
    return out


def _bc_rows(B: Tensor, C: Tensor) -> Tuple[Tensor, Tensor, int]:
    """B and C (batch, L, d_state) as the kernel reads them: rows of d_state values at a common row stride
    (column slices of one (batch, L, S) tensor qualify as they are); copied only when they do not."""
    batch, L, _ = B.shape
    stride = B.stride(1)
    if not (B.stride(2) == C.stride(2) == 1 and C.stride(1) == stride and B.stride(0) == C.stride(0) == L * stride):
        B, C, stride = B.contiguous(), C.contiguous(), B.shape[2]
    return B, C, stride


def selective_scan_last(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    positions: Tensor,
    backend: Optional[str] = None,
) -> Tensor:
    """The scan's output at one position per row, for inference: ``selective_scan(u, delta, A, B, C)`` (no D, z,
    bias or softplus: ``delta`` is final) at ``positions[b]`` of row b, in channel-last layout.

    u, delta: (batch, L, d_inner); A: (d_inner, d_state); B, C: (batch, L, d_state) (column slices of one
    tensor are read in place); positions: (batch,) in [0, L). Returns (batch, d_inner) in the compute dtype.
    On the C backend the scan stops at each row's position and forms no other output; when gradients are needed
    or another backend is chosen it runs :func:`selective_scan` and gathers.
    """
    batch, L, dim = u.shape
    which = resolve_backend(u.device, backend)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (u, delta, A, B, C))
    if which != "c" or needs_grad:
        y = cast(Tensor, selective_scan(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                        C.transpose(1, 2), backend=backend))  # (batch, d_inner, L)
        index = positions.view(-1, 1, 1).expand(-1, dim, 1)
        return y.gather(2, index).squeeze(2).to(_compute_dtype(u, delta, A, B, C))
    if positions.numel() and not 0 <= int(positions.min()) <= int(positions.max()) < L:
        raise ValueError(f"positions must be in [0, {L}), got {positions.min()}..{positions.max()}")
    cdt = _compute_dtype(u, delta, A, B, C)
    u, delta, A = (t.to(cdt).contiguous() for t in (u, delta, A))  # (batch, L, d_inner), (d_inner, d_state)
    B, C, stride = _bc_rows(B.to(cdt), C.to(cdt))
    positions = positions.to(torch.int64).contiguous()
    y = u.new_empty(batch, dim)
    lib = load_kernel()
    fn = lib.m2rec_ss_last_f64 if cdt == torch.float64 else lib.m2rec_ss_last_f32
    if fn(_ptr(u), _ptr(delta), _ptr(A), _ptr(B), _ptr(C), stride, _ptr(positions), batch, dim, A.shape[1], L,
          _ptr(y), torch.get_num_threads()) != 0:
        raise MemoryError("selective-scan kernel could not allocate its work buffers")
    return y


# -------------------------------------------------------------------- decoding step


def selective_scan_step(
    state: Tensor,
    u_t: Tensor,
    delta_t: Tensor,
    A: Tensor,
    B_t: Tensor,
    C_t: Tensor,
    D: Optional[Tensor] = None,
    z_t: Optional[Tensor] = None,
    delta_bias: Optional[Tensor] = None,
    delta_softplus: bool = False,
) -> Tuple[Tensor, Tensor]:
    """One recurrent step (O(1) in sequence length), for decoding.

    state: (batch, d_inner, d_state); u_t, delta_t, z_t: (batch, d_inner);
    A: (d_inner, d_state); B_t, C_t: (batch, d_state); D, delta_bias: (d_inner,).
    Returns (y_t (batch, d_inner) in u_t's dtype, new_state in the compute dtype).
    The input ``state`` is not modified.
    """
    cdt = _compute_dtype(state, u_t, delta_t, A, B_t, C_t, D, z_t, delta_bias)
    u = u_t.to(cdt)
    dt = delta_t.to(cdt)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cdt)
    if delta_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt.unsqueeze(-1) * A.to(cdt))  # (batch, d_inner, d_state)
    drive = (dt * u).unsqueeze(-1) * B_t.to(cdt).unsqueeze(1)  # (batch, d_inner, d_state)
    new_state = decay * state.to(cdt) + drive
    y = (new_state * C_t.to(cdt).unsqueeze(1)).sum(-1)  # (batch, d_inner)
    if D is not None:
        y = y + u * D.to(cdt)
    if z_t is not None:
        y = y * F.silu(z_t.to(cdt))
    return y.to(u_t.dtype), new_state
