"""`m2rec train` and `m2rec evaluate`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from m2rec.model.config import MODEL_TYPES, ModelParams
from m2rec.params import read_params, section
from m2rec.text.embeddings import TextEncoderParams
from m2rec.training.trainer import TrainParams


@click.command("train")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True), help="Prepared dataset folder.")
@click.option("--model", "model_type", type=click.Choice(MODEL_TYPES), default="m2rec", show_default=True)
@click.option("--output", required=True, type=click.Path(), help="Folder for weights, config, metrics.")
@click.option("--params", "params_path", type=click.Path(), help="params.yaml (sections model, train, text).")
@click.option("--epochs", type=int, help="Override train.epochs.")
@click.option("--seed", type=int, help="Override train.seed.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Override train.device.")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint in --output.")
@click.option("--feature-repo", type=click.Path(exists=True),
              help="Read training sequences and item text embeddings through this Feast repo (offline store).")
@click.option("--feature-root", type=click.Path(exists=True, file_okay=False),
              help="Like --feature-repo, with the build of --data (and the `features`, `text` params) under ROOT.")
def train_command(data_dir, model_type, output, params_path, epochs, seed, device, resume, feature_repo,
                  feature_root) -> None:
    """Train a model; writes model.safetensors, config.json, items.parquet, history.json and metrics.json."""
    from m2rec.stages.train import train

    params = read_params(params_path)
    if feature_root and not feature_repo:
        from m2rec.features.repo import FeatureParams, build_key
        from m2rec.features.store import build_dir

        version = json.loads((Path(data_dir) / "stats.json").read_text())["dataset_version"]
        key = build_key(version, section(params, "features", FeatureParams), section(params, "text",
                                                                                     TextEncoderParams).model)
        feature_repo = build_dir(feature_root, key)
    metrics = train(
        data_dir, output, model_type,
        section(params, "model", ModelParams),
        section(params, "train", TrainParams, epochs=epochs, seed=seed, device=device),
        section(params, "text", TextEncoderParams),
        resume=resume,
        feature_repo=feature_repo,
    )
    click.echo(json.dumps({k: metrics[k] for k in ("valid", "test", "best_epoch") if k in metrics}, indent=2))


@click.command("evaluate")
@click.option("--model-dir", required=True, type=click.Path(exists=True), help="A trained model folder.")
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True), help="Prepared dataset folder.")
@click.option("--mask-history", is_flag=True, help="Do not rank items the user already interacted with.")
@click.option("--output", type=click.Path(), help="Write the metrics JSON here.")
def evaluate_command(model_dir, data_dir, mask_history, output) -> None:
    """Recompute validation and test metrics (full ranking, HR/NDCG/MRR at 5, 10, 20) of a saved model."""
    from m2rec.stages.train import evaluate

    click.echo(json.dumps(evaluate(model_dir, data_dir, mask_history, output), indent=2))
