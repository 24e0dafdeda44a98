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

A RecBole run keeps its whole state after every epoch in `--progress` (benchmarks/results/recbole_progress, in
torch's tensor-only format) and continues from there when started again; with `--time-budget SECONDS` it pauses
after the last epoch that fits. A converged RecBole run takes about 9 CPU hours, so on the CPU it goes over several
sessions: each one runs the same command with a budget and commits the progress files; the file of a run that
ended is removed once its result is merged. A resumed run is the run an uninterrupted one would have been (same
losses and metrics; tests/test_recbole_side_by_side_benchmark.py). RecBole 1.2.1 reads the ml-100k it ships,
whatever `data_path` says; the script refuses to run unless that copy holds the ratings of `--dataset`.

    python benchmarks/recbole_side_by_side.py --only recbole --seed 42 --seeds 1 --time-budget 7200
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from m2rec.training.batching import BatchUnit
from m2rec.utils.atomic import atomic_write_json

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

# Runs inside the RecBole venv: argv[1] is a JSON of settings; prints one JSON line, `RESULT {...}` when the run
# ended or `PAUSED {...}` when its time budget would not hold another epoch. After every epoch the run's state
# (weights, optimizer, best weights, early-stopping counters, both random generators, each epoch's loss, validation
# NDCG@10, seconds and threads) goes to `progress_file` in torch's tensor-only format (read back with
# weights_only=True); a rerun continues from it where it stopped, and gives the run an uninterrupted one gives.
RECBOLE_DRIVER = r"""
import json, os, sys, time
import numpy as np
# RecBole 1.2.1 aliases names that numpy 2 removed (np.float_, np.complex_, np.unicode_): put them back first.
for old, new in (("float_", np.float64), ("complex_", np.complex128), ("unicode_", np.str_)):
    if not hasattr(np, old):
        setattr(np, old, new)
import torch
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.utils import get_model, get_trainer, init_logger, init_seed


class Paused(Exception):
    "The time budget would not hold another epoch; the progress file holds the run so far."


settings = json.loads(sys.argv[1])
name, progress_file, budget = settings.pop("dataset"), settings.pop("progress_file"), settings.pop("time_budget")
config = Config(model="SASRec", dataset=name, config_dict=settings)
init_seed(config["seed"], config["reproducibility"])
init_logger(config)
dataset = create_dataset(config)
train_data, valid_data, test_data = data_preparation(config, dataset)
model = get_model(config["model"])(config, train_data._dataset).to(config["device"])
trainer = get_trainer(config["MODEL_TYPE"], config["model"])(config, model)
if os.path.exists(progress_file):
    progress = torch.load(progress_file, map_location="cpu", weights_only=True)  # rng states stay on the CPU
    model.load_state_dict(progress["model"])
    trainer.optimizer.load_state_dict(progress["optimizer"])
    trainer.start_epoch, trainer.cur_step = progress["epoch"] + 1, progress["cur_step"]
    trainer.best_valid_score, trainer.best_valid_result = progress["best_valid_score"], progress["best_valid_result"]
    torch.set_rng_state(progress["rng"])  # dropout
    train_data.generator.set_state(progress["loader_rng"])  # the order of training examples
else:
    progress = {"epoch": -1, "epochs": []}
started = last = time.time()


def ended():
    return trainer.cur_step > trainer.stopping_step or progress["epoch"] + 1 >= trainer.epochs


def save_progress(epoch, valid_score):
    global last
    now = time.time()
    seconds, last = now - last, now
    if trainer.cur_step == 0:  # this epoch is the best so far
        progress["best_model"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    progress["epochs"].append({"epoch": epoch + 1, "loss": float(trainer.train_loss_dict[epoch]),
                               "valid_ndcg10": float(valid_score), "seconds": seconds,
                               "threads": torch.get_num_threads()})
    progress.update(model=model.state_dict(), optimizer=trainer.optimizer.state_dict(), epoch=epoch,
                    cur_step=trainer.cur_step, best_valid_score=float(trainer.best_valid_score),
                    best_valid_result={k: float(v) for k, v in trainer.best_valid_result.items()},
                    rng=torch.get_rng_state(), loader_rng=train_data.generator.get_state())
    torch.save(progress, progress_file + ".tmp")
    os.replace(progress_file + ".tmp", progress_file)
    if budget is not None and not ended() and now - started + seconds > budget:
        raise Paused()


if not ended():
    try:
        trainer.fit(train_data, valid_data, saved=False, show_progress=False, callback_fn=save_progress)
    except Paused:
        print("PAUSED " + json.dumps({"epochs_run": progress["epoch"] + 1, "cur_step": progress["cur_step"]}))
        sys.exit(0)
model.load_state_dict(progress["best_model"])
test_result = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
epochs_run = progress["epoch"] + 1
print("RESULT " + json.dumps({"valid": progress["best_valid_result"], "test": dict(test_result),
                              "best_epoch": epochs_run - progress["cur_step"],  # cur_step: epochs since the best
                              "epochs_run": epochs_run, "seconds": sum(e["seconds"] for e in progress["epochs"]),
                              "epochs": progress["epochs"],
                              "users": int(dataset.user_num - 1), "items": int(dataset.item_num - 1)}))
"""


def site_packages(python: Path) -> str:
    """The site-packages folder of the venv whose interpreter is `python`."""
    return subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()


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
        Path(site_packages(python), "borrowed-from-m2rec.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        pip = [str(python), "-m", "pip", "install", "--quiet", *(["--no-index", "--find-links", str(wheels)]
                                                                  if wheels else [])]
        subprocess.run(pip + ["--no-deps", RECBOLE], check=True)  # its ray pin is for hyperparameter search only
        subprocess.run(pip + RECBOLE_DEPS, check=True)
    return python


def recbole_ml100k(python: Path, source: Path) -> None:
    """Refuse to run unless the ml-100k that RecBole reads holds the same ratings as `source/u.data`: for a dataset
    named ml-100k, RecBole 1.2.1 reads the copy it ships (`recbole/dataset_example`) whatever `data_path` says."""
    bundled = Path(site_packages(python), "recbole", "dataset_example", "ml-100k", "ml-100k.inter")
    columns = ["user_id", "item_id", "rating", "timestamp"]
    theirs = pd.read_csv(bundled, sep="\t", header=0, names=columns).sort_values(columns, ignore_index=True)
    ours = pd.read_csv(source / "u.data", sep="\t", names=columns).sort_values(columns, ignore_index=True)
    if not theirs.equals(ours):
        raise ValueError(f"--dataset: {source / 'u.data'} is not the ml-100k RecBole reads ({bundled}); pass the "
                         "folder of the GroupLens ml-100k release")


def drive_recbole(python: Path, settings: dict, progress: Path, time_budget: float | None, cwd: Path) -> dict | None:
    """Run RecBole's SASRec with `settings` (RecBole's configuration plus `dataset`, its name) in the RecBole venv;
    returns its metrics, or None when `time_budget` seconds would not hold another epoch. The run continues from
    `progress` (its state after its last epoch) when that file exists, and brings it up to date after every epoch."""
    progress.parent.mkdir(parents=True, exist_ok=True)
    log.info("RecBole seed %d: %s %s", settings["seed"], "continuing from" if progress.exists() else "progress in",
             progress)
    driven = {**settings, "progress_file": str(progress.resolve()), "time_budget": time_budget}
    done = subprocess.run([str(python), "-c", RECBOLE_DRIVER, json.dumps(driven)], cwd=cwd, stdout=subprocess.PIPE,
                          text=True, check=True)
    status, _, payload = next(line for line in done.stdout.splitlines()
                              if line.startswith(("RESULT ", "PAUSED "))).partition(" ")
    if status == "PAUSED":
        log.info("RecBole seed %d paused by its time budget: %s; the same command continues it", settings["seed"],
                 payload)
        return None
    return json.loads(payload)


def recbole_settings(seed: int, epochs: int, device: str, checkpoint_dir: Path) -> dict:
    """RecBole's configuration for its SASRec on ml-100k under the shared protocol (its defaults elsewhere)."""
    return {
        "dataset": "ml-100k", "checkpoint_dir": str(checkpoint_dir),
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


def run_recbole(source: Path, venv: Path, work: Path, seed: int, epochs: int, device: str, progress: Path,
                time_budget: float | None = None, wheels: Path | None = None) -> dict | None:
    """Train and test RecBole's SASRec on ml-100k at its defaults plus the shared protocol (see `drive_recbole`)."""
    python = recbole_python(venv, wheels)
    recbole_ml100k(python, source)
    run_dir = work / f"{side_name('recbole', epochs)}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    settings = recbole_settings(seed, epochs, device, run_dir / "saved")
    result = drive_recbole(python, settings, progress, time_budget, run_dir)
    return None if result is None else {**result, "settings": settings}


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


def stored(output: Path, side: str, seed: int) -> bool:
    """Whether `output` holds the run of `side` with `seed` (it is then not run again; delete it there to rerun)."""
    done = output.exists() and str(seed) in json.loads(output.read_text()).get("runs", {}).get(side, {})
    if done:
        log.info("%s seed %d is stored in %s: not run again", side, seed, output)
    return done


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
    parser.add_argument("--progress", type=Path, default=RESULTS / "recbole_progress",
                        help="where a RecBole run keeps its state after every epoch, and continues from (committed "
                             "while a run is unfinished, so that a later session carries it on)")
    parser.add_argument("--time-budget", type=float, help="seconds: a RecBole run pauses after the epoch past which "
                                                          "another would not fit; rerun to continue")
    parser.add_argument("--output", type=Path, default=RESULTS / "recbole_side_by_side.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    recbole, ours = side_name("recbole", args.epochs), side_name("m2rec", args.epochs)
    for seed in range(args.seed, args.seed + args.seeds):
        if args.only in (None, "recbole") and not stored(args.output, recbole, seed):
            progress = args.progress / f"{recbole}-seed{seed}.pt"
            run = run_recbole(args.dataset, args.venv, args.work, seed, args.epochs, args.device, progress,
                              args.time_budget, args.wheels)
            if run is not None:
                merge(args.output, recbole, seed, run, command)
                progress.unlink()
        if args.only in (None, "m2rec") and not stored(args.output, ours, seed):
            run = run_m2rec(args.dataset, args.work, seed, args.epochs, args.window_stride, args.batch_unit,
                            args.device)
            merge(args.output, ours, seed, run, command)
    if args.output.exists():
        print(json.dumps(json.loads(args.output.read_text())["summary"], indent=2))


if __name__ == "__main__":
    main()
