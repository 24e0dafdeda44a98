"""Time the feature build (item text embedding, `feast apply`, materialization) on ml-100k and amazon-games.

Each dataset is prepared with the data layer (`m2rec data prepare`), then its features are built twice into the
same repository: first with an empty embedding cache (every text embedded), then again (every text cached). After
the builds it times what the trainer and the server read: the point-in-time training sequences of all users
(offline store) and one user's online lookup. Writes benchmarks/results/features_timing.json and prints a table.

    python benchmarks/features_timing.py                          # both datasets
    python benchmarks/features_timing.py --datasets ml-100k       # one
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DATASETS_DIR = Path(os.environ.get("M2REC_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
PREPARE = {"ml-100k": "movielens", "amazon-games": "sequences"}  # dataset -> `m2rec data prepare --format`
COLUMNS = ("users", "items", "sequence_rows", "embed_cold_s", "embed_cached_s", "tables_s", "apply_s",
           "materialize_s", "training_sequences_s", "online_lookup_ms")


def time_dataset(name: str, workdir: Path) -> dict:
    """Prepare `name`, build its features cold and warm, and time the offline and online reads."""
    from m2rec.cli import cli
    from m2rec.data.prepared import PreparedDataset
    from m2rec.features.repo import FeatureParams
    from m2rec.features.store import FeatureClient
    from m2rec.features.tables import split_cutoffs
    from m2rec.stages.features import build_features
    from m2rec.text.embeddings import TextEncoderParams

    data, repo = workdir / name / "data", workdir / name / "feature_repo"
    cli.main(["data", "prepare", "--format", PREPARE[name], "--input", str(DATASETS_DIR / name),
              "--output", str(data)], standalone_mode=False)
    with tempfile.TemporaryDirectory(prefix="m2rec-embeddings-") as cache:
        text = TextEncoderParams(cache_dir=cache)
        cold = build_features(data, repo, FeatureParams(), text)
        warm = build_features(data, repo, FeatureParams(), text)

    dataset = PreparedDataset.load(data)
    client = FeatureClient(repo)
    start = time.perf_counter()
    client.training_sequences(split_cutoffs(dataset.interactions, "train"))
    training_s = time.perf_counter() - start
    user = [dataset.interactions["user_id"].iloc[0]]
    client.user_sequences(user)  # warm-up
    lookups = []
    for _ in range(50):
        start = time.perf_counter()
        client.user_sequences(user)
        lookups.append(time.perf_counter() - start)
    return {
        **cold["counts"],
        "embed_cold_s": cold["timings"]["embed_s"],
        "embed_cached_s": warm["timings"]["embed_s"],
        **{k: warm["timings"][k] for k in ("tables_s", "apply_s", "materialize_s")},
        "training_sequences_s": round(training_s, 3),
        "online_lookup_ms": round(1000 * statistics.median(lookups), 2),
        "embedding_dim": cold["embedding_dim"],
        "text_model": cold["text_model"],
        "cold_build_timings": cold["timings"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(PREPARE), default=list(PREPARE))
    parser.add_argument("--workdir", type=Path, default=Path("artifacts/benchmarks/features"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    results = {name: time_dataset(name, args.workdir) for name in args.datasets}
    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "python": platform.python_version(), "load_average_1m": round(os.getloadavg()[0], 2)},
        "results": results,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "features_timing.json").write_text(json.dumps(report, indent=2) + "\n")
    print("| dataset | " + " | ".join(COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(str(row[c]) for c in COLUMNS) + " |")
    print(f"(machine: {report['machine']}); written to {RESULTS / 'features_timing.json'}")


if __name__ == "__main__":
    main()
