"""Build any of the models by name, and save/load them as safetensors + JSON config (no pickle)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from m2rec.errors import ConfigError
from m2rec.model.base import SequentialRecommender
from m2rec.model.config import MODEL_TYPES, ModelParams
from m2rec.model.files import CONFIG_FILE, WEIGHTS_FILE

# ModelParams fields added after models were saved, with the value those models were trained with: a saved config
# without the field loads as the model it was, not as today's default.
SAVED_BEFORE_SETTINGS = {"text_in_sequence": False}


def build_model(model_type: str, num_items: int, params: ModelParams,
                item_text_embeddings: torch.Tensor | None = None) -> SequentialRecommender:
    """A fresh model of `model_type` over items 1..num_items."""
    from m2rec.model.m2rec_model import M2Rec
    from m2rec.model.mamba4rec import Mamba4Rec
    from m2rec.model.sasrec import SASRec
    from m2rec.model.sasrec_text import SASRecText

    if model_type == "m2rec":
        return M2Rec(num_items, params, item_text_embeddings if params.use_text else None)
    if model_type == "sasrec":
        return SASRec(num_items, params)
    if model_type == "sasrec_text":
        return SASRecText(num_items, params, item_text_embeddings)
    if model_type == "mamba4rec":
        return Mamba4Rec(num_items, params)
    raise ConfigError(f"unknown model {model_type!r}", f"choose one of {', '.join(MODEL_TYPES)}")


def save_model(directory: str | Path, model: SequentialRecommender, params: ModelParams, extra: dict) -> None:
    """Write weights (safetensors) and the config needed to rebuild the model."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE))
    config = {"model_type": model.model_type, "num_items": model.num_items,
              "model_params": dataclasses.asdict(params), **extra}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, default=str))


def read_model_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_model(directory: str | Path, device: str | torch.device = "cpu") -> SequentialRecommender:
    """Rebuild a saved model from its config and safetensors weights (safe: no unpickling)."""
    directory = Path(directory)
    config = read_model_config(directory)
    state = load_file(str(directory / WEIGHTS_FILE), device=str(device))
    params = ModelParams(**{**SAVED_BEFORE_SETTINGS, **config["model_params"]})
    model = build_model(config["model_type"], config["num_items"], params, state.get("item_text"))
    model.load_state_dict(state)
    return model.to(device).eval()
