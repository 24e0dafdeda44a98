"""Selective-scan speed on CPU: reference loop vs C kernel vs torch fallback.

Times forward+backward at batch=64, L=200, d_inner=128, d_state=16 (the M2Rec training
shape), next to one ``nn.TransformerEncoderLayer(64, 2 heads, batch_first)`` and one
Mamba block (d_model=64, so d_inner=128) at the same batch and length.

    python benchmarks/scan_speed.py [--threads 2] [--repeats 5] [--skip-reference]

Prints a table and writes benchmarks/results/scan_speed.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch
import torch.nn as nn

from m2rec.model import selective_scan as ss
from m2rec.model.mamba_block import Mamba

BATCH, LENGTH, D_INNER, D_STATE, D_MODEL = 64, 200, 128, 16, 64


def _time(step: Callable[[], None], repeats: int, warmup: int) -> Dict[str, float]:
    for _ in range(warmup):
        step()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def _scan_step(fn: Callable[..., Any], inputs: Dict[str, torch.Tensor]) -> Callable[[], None]:
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}

    def step() -> None:
        for v in leaves.values():
            v.grad = None
        out = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"],
                 D=leaves["D"], z=leaves["z"], delta_bias=leaves["delta_bias"],
                 delta_softplus=True)
        out.sum().backward()

    return step


def _module_step(module: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    x = x.clone().requires_grad_()

    def step() -> None:
        module.zero_grad(set_to_none=True)
        x.grad = None
        module(x).sum().backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow loop")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).resolve().parent / "results" / "scan_speed.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    inputs = {
        "u": torch.randn(BATCH, D_INNER, LENGTH),
        "delta": torch.randn(BATCH, D_INNER, LENGTH) - 2.0,
        "A": -torch.arange(1, D_STATE + 1, dtype=torch.float32).repeat(D_INNER, 1),
        "B": torch.randn(BATCH, D_STATE, LENGTH),
        "C": torch.randn(BATCH, D_STATE, LENGTH),
        "D": torch.ones(D_INNER),
        "z": torch.randn(BATCH, D_INNER, LENGTH),
        "delta_bias": torch.randn(D_INNER) * 0.1,
    }
    rows: Dict[str, Dict[str, float]] = {}
    if not args.skip_reference:
        rows["scan: reference (python loop)"] = _time(
            _scan_step(ss.selective_scan_reference, inputs), repeats=1, warmup=0)
    if ss.kernel_available():
        rows["scan: C kernel"] = _time(
            _scan_step(functools.partial(ss.selective_scan, backend="c"), inputs),
            args.repeats, warmup=2)
    rows["scan: torch fallback"] = _time(
        _scan_step(functools.partial(ss.selective_scan, backend="torch"), inputs),
        args.repeats, warmup=1)
    x = torch.randn(BATCH, LENGTH, D_MODEL)
    layer = nn.TransformerEncoderLayer(D_MODEL, nhead=2, batch_first=True)
    rows["transformer encoder layer (64, 2 heads)"] = _time(
        _module_step(layer, x), args.repeats, warmup=2)
    block = Mamba(d_model=D_MODEL, d_state=D_STATE)
    rows["mamba block (d_model=64), auto backend"] = _time(
        _module_step(block, x), args.repeats, warmup=2)

    width = max(len(k) for k in rows)
    print(f"forward+backward, batch={BATCH}, L={LENGTH}, d_inner={D_INNER}, "
          f"d_state={D_STATE}, threads={args.threads}, load average before={load_before}")
    print(f"{'':{width}}  {'median s':>9}  {'min s':>9}")
    for name, r in rows.items():
        print(f"{name:{width}}  {r['median_s']:9.4f}  {r['min_s']:9.4f}")

    kernel = ss.load_kernel() if ss.kernel_available() else None
    report = {
        "shape": {"batch": BATCH, "L": LENGTH, "d_inner": D_INNER, "d_state": D_STATE,
                  "d_model": D_MODEL},
        "threads": args.threads,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "kernel_avx2": bool(kernel.m2rec_ss_uses_avx2()) if kernel is not None else None,
        "transformer_layer": {"d_model": D_MODEL, "nhead": 2, "dim_feedforward": 2048,
                              "dropout": 0.1, "mode": "train"},
        # other processes share the CPUs: the 1-minute load average before/after the run
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
