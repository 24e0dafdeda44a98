"""CPU cost of the full next-item loss at amazon-games' shape: the fused chunked loss against PyTorch's
cross-entropy under activation checkpointing (the loss before it), with the trainer's allocator setting.

A step is forward and backward of the mean cross-entropy of 4,096 positions (a batch of 512 amazon-games windows)
over 16,429 items, hidden size 64, in chunks of 16M logits. Each side runs in its own process (malloc settings are
per process) after `m2rec.utils.memory.return_freed_memory()`, as in training; the report gives wall, user and
kernel seconds per step and the page faults, since freshly mapped blocks are what the kernel spends its time on.

    python benchmarks/loss_speed.py [--steps 8] [--threads 1]

Writes benchmarks/results/loss_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
POSITIONS, ITEMS, HIDDEN = 4096, 16429, 64

# Runs in a fresh interpreter: argv = side, steps, threads; prints one JSON line.
STEPS = r'''
import json, resource, sys, time
import torch
from torch.utils.checkpoint import checkpoint
from m2rec.training.loss import LOGITS_PER_CHUNK, full_cross_entropy
from m2rec.utils.memory import return_freed_memory

side, steps, threads, positions, n_items, hidden_size = sys.argv[1], *map(int, sys.argv[2:])
torch.set_num_threads(threads)
return_freed_memory()
torch.manual_seed(0)
items = torch.randn(n_items, hidden_size, requires_grad=True)
untrained = torch.zeros(n_items, dtype=torch.bool)
untrained[0] = True

def checkpointed(hidden, targets):
    """PyTorch's cross-entropy a chunk at a time under activation checkpointing (the loss before the fused one)."""
    def chunk(h, t):
        logits = (h @ items.t()).float().masked_fill(untrained, float("-inf"))
        return torch.nn.functional.cross_entropy(logits, t, reduction="sum")
    rows = LOGITS_PER_CHUNK // n_items
    total = sum(checkpoint(chunk, hidden[s : s + rows], targets[s : s + rows], use_reentrant=False)
                for s in range(0, len(hidden), rows))
    return total / len(hidden)

loss = {"fused": lambda h, t: full_cross_entropy(h, items, t, untrained), "checkpointed": checkpointed}[side]

def step():
    hidden = torch.randn(positions, hidden_size, requires_grad=True)
    loss(hidden, torch.randint(1, n_items, (positions,))).backward()

step()
before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    step()
after = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall_s_per_step": (time.perf_counter() - started) / steps,
                  "user_s_per_step": (after.ru_utime - before.ru_utime) / steps,
                  "kernel_s_per_step": (after.ru_stime - before.ru_stime) / steps,
                  "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps}))
'''


def measure(side: str, steps: int, threads: int, positions: int = POSITIONS) -> dict:
    """One side's per-step costs, measured in a fresh process."""
    done = subprocess.run([sys.executable, "-c", STEPS, side, str(steps), str(threads), str(positions), str(ITEMS),
                           str(HIDDEN)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    sides = {side: measure(side, args.steps, args.threads) for side in ("fused", "checkpointed")}
    for side, result in sides.items():
        print(f"{side:>13}: " + ", ".join(f"{key} {value:.3g}" for key, value in result.items()))
    RESULTS.mkdir(exist_ok=True)
    report = {"shape": {"positions": POSITIONS, "items": ITEMS, "hidden": HIDDEN}, "steps": args.steps,
              "threads": args.threads, "machine": {"cpu": platform.processor() or platform.machine(),
                                                   "cores": os.cpu_count(), "load": os.getloadavg()},
              "command": "python benchmarks/loss_speed.py " + " ".join(sys.argv[1:]), **sides}
    (RESULTS / "loss_speed.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
