"""RecBole 1.2.1's SASRec and this project's SASRec on ml-100k, side by side, at RecBole's default configuration.

Both take 5-core ml-100k, leave-one-out by time, full ranking over all items (history not masked), max length 200,
hidden 64, 2 blocks of 2 heads, CE loss, lr 1e-3, dropout 0.5, and batches of 512 (prefix, next item) pairs.
RecBole trains every prefix of a sequence as its own example; this project trains whole windows and counts its batch
in the targets they train (`train.batch_unit: targets`), so 512 means the same number of next items per step at
about a hundredth of the work; `--window-stride 1` trains every prefix as RecBole does (each window then has one
target, and every target the full history). RecBole stops after 10 epochs without a better
validation NDCG@10; this project's run uses its own stopping rule (TrainParams). RecBole is no dependency of
m2rec: it is installed on demand into its own venv, which borrows torch, numpy, pandas, scipy and scikit-learn
from the running interpreter through a .pth file (so no second torch is downloaded; RecBole's `ray` extra is
skipped because only its hyperparameter search needs it).

    python benchmarks/recbole_side_by_side.py                      # both, seeds 42-44 (days on 2 CPU cores)
    python benchmarks/recbole_side_by_side.py --only recbole --seeds 1 --epochs 5
    python benchmarks/recbole_side_by_side.py --only m2rec --seed 43 --seeds 1 --window-stride 1
    python benchmarks/recbole_side_by_side.py --wheels DIR --device cuda   # offline: RecBole from DIR's wheels

Each (side, seed) run is merged into benchmarks/results/recbole_side_by_side.json under a lock as it ends, so
runs may go in parallel processes (benchmarks/device_study.sh starts one per side and seed on a lent GPU). The file
holds each run's validation and test HR/NDCG/MRR@10/@20, best epoch, epochs run, seconds and configuration, and a
summary: each side's mean, spread and range over seeds, and whether this project's mean test HR@10 and NDCG@10
lie within RecBole's range over its seeds (the parity the quality issue asks for). Runs at a shorter epoch cap
than the default 300 are stored as their own side (`recbole_sasrec_<N>_epochs`, `m2rec_sasrec_<N>_epochs`), never
mixed with runs that their stopping rule ended; RecBole's are judged apart.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from m2rec.training.batching import BatchUnit
from m2rec.utils.atomic import atomic_write_bytes, atomic_write_json

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RECBOLE = "recbole==1.2.1"
# RecBole's runtime imports besides those borrowed from this interpreter (torch, numpy, pandas, scipy, sklearn, yaml);
# plotly, which it lists too, is imported only by its hyperparameter search
RECBOLE_DEPS = ["colorlog==4.7.2", "colorama==0.4.4", "tensorboard", "thop", "tabulate", "texttable", "psutil"]
PROTOCOL = {"max_length": 200, "hidden_size": 64, "layers": 2, "heads": 2, "dropout": 0.5, "learning_rate": 1e-3,
            "batch_size": 512, "k_core": 5, "stopping_step": 10}
RECBOLE_EPOCHS = 300  # RecBole's default epoch cap, both sides' default: in practice the stopping rule ends a run
log = logging.getLogger("recbole_side_by_side")

# Runs inside the RecBole venv: argv[1] is a JSON of settings; prints one JSON line with the results.
RECBOLE_DRIVER = r'''
import json, sys, time
import numpy as np
# RecBole 1.2.1 aliases names that numpy 2 removed (np.float_, np.complex_, np.unicode_): put them back first.
for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, old):
        setattr(np, old, new)
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_logger, init_seed

settings = json.loads(sys.argv[1])
config = Config(model="SASRec", dataset="ml-100k", config_dict=settings)
init_seed(config["seed"], config["reproducibility"])
init_logger(config)
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
started = time.time()
best_valid, valid_result = trainer.fit(train_data, valid_data, saved=True, show_progress=False)
test_result = trainer.evaluate(test_data, load_best_model=True, show_progress=False)
epochs_run = len(trainer.train_loss_dict)  # one entry per epoch trained
print("RESULT " + json.dumps({"valid": dict(valid_result), "test": dict(test_result),
                              "best_epoch": epochs_run - trainer.cur_step,  # cur_step: epochs since the best
                              "epochs_run": epochs_run, "seconds": time.time() - started,
                              "users": int(dataset.user_num - 1), "items": int(dataset.item_num - 1)}))
'''


def recbole_python(venv: Path, wheels: Path | None = None) -> Path:
    """The RecBole venv's interpreter, creating the venv and installing RecBole there when missing (from PyPI, or
    offline from the wheels in `wheels`); one process installs while parallel ones wait on a lock."""
    python = venv / "bin" / "python"
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.with_name(venv.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if python.exists() and subprocess.run([str(python), "-c", "import recbole"],
                                              capture_output=True).returncode == 0:
            return python
        log.info("installing %s into %s%s", RECBOLE, venv, f" from {wheels}" if wheels else "")
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 check=True, capture_output=True, text=True).stdout.strip()
        Path(purelib, "borrowed-from-m2rec.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = [str(python), "-m", "pip", "install", "--quiet", *(["--no-index", "--find-links", str(wheels)]
                                                                  if wheels else [])]
        subprocess.run(pip + ["--no-deps", RECBOLE], check=True)  # its ray pin is for hyperparameter search only
        subprocess.run(pip + RECBOLE_DEPS, check=True)
    return python


def recbole_atomic_file(source: Path, root: Path) -> Path:
    """ml-100k's u.data as RecBole's atomic `ml-100k.inter` under `root/ml-100k` (RecBole filters it itself)."""
    target = root / "ml-100k" / "ml-100k.inter"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        ratings = pd.read_csv(source / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
        ratings.columns = ["user_id:token", "item_id:token", "rating:float", "timestamp:float"]
        atomic_write_bytes(target, ratings.to_csv(sep="\t", index=False).encode())  # parallel runs may write it
    return root


def run_recbole(source: Path, venv: Path, work: Path, seed: int, epochs: int, device: str,
                wheels: Path | None = None) -> dict:
    """Train and test RecBole's SASRec at its defaults plus the shared protocol; returns its metrics."""
    run_dir = work / f"{side_name('recbole', epochs)}-seed{seed}"  # RecBole names checkpoints by the second
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "data_path": str(recbole_atomic_file(source, work / "data")), "checkpoint_dir": str(run_dir / "saved"),
        "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
        "user_inter_num_interval": f"[{PROTOCOL['k_core']},inf)",
        "item_inter_num_interval": f"[{PROTOCOL['k_core']},inf)",
        "MAX_ITEM_LIST_LENGTH": PROTOCOL["max_length"], "train_neg_sample_args": None, "loss_type": "CE",
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10, 20], "valid_metric": "NDCG@10",
        "train_batch_size": PROTOCOL["batch_size"], "learning_rate": PROTOCOL["learning_rate"],
        "stopping_step": PROTOCOL["stopping_step"], "epochs": epochs, "seed": seed, "use_gpu": device == "cuda",
        "show_progress": False,
    }
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}  # RecBole reloads its own pickled checkpoint
    started = time.time()
    done = subprocess.run([str(recbole_python(venv, wheels)), "-c", RECBOLE_DRIVER, json.dumps(settings)], env=env,
                          cwd=run_dir, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "wall_seconds": round(time.time() - started), "settings": settings}


def run_m2rec(source: Path, work: Path, seed: int, epochs: int, window_stride: int | None, batch_unit: BatchUnit,
              device: str) -> dict:
    """Train and test this project's SASRec on the same protocol through the main training stage."""
    from m2rec.data.prepare import PrepareParams
    from m2rec.data.sources import SourceSpec
    from m2rec.model.config import ModelParams
    from m2rec.stages.prepare import prepare
    from m2rec.stages.train import train
    from m2rec.training.trainer import TrainParams

    data = work / "m2rec-data"
    with open(work / "m2rec-data.lock", "w") as lock:  # parallel runs prepare it once
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (data / "stats.json").exists():
            prepare(SourceSpec("movielens", str(source)), data,
                    PrepareParams(k_core_users=PROTOCOL["k_core"], k_core_items=PROTOCOL["k_core"]))
    model = ModelParams(max_length=PROTOCOL["max_length"], hidden_size=PROTOCOL["hidden_size"],
                        sasrec_layers=PROTOCOL["layers"], num_heads=PROTOCOL["heads"], dropout=PROTOCOL["dropout"])
    training = TrainParams(epochs=epochs, batch_size=PROTOCOL["batch_size"], learning_rate=PROTOCOL["learning_rate"],
                           batch_unit=batch_unit, seed=seed, window_stride=window_stride, device=device,
                           progress=False)
    started = time.time()
    metrics = train(data, work / f"{side_name('m2rec', epochs)}-seed{seed}", "sasrec", model, training)
    return {"valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "wall_seconds": round(time.time() - started),
            "train_params": training.__dict__}


COMPARED = ("HR@10", "NDCG@10")


def side_name(side: Literal["recbole", "m2rec"], epochs: int) -> str:
    """A side's runs are kept apart by epoch cap: at the default cap the stopping rule ends a run (`recbole_sasrec`,
    `m2rec_sasrec`); a shorter cap (issue 15's RecBole reference ran 4 epochs) is another side, `<side>_<N>_epochs`."""
    return f"{side}_sasrec" if epochs == RECBOLE_EPOCHS else f"{side}_sasrec_{epochs}_epochs"


def summarize(runs: dict[str, dict[str, dict]]) -> dict:
    """Each side's test HR@10 and NDCG@10 over its seeds (mean, std, min, max), and for each RecBole side whether
    this project's mean lies within its range over seeds (`within_recbole_range`, keyed by RecBole side; a side
    appears once it and this project's side have two seeds or more)."""
    summary: dict = {}
    for side, by_seed in runs.items():
        summary[side] = {"seeds": sorted(int(s) for s in by_seed)}
        for metric in COMPARED:
            values = np.array([_metric(run["test"], metric) for run in by_seed.values()])
            summary[side][metric] = {"mean": float(values.mean()), "std": float(values.std()),
                                     "min": float(values.min()), "max": float(values.max())}
    ours, recbole = summary.get(side_name("m2rec", RECBOLE_EPOCHS)), side_name("recbole", RECBOLE_EPOCHS)
    within = {side: {m: theirs[m]["min"] <= ours[m]["mean"] <= theirs[m]["max"] for m in COMPARED}
              for side, theirs in summary.items()
              if side.startswith(recbole) and ours and len(theirs["seeds"]) > 1 and len(ours["seeds"]) > 1}
    if within:
        summary["within_recbole_range"] = within
    return summary


def _metric(metrics: dict, name: str) -> float:
    """A metric by this project's name from either side (RecBole writes `hit@10`, `ndcg@10`)."""
    return float({k.lower().replace("hit@", "hr@"): v for k, v in metrics.items()}[name.lower()])


def merge(output: Path, side: str, seed: int, result: dict, command: str) -> dict:
    """Add one run to the results file under a lock (parallel runs write the same file) and refresh its summary."""
    output.parent.mkdir(parents=True, exist_ok=True)
    with open(output.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(output.read_text()) if output.exists() else {}
        results["protocol"] = PROTOCOL
        results.setdefault("runs", {}).setdefault(side, {})[str(seed)] = {**result, "command": command}
        results["summary"] = summarize(results["runs"])
        atomic_write_json(output, results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent.parent / "shared" / "datasets" / "ml-100k",
                        help="ml-100k folder (u.data), read in place")
    parser.add_argument("--only", choices=("recbole", "m2rec"), help="run one side")
    parser.add_argument("--seed", type=int, default=42, help="the first seed")
    parser.add_argument("--seeds", type=int, default=3, help="seeds --seed, --seed + 1, ...")
    parser.add_argument("--epochs", type=int, default=RECBOLE_EPOCHS,
                        help=f"epoch cap (RecBole's default: {RECBOLE_EPOCHS}; runs at another cap are stored as "
                             "their own side, <side>_sasrec_<N>_epochs)")
    parser.add_argument("--window-stride", type=int, help="this project's windows (default: not overlapping; 1: "
                                                          "every prefix, as RecBole, at about 100 times the work)")
    parser.add_argument("--batch-unit", choices=("targets", "windows"), default="targets",
                        help="what this project's batch of 512 counts (targets: RecBole's (prefix, next item) pairs)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/recbole-venv"))
    parser.add_argument("--wheels", type=Path, help="install RecBole offline from the wheels in this folder")
    parser.add_argument("--work", type=Path, default=Path("/tmp/recbole-side-by-side"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "recbole_side_by_side.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    results: dict = {}
    for seed in range(args.seed, args.seed + args.seeds):
        if args.only in (None, "recbole"):
            run = run_recbole(args.dataset, args.venv, args.work, seed, args.epochs, args.device, args.wheels)
            results = merge(args.output, side_name("recbole", args.epochs), seed, run, command)
        if args.only in (None, "m2rec"):
            run = run_m2rec(args.dataset, args.work, seed, args.epochs, args.window_stride, args.batch_unit,
                            args.device)
            results = merge(args.output, side_name("m2rec", args.epochs), seed, run, command)
    print(json.dumps(results.get("summary", {}), indent=2))


if __name__ == "__main__":
    main()
