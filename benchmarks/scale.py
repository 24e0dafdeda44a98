"""How the data stages grow with the number of interactions: MovieLens-20M-shaped synthetic data at several sizes,
each stage in its own process, seconds and peak RSS per stage and size, and the fitted growth exponent.

    python benchmarks/scale.py --sizes 1000000 5000000 20000000 [--engines pandas spark] [--train-epoch sampled]

The data: about 138k users and 27k items at 20M interactions (both scaled with the size), heavy-tailed history
lengths (a log-normal clipped to 20 .. 5,000), power-law item popularity, item titles. Stages: prepare (`table`
source, CSV), validate, features build, one training epoch with each loss given to `--train-epoch` (long on a CPU) and 10,000 online
lookups. Writes benchmarks/results/scale.json: per engine, size and stage {seconds, peak_rss_mb}, plus the exponent
b of seconds ~ size^b per stage. Resumable: a finished (engine, size, stage) is kept in the results file.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results" / "scale.json"
M2REC = Path(sys.executable).parent / "m2rec"
USERS_AT_20M, ITEMS_AT_20M = 138_000, 27_000


def generate(size: int, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """`size` interactions (CSV, user,item,ts) and an item table (CSV, item_id,title), ML-20M-shaped."""
    rng = np.random.default_rng(seed)
    users = max(50, round(USERS_AT_20M * size / 20_000_000))
    items = max(50, round(ITEMS_AT_20M * (size / 20_000_000) ** 0.5))
    lengths = np.clip(rng.lognormal(mean=np.log(size / users) - 0.5, sigma=1.0, size=users), 20, 5000).astype(int)
    lengths = np.maximum(20, (lengths * size / lengths.sum()).astype(int))
    user_of = np.repeat(np.arange(1, users + 1), lengths)  # (E,)
    popularity = 1.0 / np.arange(1, items + 1) ** 0.8
    item_of = rng.choice(np.arange(1, items + 1), size=len(user_of), p=popularity / popularity.sum())
    starts = rng.integers(1_000_000_000, 1_400_000_000, size=users)
    offsets = np.concatenate([np.arange(n) for n in lengths]) * 3600
    times = np.repeat(starts, lengths) + offsets
    folder.mkdir(parents=True, exist_ok=True)
    interactions = folder / "ratings.csv"
    pd.DataFrame({"user": user_of, "item": item_of, "ts": times}).drop_duplicates().to_csv(interactions, index=False)
    titles = [f"Item {i}: a {['drama', 'comedy', 'thriller', 'documentary'][i % 4]} from {1950 + i % 70}"
              for i in range(1, items + 1)]
    catalog = folder / "items.csv"
    pd.DataFrame({"item_id": np.arange(1, items + 1), "title": titles}).to_csv(catalog, index=False)
    return interactions, catalog


MEASURE = """
import resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:]).returncode
print()
print(f"@@ {code} {time.perf_counter() - started:.2f} {resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}")
"""


def run_stage(command: list[str], log_path: Path) -> dict:
    """Run one stage under a fresh measuring process: its seconds and the peak RSS of its own process tree."""
    load = os.getloadavg()[0]
    with open(log_path, "w") as log:
        subprocess.run([sys.executable, "-c", MEASURE, *command], stdout=log, stderr=subprocess.STDOUT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    code, seconds, peak_kib = log_path.read_text().rsplit("@@ ", 1)[1].split()
    return {"seconds": float(seconds), "peak_rss_mb": round(int(peak_kib) / 1024, 1), "ok": code == "0",
            "load_average_at_start": round(load, 2), "log": str(log_path)}


LOOKUPS = """
import json, sys, time
from m2rec.features.store import FeatureClient
summary = json.load(open(sys.argv[1]))
client = FeatureClient(summary["repo_dir"])
users = [str(u) for u in range(1, 10001)]
for start in range(0, len(users), 100):
    client.snapshot_sequences(users[start:start + 100])
"""


def stages(size: int, engine: str, work: Path, losses: list[str]) -> list[tuple[str, list[str]]]:
    interactions, catalog = work / "raw" / "ratings.csv", work / "raw" / "items.csv"
    data, features = work / f"data-{engine}", work / f"features-{engine}"
    source = ["--format", "table", "--input", str(interactions), "--items", str(catalog),
              "--columns", "user_id=user,item_id=item,timestamp=ts", "--item-columns", "item_id=item_id,text=title"]
    steps = [
        ("prepare", [str(M2REC), "data", "prepare", *source, "--output", str(data), "--engine", engine]),
        ("validate", [str(M2REC), "data", "validate", "--input", str(data)]),
        ("features", [str(M2REC), "features", "build", "--data", str(data), "--root", str(features),
                      "--engine", engine]),
        ("lookups", [sys.executable, "-c", LOOKUPS, str(work / f"build-{engine}.json")]),
    ]
    # one epoch and its evaluation, with the full or the sampled loss (m2rec.training.loss); training reads the
    # prepared tables, which are the same whichever engine wrote them, so it runs on the pandas path only
    for loss in losses if engine == "pandas" else []:
        params = work / f"params-{loss}.yaml"
        params.write_text(json.dumps({"train": {"loss": loss, "progress": False}}))  # JSON is YAML
        steps.append((f"train_epoch_{loss}", [str(M2REC), "train", "--data", str(data), "--params", str(params),
                                              "--output", str(work / f"model-{loss}"), "--epochs", "1"]))
    return steps


def exponent(sizes: list[int], seconds: list[float]) -> float | None:
    """b in seconds ~ size^b (least squares on logs); None with fewer than two sizes."""
    if len(sizes) < 2:
        return None
    return round(float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0]), 3)


@contextmanager
def results_file(path: Path) -> Iterator[dict]:
    """The results, read and written back under an exclusive lock, so that runs of several engines or sizes at once
    each add their own entries and never overwrite another's."""
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(path.read_text()) if path.is_file() else {}
        yield results
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(path)


def with_exponents(measured_by_size: dict) -> dict:
    """The fitted growth exponent of each stage over the sizes where it finished."""
    by_size = {size: stages for size, stages in measured_by_size.items() if not size.startswith("_")}
    exponents = {}
    for name in sorted({stage for stages in by_size.values() for stage in stages}):
        measured = [(int(size), s[name]["seconds"]) for size, s in by_size.items() if s.get(name, {}).get("ok")]
        exponents[name] = exponent(*map(list, zip(*measured))) if measured else None
    return exponents


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000, 20_000_000])
    parser.add_argument("--engines", nargs="+", default=["pandas"], choices=["pandas", "spark"])
    parser.add_argument("--workdir", type=Path, default=Path(__file__).resolve().parent / ".cache" / "scale")
    parser.add_argument("--train-epoch", nargs="*", choices=["full", "sampled"], default=[],
                        help="also time one training epoch with these losses (long on a CPU)")
    args = parser.parse_args()
    for engine in args.engines:
        for size in args.sizes:
            work = args.workdir / str(size)
            if not (work / "raw" / "ratings.csv").is_file():
                generate(size, work / "raw")
            for name, command in stages(size, engine, work, args.train_epoch):
                with results_file(RESULTS) as results:
                    done = results.get(engine, {}).get(str(size), {}).get(name, {}).get("ok")
                needed_again = name == "prepare" and not (work / f"data-{engine}" / "stats.json").is_file()
                if done and not needed_again:  # a later stage may need prepare's output
                    continue
                measured = run_stage(command, work / f"{engine}-{name}.log")
                if name == "features" and measured["ok"]:
                    build = next((work / f"features-{engine}").glob("*/data/build.json"))
                    (work / f"build-{engine}.json").write_text(build.read_text())
                print(engine, size, name, measured, flush=True)
                with results_file(RESULTS) as results:
                    results.setdefault(engine, {}).setdefault(str(size), {})[name] = measured
                    results[engine]["_exponents"] = with_exponents(results[engine])
    with results_file(RESULTS) as results:
        results["_meta"] = {"command": " ".join(sys.argv), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                            "load_average": os.getloadavg()[0]}
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
