"""Selective scan: C kernel and torch fallback against the sequential reference."""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch

from m2rec.model import selective_scan as ss

HAS_KERNEL = ss.kernel_available()
needs_kernel = pytest.mark.skipif(not HAS_KERNEL, reason=f"C kernel unavailable: {ss._kernel_error}")
HAS_MAMBA_CUDA = torch.cuda.is_available() and importlib.util.find_spec("mamba_ssm") is not None

NAMES = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state"]


def make_inputs(
    dtype: torch.dtype,
    b: int = 2,
    d: int = 8,
    n: int = 6,
    L: int = 33,
    *,
    seed: int = 0,
    softplus: bool = True,
    use_D: bool = True,
    use_z: bool = True,
    use_bias: bool = True,
    use_h0: bool = False,
    dt_max: float = 10.0,
) -> Dict[str, Optional[torch.Tensor]]:
    """Random inputs with realistic time steps, including large ones (dt up to ~dt_max)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    if softplus:  # raw values whose softplus spans ~[0.02, dt_max]
        delta = torch.rand(b, d, L, generator=g, dtype=dtype) * (dt_max + 4.0) - 4.0
    else:  # positive time steps, a mix of tiny and large
        delta = torch.rand(b, d, L, generator=g, dtype=dtype) ** 3 * dt_max
    A_log = torch.log(torch.arange(1, n + 1, dtype=dtype)).repeat(d, 1)
    A_log = A_log + 0.1 * rnd(d, n)
    return {
        "u": rnd(b, d, L),
        "delta": delta,
        "A": -torch.exp(A_log),
        "B": rnd(b, n, L),
        "C": rnd(b, n, L),
        "D": rnd(d) if use_D else None,
        "z": rnd(b, d, L) if use_z else None,
        "delta_bias": 0.5 * rnd(d) if use_bias else None,
        "initial_state": rnd(b, d, n) if use_h0 else None,
    }


def run_with_grads(fn, inputs, softplus: bool, seed: int = 1) -> List[Optional[torch.Tensor]]:
    """[out, last_state, grad of each input in NAMES order (None where input is None)]."""
    leaves = {k: (v.clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
    out, last = fn(
        leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
        D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
        delta_softplus=softplus, return_last_state=True,
        initial_state=leaves["initial_state"],
    )
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    w_last = torch.randn(last.shape, generator=g, dtype=last.dtype)
    loss = (out * w_out).sum() + (last * w_last).sum()
    present = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in present], allow_unused=True)
    by_name = {k: (gr if gr is not None else torch.zeros_like(leaves[k]))
               for k, gr in zip(present, grads)}
    return [out.detach(), last.detach()] + [by_name.get(k) for k in NAMES]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (normwise relative error)."""
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_close_all(got, want, tol: float, label: str = "") -> None:
    names = ["out", "last_state"] + [f"grad_{k}" for k in NAMES]
    for name, a, b in zip(names, got, want):
        assert (a is None) == (b is None), name
        if a is None:
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.isfinite(a).all(), f"{label} {name} not finite"
        err = rel_err(a.double(), b.double())
        assert err < tol, f"{label} {name}: relative error {err:.3e} >= {tol:.0e}"


def c_scan(*args, **kwargs):
    return ss.selective_scan(*args, backend="c", **kwargs)


def torch_scan(*args, **kwargs):
    return ss.selective_scan(*args, backend="torch", **kwargs)


CONFIGS = [
    # softplus, D, z, bias, initial state
    dict(softplus=True, use_D=True, use_z=True, use_bias=True, use_h0=False),
    dict(softplus=False, use_D=False, use_z=False, use_bias=False, use_h0=False),
    dict(softplus=True, use_D=False, use_z=True, use_bias=False, use_h0=True),
    dict(softplus=False, use_D=True, use_z=False, use_bias=True, use_h0=True),
]
TOLS = {torch.float64: 1e-10, torch.float32: 1e-5}


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(k for k, v in c.items() if v) or "bare")
def test_c_kernel_matches_reference(dtype, cfg):
    inputs = make_inputs(dtype, **cfg)
    got = run_with_grads(c_scan, inputs, cfg["softplus"])
    want = run_with_grads(ss.selective_scan_reference, inputs, cfg["softplus"])
    assert_close_all(got, want, TOLS[dtype], f"c/{dtype}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cfg", CONFIGS[:3], ids=lambda c: "-".join(k for k, v in c.items() if v) or "bare")
def test_torch_fallback_matches_reference(dtype, cfg):
    inputs = make_inputs(dtype, L=40, **cfg)  # L=40: several checkpoint chunks
    got = run_with_grads(torch_scan, inputs, cfg["softplus"])
    want = run_with_grads(ss.selective_scan_reference, inputs, cfg["softplus"])
    assert_close_all(got, want, TOLS[dtype], f"torch/{dtype}")


@needs_kernel
def test_c_kernel_matches_torch_fallback_bigger_float32():
    cfg = dict(softplus=True, use_D=True, use_z=True, use_bias=True, use_h0=True)
    inputs = make_inputs(torch.float32, b=4, d=48, n=16, L=150, seed=3, **cfg)
    got = run_with_grads(c_scan, inputs, True)
    want = run_with_grads(torch_scan, inputs, True)
    assert_close_all(got, want, 1e-5, "c-vs-torch")


@needs_kernel
@pytest.mark.parametrize("L", [0, 1, 5])
def test_c_kernel_short_sequences_and_small_batch(L):
    # batch=1 with 2 threads exercises the channel-group split of the backward.
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = dict(softplus=True, use_D=True, use_z=True, use_bias=True, use_h0=True)
        inputs = make_inputs(torch.float64, b=1, d=5, n=3, L=L, **cfg)
        got = run_with_grads(c_scan, inputs, True)
        want = run_with_grads(ss.selective_scan_reference, inputs, True)
        assert_close_all(got, want, 1e-10, f"L={L}")
    finally:
        torch.set_num_threads(prev)


@needs_kernel
def test_gradient_through_last_state_only():
    inputs = make_inputs(torch.float64, use_h0=True)
    res = {}
    for name, fn in (("c", c_scan), ("torch", torch_scan), ("ref", ss.selective_scan_reference)):
        leaves = {k: v.clone().requires_grad_() for k, v in inputs.items() if v is not None}
        _, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                     D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                     delta_softplus=True, return_last_state=True,
                     initial_state=leaves["initial_state"])
        keys = ["u", "delta", "A", "B", "initial_state"]
        res[name] = torch.autograd.grad(last.square().sum(), [leaves[k] for k in keys])
    for name in ("c", "torch"):
        for a, b in zip(res[name], res["ref"]):
            assert rel_err(a, b) < 1e-10


@needs_kernel
def test_large_time_steps_long_sequence_stay_finite():
    L = 2000
    inputs = make_inputs(torch.float32, b=2, d=8, n=16, L=L, softplus=True, use_h0=True)
    inputs["delta"] = torch.full_like(inputs["delta"], 50.0)  # softplus(50 + bias) ~ 50
    inputs["delta"][:, :, ::7] = -30.0  # and some near-zero steps
    got = run_with_grads(c_scan, inputs, True)
    for t in got:
        if t is not None:
            assert torch.isfinite(t).all()
    want = run_with_grads(torch_scan, inputs, True)
    assert_close_all(got, want, 1e-5, "long")


@needs_kernel
def test_noncontiguous_and_low_precision_inputs():
    inputs = make_inputs(torch.float32, b=3, d=8, n=4, L=20)
    B = inputs["B"].transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous view
    assert not B.is_contiguous()
    args = (inputs["u"], inputs["delta"], inputs["A"], B, inputs["C"])
    kw = dict(D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True)
    want = ss.selective_scan_reference(*args, **kw)
    assert rel_err(c_scan(*args, **kw), want) < 1e-5
    bf = [a.bfloat16() for a in args]
    out = c_scan(*bf, **{k: (v.bfloat16() if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert out.dtype == torch.bfloat16
    ref = ss.selective_scan_reference(*bf, **{k: (v.bfloat16() if torch.is_tensor(v) else v) for k, v in kw.items()})
    assert rel_err(out.float(), ref.float()) < 1e-2


@needs_kernel
def test_portable_sse_variant_matches_reference(tmp_path):
    """The kernel's non-AVX2 code path (used on CPUs without AVX2) is exact too."""
    code = (
        "import sys, torch; sys.path.insert(0, %r)\n"
        "from test_selective_scan import *\n"
        "assert ss.load_kernel().m2rec_ss_uses_avx2() == 0\n"
        "for dtype in (torch.float64, torch.float32):\n"
        "    for cfg in CONFIGS[:2]:\n"
        "        inputs = make_inputs(dtype, n=7, **cfg)\n"
        "        got = run_with_grads(c_scan, inputs, cfg['softplus'])\n"
        "        want = run_with_grads(ss.selective_scan_reference, inputs, cfg['softplus'])\n"
        "        assert_close_all(got, want, TOLS[dtype], 'sse')\n"
        "print('ok')\n"
    ) % str(Path(__file__).parent)
    env = dict(os.environ, M2REC_SCAN_NO_AVX2="1")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_step_matches_reference():
    inputs = make_inputs(torch.float64, b=2, d=5, n=4, L=12, use_h0=True)
    want, want_last = ss.selective_scan_reference(
        inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"],
        D=inputs["D"], z=inputs["z"], delta_bias=inputs["delta_bias"], delta_softplus=True,
        return_last_state=True, initial_state=inputs["initial_state"],
    )
    state = inputs["initial_state"]
    for t in range(12):
        y, state = ss.selective_scan_step(
            state, inputs["u"][:, :, t], inputs["delta"][:, :, t], inputs["A"],
            inputs["B"][:, :, t], inputs["C"][:, :, t], D=inputs["D"], z_t=inputs["z"][:, :, t],
            delta_bias=inputs["delta_bias"], delta_softplus=True,
        )
        torch.testing.assert_close(y, want[:, :, t], rtol=0, atol=1e-12)
    torch.testing.assert_close(state, want_last, rtol=0, atol=1e-12)


def test_backend_selection(monkeypatch):
    monkeypatch.setenv(ss.BACKEND_ENV, "torch")
    assert ss.resolve_backend("cpu") == "torch"
    monkeypatch.setenv(ss.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError):
        ss.resolve_backend("cpu")
    monkeypatch.setenv(ss.BACKEND_ENV, "c")
    with pytest.raises(ValueError):
        ss.resolve_backend("cuda")
    if HAS_KERNEL:
        assert ss.resolve_backend("cpu") == "c"
        monkeypatch.setenv(ss.BACKEND_ENV, "auto")
        assert ss.resolve_backend("cpu") == "c"
    # the environment variable is honoured by selective_scan itself
    inputs = make_inputs(torch.float64, b=1, d=2, n=2, L=4)
    monkeypatch.setenv(ss.BACKEND_ENV, "torch")
    called = []
    orig = ss._TorchScanCore.apply
    monkeypatch.setattr(ss._TorchScanCore, "apply", lambda *a: called.append(1) or orig(*a))
    ss.selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    assert called


def test_falls_back_to_torch_without_compiler(monkeypatch, caplog, tmp_path):
    """No compiler: 'auto' warns once and uses torch; 'c' raises."""
    monkeypatch.setattr(ss, "_kernel_lib", None)
    monkeypatch.setattr(ss, "_kernel_error", None)
    monkeypatch.setattr(ss, "_fallback_warned", False)
    monkeypatch.setattr(ss, "_find_compiler", lambda: None)
    monkeypatch.setenv(ss.CACHE_ENV, str(tmp_path))
    monkeypatch.setenv(ss.BACKEND_ENV, "auto")
    inputs = make_inputs(torch.float64, b=1, d=3, n=2, L=6)
    args = (inputs["u"], inputs["delta"], inputs["A"], inputs["B"], inputs["C"])
    with caplog.at_level(logging.WARNING, logger=ss.__name__):
        out1 = ss.selective_scan(*args, delta_softplus=True)
        out2 = ss.selective_scan(*args, delta_softplus=True)
    warnings = [r for r in caplog.records if "C kernel unavailable" in r.getMessage()]
    assert len(warnings) == 1
    want = ss.selective_scan_reference(*args, delta_softplus=True)
    assert rel_err(out1, want) < 1e-12 and torch.equal(out1, out2)
    assert not ss.kernel_available()
    with pytest.raises(RuntimeError, match="no C compiler"):
        ss.selective_scan(*args, backend="c")


@needs_kernel
def test_kernel_build_is_cached_and_atomic(monkeypatch, tmp_path):
    """Concurrent builds into a fresh cache dir leave one library and no temp files."""
    cc = ss._find_compiler()
    source = ss.KERNEL_SOURCE.read_bytes()
    target = tmp_path / "selective_scan_test.so"
    errors: list = []

    def build() -> None:
        try:
            ss._build_library(cc, source, target)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    # a fresh load through the cache dir finds / builds its keyed file there
    monkeypatch.setattr(ss, "_kernel_lib", None)
    monkeypatch.setattr(ss, "_kernel_error", None)
    monkeypatch.setenv(ss.CACHE_ENV, str(tmp_path / "cache"))
    ss.load_kernel()
    built = list((tmp_path / "cache").iterdir())
    assert len(built) == 1 and built[0].name.startswith("selective_scan_")
    assert built[0].suffix == ".so"


def test_shape_errors():
    inputs = make_inputs(torch.float32, b=1, d=3, n=2, L=4)
    with pytest.raises(ValueError):
        ss.selective_scan(inputs["u"], inputs["delta"], inputs["A"], inputs["B"][:, :1], inputs["C"])
    with pytest.raises(ValueError):
        ss.selective_scan(inputs["u"], inputs["delta"][:, :, :2], inputs["A"], inputs["B"], inputs["C"])


@pytest.mark.skipif(not HAS_MAMBA_CUDA, reason="needs CUDA and mamba-ssm")
def test_mamba_ssm_cuda_matches_cpu():
    """CUDA dispatch (mamba_ssm's selective_scan_fn) against the CPU path."""
    assert ss.resolve_backend("cuda") == "mamba_ssm"
    cfg = dict(softplus=True, use_D=True, use_z=True, use_bias=True, use_h0=False)
    inputs = make_inputs(torch.float32, b=2, d=16, n=16, L=64, dt_max=3.0, **cfg)

    def out_only(*args, **kwargs):  # mamba_ssm's last state carries no gradient
        out, last = ss.selective_scan(*args, **kwargs)
        return out, last.detach() * 0

    want = run_with_grads(out_only, inputs, True)
    cuda_inputs = {k: (v.cuda() if v is not None else None) for k, v in inputs.items()}
    got = [t.cpu() if t is not None else None for t in run_with_grads(out_only, cuda_inputs, True)]
    _, last_cpu = ss.selective_scan(*[inputs[k] for k in ("u", "delta", "A", "B", "C")],
                                    delta_softplus=True, return_last_state=True)
    _, last_gpu = ss.selective_scan(*[cuda_inputs[k] for k in ("u", "delta", "A", "B", "C")],
                                    delta_softplus=True, return_last_state=True)
    assert rel_err(last_gpu.cpu(), last_cpu) < 1e-4
    assert_close_all(got, want, 1e-3, "mamba_ssm")


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_last_position_scan_equals_the_full_scan_there(dtype):
    """The inference kernel reads channel-last inputs and column slices of one B|C tensor in place, stops at each
    row's position and gives the full scan's output there; with gradients needed it falls back, same values."""
    x = make_inputs(dtype, b=3, d=8, n=6, L=21, use_D=False, use_z=False, use_bias=False, softplus=False)
    u, delta = x["u"].transpose(1, 2).contiguous(), x["delta"].transpose(1, 2).contiguous()  # (b, L, d)
    bc = torch.cat([x["B"], x["C"]], 1).transpose(1, 2).contiguous()  # (b, L, 2n): slices share a row stride
    B, C = bc[..., :6], bc[..., 6:]
    positions = torch.tensor([20, 0, 9])
    full = ss.selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="c")  # (b, d, L)
    expected = full[torch.arange(3), :, positions]  # (b, d)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ss.selective_scan_last(u, delta, x["A"], B, C, positions), expected, **tol)
        torch.testing.assert_close(ss.selective_scan_last(u, delta, x["A"], B.contiguous(), C, positions), expected,
                                   **tol)
    u.requires_grad_(True)
    torch.testing.assert_close(ss.selective_scan_last(u, delta, x["A"], B, C, positions), expected, **tol)
    with pytest.raises(ValueError, match="positions must be in"), torch.no_grad():
        ss.selective_scan_last(u, delta, x["A"], B, C, torch.tensor([21, 0, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_causal_conv_silu_equals_torch_conv1d(dtype, with_bias):
    """The channel-last conv + SiLU (C kernel without autograd, shifted multiply-adds with it) equals SiLU of
    F.conv1d on the transposed, left-padded input, sequences shorter than the kernel included."""
    torch.manual_seed(0)
    for length in (1, 2, 17):
        x = torch.randn(3, length, 8, dtype=dtype)  # (batch, L, d_inner)
        weight, bias = torch.randn(8, 4, dtype=dtype), torch.randn(8, dtype=dtype) if with_bias else None
        expected = torch.nn.functional.silu(torch.nn.functional.conv1d(
            torch.nn.functional.pad(x.transpose(1, 2), (3, 0)), weight.unsqueeze(1), bias, groups=8)).transpose(1, 2)
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            torch.testing.assert_close(ss.causal_conv_silu(x, weight, bias), expected, **tol)
        torch.testing.assert_close(ss.causal_conv_silu(x.requires_grad_(True), weight, bias), expected, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_time_steps_equal_softplus_of_dt_proj(dtype):
    """softplus(dt_proj(x)) in one pass (C kernel, reading a column slice of x_proj's output in place) equals
    torch's, over the whole range of softplus (its threshold at 20 included); with gradients it is torch's."""
    torch.manual_seed(0)
    x_dbl = torch.randn(3, 17, 12, dtype=dtype) * 4  # (batch, L, dt_rank + 2*d_state)
    weight, bias = torch.randn(8, 4, dtype=dtype) * 3, torch.randn(8, dtype=dtype)
    expected = torch.nn.functional.softplus(torch.nn.functional.linear(x_dbl[..., :4], weight, bias))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(ss.time_steps(x_dbl[..., :4], weight, bias), expected, **tol)
        values = torch.linspace(-60, 60, 10_001, dtype=dtype).view(1, -1, 1)
        torch.testing.assert_close(ss.time_steps(values, torch.ones(1, 1, dtype=dtype), None),
                                   torch.nn.functional.softplus(values), **tol)
    torch.testing.assert_close(ss.time_steps(x_dbl[..., :4], weight.requires_grad_(True), bias), expected, **tol)
