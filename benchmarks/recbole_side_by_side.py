"""RecBole 1.2.1's SASRec and this project's SASRec on ml-100k, side by side, at RecBole's default configuration.

Both take 5-core ml-100k, leave-one-out by time, full ranking over all items (history not masked), max length 200,
hidden 64, 2 blocks of 2 heads, CE loss, lr 1e-3, batch 512, dropout 0.5, and train on every prefix of each
sequence (RecBole's protocol; here `train.window_stride: 1`). RecBole stops after 10 epochs without a better
validation NDCG@10; this project's run uses its own stopping rule (TrainParams). RecBole is no dependency of
m2rec: it is installed on demand into its own venv, which borrows torch, numpy, pandas, scipy and scikit-learn
from the running interpreter through a .pth file (so no second torch is downloaded; RecBole's `ray` extra is
skipped because only its hyperparameter search needs it).

    python benchmarks/recbole_side_by_side.py                      # both, seed 42 (hours on 2 CPU cores)
    python benchmarks/recbole_side_by_side.py --only recbole --epochs 5
    python benchmarks/recbole_side_by_side.py --only m2rec --window-stride 50

Writes benchmarks/results/recbole_side_by_side.json: each side's validation and test HR/NDCG/MRR@10/@20, best
epoch, epochs run, seconds and the configuration.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
RECBOLE = "recbole==1.2.1"
# RecBole's runtime imports besides those borrowed from this interpreter (torch, numpy, pandas, scipy, sklearn, yaml)
RECBOLE_DEPS = ["colorlog==4.7.2", "colorama==0.4.4", "tensorboard", "thop", "tabulate", "texttable", "plotly",
                "psutil"]
PROTOCOL = {"max_length": 200, "hidden_size": 64, "layers": 2, "heads": 2, "dropout": 0.5, "learning_rate": 1e-3,
            "batch_size": 512, "k_core": 5, "stopping_step": 10}
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


def recbole_python(venv: Path) -> Path:
    """The RecBole venv's interpreter, creating the venv and installing RecBole there when missing."""
    python = venv / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import recbole"], capture_output=True).returncode == 0:
        return python
    log.info("installing %s into %s", RECBOLE, venv)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "borrowed-from-m2rec.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [str(python), "-m", "pip", "install", "--quiet"]
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
        ratings.to_csv(target, sep="\t", index=False)
    return root


def run_recbole(source: Path, venv: Path, work: Path, seed: int, epochs: int, device: str) -> dict:
    """Train and test RecBole's SASRec at its defaults plus the shared protocol; returns its metrics."""
    settings = {
        "data_path": str(recbole_atomic_file(source, work / "data")), "checkpoint_dir": str(work / "saved"),
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
    done = subprocess.run([str(recbole_python(venv)), "-c", RECBOLE_DRIVER, json.dumps(settings)], env=env,
                          cwd=work, stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    return {**result, "wall_seconds": round(time.time() - started), "settings": settings}


def run_m2rec(source: Path, work: Path, seed: int, epochs: int, window_stride: int, device: str) -> dict:
    """Train and test this project's SASRec on the same protocol through the main training stage."""
    from m2rec.data.prepare import PrepareParams
    from m2rec.data.sources import SourceSpec
    from m2rec.model.config import ModelParams
    from m2rec.stages.prepare import prepare
    from m2rec.stages.train import train
    from m2rec.training.trainer import TrainParams

    data = work / "m2rec-data"
    if not (data / "stats.json").exists():
        prepare(SourceSpec("movielens", str(source)), data,
                PrepareParams(k_core_users=PROTOCOL["k_core"], k_core_items=PROTOCOL["k_core"]))
    model = ModelParams(max_length=PROTOCOL["max_length"], hidden_size=PROTOCOL["hidden_size"],
                        sasrec_layers=PROTOCOL["layers"], num_heads=PROTOCOL["heads"], dropout=PROTOCOL["dropout"])
    training = TrainParams(epochs=epochs, batch_size=PROTOCOL["batch_size"], learning_rate=PROTOCOL["learning_rate"],
                           seed=seed, window_stride=window_stride, device=device, progress=False)
    started = time.time()
    metrics = train(data, work / "m2rec-sasrec", "sasrec", model, training)
    return {"valid": metrics["valid"], "test": metrics["test"], "best_epoch": metrics["best_epoch"],
            "epochs_run": metrics["epochs_run"], "wall_seconds": round(time.time() - started),
            "train_params": training.__dict__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", type=Path, default=ROOT.parent.parent / "shared" / "datasets" / "ml-100k",
                        help="ml-100k folder (u.data), read in place")
    parser.add_argument("--only", choices=("recbole", "m2rec"), help="run one side (the other side is kept from "
                        "the existing results file)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--epochs", type=int, default=300, help="epoch cap (RecBole's default: 300)")
    parser.add_argument("--window-stride", type=int, default=1, help="this project's windows (1: every prefix)")
    parser.add_argument("--venv", type=Path, default=Path("/tmp/recbole-venv"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/recbole-side-by-side"))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--output", type=Path, default=RESULTS / "recbole_side_by_side.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    results = json.loads(args.output.read_text()) if args.output.exists() else {}
    results.update({"protocol": PROTOCOL, "seed": args.seed,
                    "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])})
    if args.only in (None, "recbole"):
        results["recbole_sasrec"] = run_recbole(args.dataset, args.venv, args.work, args.seed, args.epochs,
                                                args.device)
    if args.only in (None, "m2rec"):
        results["m2rec_sasrec"] = run_m2rec(args.dataset, args.work, args.seed, args.epochs, args.window_stride,
                                            args.device)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2, default=str))
    for side in ("recbole_sasrec", "m2rec_sasrec"):
        if side in results:
            print(side, {k: round(v, 4) for k, v in results[side]["test"].items() if k.lower().endswith("@10")})


if __name__ == "__main__":
    main()
