"""Item-text embeddings are cached chunk by chunk: a run killed halfway resumes without embedding again."""

from __future__ import annotations

import numpy as np
import pytest

from m2rec.text import embeddings
from m2rec.text.embeddings import TextEncoderParams, embed_texts


class CountingEncoder:
    """Stands in for the transformer: a text's vector is its length, and every embedded text is counted."""

    embedded: list[str] = []
    fail_after: int | None = None

    def __init__(self, params):
        pass

    def encode(self, texts: list[str], progress: bool = True) -> np.ndarray:
        if self.fail_after is not None and len(self.embedded) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        CountingEncoder.embedded += texts
        return np.array([[len(t), 1.0] for t in texts], dtype=np.float32)


def test_a_killed_embedding_run_resumes_from_the_chunks_it_saved(tmp_path, monkeypatch):
    monkeypatch.setattr(embeddings, "TextEncoder", CountingEncoder)
    monkeypatch.setattr(embeddings, "SAVE_EVERY", 3)
    params = TextEncoderParams(cache_dir=str(tmp_path))
    texts = [f"item {'x' * i}" for i in range(10)]
    CountingEncoder.fail_after = 6  # two chunks of three, then the process dies
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, params)
    assert len(CountingEncoder.embedded) == 6
    CountingEncoder.fail_after = None
    vectors = embed_texts(texts, params)
    assert len(CountingEncoder.embedded) == 10  # only the 4 texts not saved before the kill
    np.testing.assert_array_equal(vectors[:, 0], [len(t) for t in texts])
    embed_texts(texts, params)
    assert len(CountingEncoder.embedded) == 10  # all cached now
