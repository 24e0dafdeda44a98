"""Speed of M2Rec against SASRec and the Mamba4Rec-style baseline at the same width and depth.

For every model and sequence length: one training step (forward + backward + AdamW) and inference (top-10 over
all items) at batch 256; the median of repeated runs after warm-up, and the peak resident memory. Each case
runs in its own process (so peak memory is its own) under an address-space limit (an out-of-memory case is
reported, not fatal). Then, at length 200 (`--side-by-side-lengths`), batch inference of M2Rec and SASRec side by
side in one process, the two calls alternating round by round, so a busy shared machine slows both alike: the
median of the per-round ratios, with the load average before and after: at torch's default thread count, the same
with OMP_WAIT_POLICY=PASSIVE (idle OpenMP threads sleep instead of spinning, which on a busy machine steals cores
from the next parallel region, most from models made of many short ones), and at one thread. Writes
benchmarks/results/speed.json and speed.md (speed_quick.* with --quick) and prints the tables.

    python benchmarks/speed.py            # lengths 50 .. 2000
    python benchmarks/speed.py --quick    # length 200 only (a few minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("m2rec", "sasrec", "mamba4rec")
LENGTHS = (50, 100, 200, 500, 1000, 2000)


def build_case(model_type: str, length: int, batch: int, num_items: int):
    """(model, items (B, L), lengths (B,)): a fresh model at the default width and a batch of full histories."""
    import torch

    from m2rec.model.config import ModelParams
    from m2rec.model.factory import build_model

    torch.manual_seed(0)
    model = build_model(model_type, num_items, ModelParams(max_length=length), torch.randn(num_items + 1, 384))
    return model, torch.randint(1, num_items + 1, (batch, length)), torch.full((batch,), length)


def infer_top10(model, items, lengths) -> None:
    """Batch inference: top-10 over all items after each history."""
    import torch

    model.eval()
    with torch.no_grad():
        model(items, lengths).topk(10, dim=1)


def measure(model_type: str, length: int, batch: int, num_items: int, repeats: int) -> dict:
    """Time one case in this process: returns train_step_s, infer_s and peak_mem_mb."""
    import torch

    model, items, lengths = build_case(model_type, length, batch, num_items)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    targets = torch.randint(1, num_items + 1, items.shape)

    def train_step() -> None:
        model.train()
        hidden = model.encode(items)  # (B, L, H)
        loss = torch.nn.functional.cross_entropy(model.scores(hidden).flatten(0, 1), targets.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    out = {}
    for name, fn in (("infer_s", lambda: infer_top10(model, items, lengths)), ("train_step_s", train_step)):
        try:
            fn()  # warm-up (also builds the scan kernel on first use)
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[name] = statistics.median(times)
        except (RuntimeError, MemoryError) as err:  # e.g. the address-space limit: report it, keep the rest
            out[name] = None
            reason = "out of memory" if "memory" in str(err).lower() else str(err)[:200]
            out[name.removesuffix("_s") + "_error"] = reason
        out[f"{name.removesuffix('_s')}_peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["peak_mem_mb"] = out["train_step_peak_mem_mb"]
    return out


def side_by_side(length: int, batch: int, num_items: int, rounds: int) -> dict:
    """M2Rec and SASRec batch inference in this process, alternating (which goes first alternates too): each
    model's median time and the median of the per-round M2Rec/SASRec ratios, with the 1-minute load average."""
    import torch

    cases = {name: build_case(name, length, batch, num_items) for name in ("m2rec", "sasrec")}
    load_before = os.getloadavg()[0]
    for case in cases.values():
        infer_top10(*case)  # warm-up (also builds the scan kernel on first use)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(rounds):
        for name in sorted(cases, reverse=round_ % 2 == 1):
            start = time.perf_counter()
            infer_top10(*cases[name])
            times[name].append(time.perf_counter() - start)
    ratios = [m / s for m, s in zip(times["m2rec"], times["sasrec"])]
    return {"m2rec_infer_s": statistics.median(times["m2rec"]), "sasrec_infer_s": statistics.median(times["sasrec"]),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "rounds": rounds, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"), "load_1min_before": load_before,
            "load_1min_after": os.getloadavg()[0]}


def run_case(model_type: str, length: int, args: argparse.Namespace, threads: int | None = None,
             env: dict[str, str] | None = None) -> dict:
    """Run one case in a child process with a memory limit; failures come back as {"error": ...}."""
    command = [sys.executable, __file__, "--case", model_type, str(length), "--batch", str(args.batch),
               "--items", str(args.items), "--repeats", str(args.repeats), "--rounds", str(args.rounds)]
    command += ["--threads", str(threads)] if threads else []
    limit = args.memory_limit_gb * 1024**3

    def limit_memory() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    done = subprocess.run(command, capture_output=True, text=True, preexec_fn=limit_memory,
                          env={**os.environ, **(env or {})})
    if done.returncode != 0:
        reason = "out of memory" if "memory" in done.stderr.lower() else done.stderr.strip().splitlines()[-1]
        return {"error": reason}
    return json.loads(done.stdout.strip().splitlines()[-1])


def side_by_side_table(ratios: dict) -> str:
    lines = ["| length, threads, OpenMP wait policy | M2Rec inference (s) | SASRec inference (s) | M2Rec/SASRec, "
             "median of rounds (min-max) | rounds | load 1 min before / after |", "|---|---|---|---|---|---|"]
    for case, r in ratios.items():
        if "error" in r:
            lines.append(f"| {case} | {r['error']} | | | | |")
            continue
        lines.append(f"| {case} | {r['m2rec_infer_s']:.3f} | {r['sasrec_infer_s']:.3f} | {r['ratio']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['rounds']} | "
                     f"{r['load_1min_before']:.2f} / {r['load_1min_after']:.2f} |")
    return "\n".join(lines)


def table(results: dict, lengths) -> str:
    lines = ["| model | length | train step (s) | inference top-10 (s) | peak memory inference / training (MB) |",
             "|---|---|---|---|---|"]
    for length in lengths:
        for model_type in MODELS:
            r = results[model_type][str(length)]
            if "error" in r:
                lines.append(f"| {model_type} | {length} | {r['error']} | | |")
            else:
                lines.append(f"| {model_type} | {length} | {cell(r, 'train_step_s')} | {cell(r, 'infer_s')} | "
                             f"{r['infer_peak_mem_mb']:.0f} / {r['train_step_peak_mem_mb']:.0f} |")
    lines += ["", "| length | M2Rec/SASRec inference | M2Rec/SASRec train step | M2Rec/Mamba4Rec inference |",
              "|---|---|---|---|"]
    for length in lengths:
        m, s, b = (results[k][str(length)] for k in MODELS)
        lines.append(f"| {length} | {ratio(m, s, 'infer_s')} | {ratio(m, s, 'train_step_s')} | "
                     f"{ratio(m, b, 'infer_s')} |")
    return "\n".join(lines)


def cell(result: dict, key: str) -> str:
    return f"{result[key]:.3f}" if result.get(key) is not None else result.get(key.removesuffix("_s") + "_error", "-")


def ratio(ours: dict, theirs: dict, key: str) -> str:
    if ours.get(key) is None or theirs.get(key) is None:
        return "-"
    return f"{ours[key] / theirs[key]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="length 200 only")
    parser.add_argument("--lengths", type=int, nargs="*", default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--items", type=int, default=3000, help="catalog size scored at inference")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds of the side-by-side inference")
    parser.add_argument("--side-by-side-lengths", type=int, nargs="*", default=[200])
    parser.add_argument("--memory-limit-gb", type=int, default=16)
    parser.add_argument("--case", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        model_type, length = args.case[0], int(args.case[1])
        result = (side_by_side(length, args.batch, args.items, args.rounds) if model_type == "side_by_side"
                  else measure(model_type, length, args.batch, args.items, args.repeats))
        print(json.dumps(result))
        return
    lengths = (200,) if args.quick else tuple(args.lengths or LENGTHS)
    results: dict = {m: {} for m in MODELS}
    for length in lengths:
        for model_type in MODELS:
            results[model_type][str(length)] = run_case(model_type, length, args)
            print(f"{model_type:>10} L={length:<5} {results[model_type][str(length)]}", flush=True)
    ratios = {}
    for length in args.side_by_side_lengths:
        for threads, env in ((None, {}), (None, {"OMP_WAIT_POLICY": "PASSIVE"}), (1, {})):
            result = run_case("side_by_side", length, args, threads, env)
            ratios[f"{length}, {result.get('threads', threads or 'default')} threads, OMP wait "
                   f"{result.get('omp_wait_policy', 'default')}"] = result
    print(f"side by side: {ratios}", flush=True)
    RESULTS.mkdir(exist_ok=True)
    meta = {"batch": args.batch, "items": args.items, "repeats": args.repeats, "cpus": os.cpu_count(),
            "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)}
    name = "speed_quick" if args.quick else "speed"
    (RESULTS / f"{name}.json").write_text(json.dumps({"meta": meta, **results, "side_by_side": ratios}, indent=2))
    text = table(results, lengths) + "\n\nBatch inference side by side (one process, alternating):\n\n" + \
        side_by_side_table(ratios)
    (RESULTS / f"{name}.md").write_text(f"Command: `{meta['command']}`\n\n{text}\n")
    print(text)


if __name__ == "__main__":
    main()
