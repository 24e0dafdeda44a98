"""Stages: train a model on a prepared dataset, and evaluate a saved one."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from m2rec.data.prepared import SEQUENCE_COLUMNS, PreparedDataset
from m2rec.evaluation.metrics import metrics_from_ranks, rank_targets
from m2rec.model.base import SequentialRecommender
from m2rec.model.config import ModelParams, uses_text
from m2rec.model.factory import build_model, load_model, read_model_config, save_model
from m2rec.model.files import HISTORY_FILE, ITEMS_FILE, METRICS_FILE
from m2rec.text.embeddings import TextEncoderParams, embed_texts
from m2rec.training.trainer import (TrainParams, TrainResult, choose_device, is_main_process, item_counts,
                                    train_model)
from m2rec.utils.atomic import atomic_write_json

log = logging.getLogger(__name__)


def item_text_matrix(items: pd.DataFrame, embeddings: np.ndarray) -> torch.Tensor:
    """Place each item's text embedding at its item_idx row -> (num_items + 1, T); row 0 (padding) is zero."""
    matrix = torch.zeros(int(items["item_idx"].max()) + 1, embeddings.shape[1])
    matrix[torch.as_tensor(items["item_idx"].to_numpy())] = torch.as_tensor(embeddings)
    return matrix


def evaluate_split(model: SequentialRecommender, data: PreparedDataset, split: str, mask_history: bool = False,
                   batch_size: int = 512) -> tuple[dict[str, float], np.ndarray]:
    """Full-ranking metrics on the `valid` or `test` targets, and the per-user 0-based ranks."""
    histories, targets = data.histories(split)
    device = next(model.parameters()).device
    ranks = rank_targets(model, histories, targets, batch_size, mask_history, device, progress=True)
    return metrics_from_ranks(ranks), ranks


def features_from_store(feature_repo: str | Path, data: PreparedDataset) -> tuple[list[np.ndarray], np.ndarray]:
    """Training sequences (as of each user's last training event) and item text embeddings (items.parquet
    order) from the Feast offline store."""
    from m2rec.features.store import FeatureClient
    from m2rec.features.tables import split_cutoffs

    client = FeatureClient(feature_repo)
    rows = client.training_sequences(split_cutoffs(data.interactions, "train")).sort_values("user_idx")
    sequences = [np.asarray(s, dtype=np.int64) for s in rows["item_sequence"]]
    item_idx, embeddings = client.item_embeddings()
    position = pd.Series(np.arange(len(item_idx)), index=item_idx)
    log.info("read %d training sequences and %d item embeddings from the feature store %s", len(sequences),
             len(item_idx), feature_repo)
    return sequences, embeddings[position.loc[data.items["item_idx"]].to_numpy()]


def text_matrix(data: PreparedDataset, model_type: str, model_params: ModelParams, text_params: TextEncoderParams,
                item_text_embeddings: np.ndarray | None = None) -> torch.Tensor | None:
    """The (num_items + 1, T) text matrix when the model uses item text (computed and cached if not given)."""
    if not uses_text(model_type, model_params):
        return None
    if item_text_embeddings is None:
        item_text_embeddings = embed_texts(data.items["text"].tolist(), text_params)
    return item_text_matrix(data.items, item_text_embeddings)


def fit(data: PreparedDataset, model_type: str, model_params: ModelParams, train_params: TrainParams,
        checkpoint_dir: str | Path, text: torch.Tensor | None = None, resume: bool = False,
        train_sequences: list[np.ndarray] | None = None) -> tuple[SequentialRecommender, TrainResult]:
    """Build and train a model on `data` (or on `train_sequences` instead of its training split), selecting
    the epoch by validation NDCG@10; returns the model with its best weights and the training record."""
    torch.manual_seed(train_params.seed)
    model = build_model(model_type, data.num_items, model_params, text)
    log.info("training %s (%d parameters) on %d users, %d items", model_type,
             sum(p.numel() for p in model.parameters() if p.requires_grad), data.num_users, data.num_items)
    valid_histories, valid_targets = data.histories("valid")
    sequences = data.train_sequences() if train_sequences is None else train_sequences
    result = train_model(model, sequences, valid_histories, valid_targets, train_params, checkpoint_dir,
                         resume=resume)
    return model, result


def train(
    data_dir: str | Path,
    output_dir: str | Path,
    model_type: str = "m2rec",
    model_params: ModelParams | None = None,
    train_params: TrainParams | None = None,
    text_params: TextEncoderParams | None = None,
    resume: bool = False,
    feature_repo: str | Path | None = None,
) -> dict:
    """Train `model_type` on the dataset in `data_dir`; write weights, config, id maps, history and metrics to
    `output_dir`; return the metrics. With `feature_repo` (built by `m2rec features build`), the training
    sequences and item text embeddings are read through Feast's offline store, point-in-time correct; without
    it they come from the tables and the (cached) text encoder."""
    model_params, train_params = model_params or ModelParams(), train_params or TrainParams()
    text_params = text_params or TextEncoderParams()
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    data = PreparedDataset.load(data_dir, None if feature_repo else SEQUENCE_COLUMNS)  # entity rows need user ids
    sequences, embeddings = features_from_store(feature_repo, data) if feature_repo else (None, None)
    text = text_matrix(data, model_type, model_params, text_params, embeddings)
    model, result = fit(data, model_type, model_params, train_params, output, text, resume=resume,
                        train_sequences=sequences)
    if not is_main_process():  # rank 0 of a data-parallel run evaluates and writes
        return {"best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    valid, _ = evaluate_split(model, data, "valid", train_params.mask_history, train_params.eval_batch_size)
    test, _ = evaluate_split(model, data, "test", train_params.mask_history, train_params.eval_batch_size)
    metrics = {
        "model_type": model_type, "valid": valid, "test": test, "best_epoch": result.best_epoch,
        "epochs_run": result.epochs_run, "train_seconds": result.train_seconds,
        "dataset_version": data.stats["dataset_version"], "mask_history": train_params.mask_history,
    }
    save_model(output, model.cpu(), model_params, {
        "dataset_version": data.stats["dataset_version"], "text_model": text_params.model if text is not None
        else None, "train_params": train_params.__dict__,
    })
    keep = [c for c in ("item_id", "item_idx", "title", "text") if c in data.items.columns]
    train_counts = item_counts(data.train_sequences(), data.num_items).numpy()  # (I+1,)
    catalog = data.items[keep].assign(train_count=train_counts[data.items["item_idx"].to_numpy()])
    catalog.to_parquet(output / ITEMS_FILE, index=False)  # id map, titles and popularity for serving
    atomic_write_json(output / HISTORY_FILE, result.history)
    atomic_write_json(output / METRICS_FILE, metrics)
    log.info("test: %s", ", ".join(f"{k} {v:.4f}" for k, v in test.items() if k.endswith("@10")))
    return metrics


def evaluate(model_dir: str | Path, data_dir: str | Path, mask_history: bool = False,
             output: str | Path | None = None) -> dict:
    """Recompute validation and test metrics of a saved model on `data_dir`; optionally write them as JSON."""
    config = read_model_config(model_dir)
    data = PreparedDataset.load(data_dir, SEQUENCE_COLUMNS)
    if config.get("dataset_version") != data.stats["dataset_version"]:
        log.warning("model was trained on dataset %s, evaluating on %s", config.get("dataset_version"),
                    data.stats["dataset_version"])
    model = load_model(model_dir, choose_device("auto"))
    metrics = {
        "model_type": config["model_type"],
        "valid": evaluate_split(model, data, "valid", mask_history)[0],
        "test": evaluate_split(model, data, "test", mask_history)[0],
        "dataset_version": data.stats["dataset_version"], "mask_history": mask_history,
    }
    if output is not None:
        atomic_write_json(output, metrics)
    return metrics

