"""Shared fixtures: paths to the real datasets and small prepared datasets built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("M2REC_DATASETS", REPO.parent / "shared" / "datasets"))


def dataset_path(name: str) -> Path:
    """Path of a shared real dataset; the test fails (not skips) when it is missing, since CI has it."""
    path = DATASETS / name
    assert path.exists(), f"real dataset {path} is missing (set M2REC_DATASETS to the folder holding it)"
    return path


@pytest.fixture(scope="session")
def ml100k_dir() -> Path:
    return dataset_path("ml-100k")


@pytest.fixture(scope="session")
def amazon_games_dir() -> Path:
    return dataset_path("amazon-games")


@pytest.fixture(scope="session")
def tiny_synthetic(tmp_path_factory) -> Path:
    """A small prepared synthetic dataset (about 120 users) shared by model, training and stage tests."""
    from m2rec.data.sources import SourceSpec
    from m2rec.data.synthetic import SyntheticParams
    from m2rec.stages.prepare import prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(SourceSpec("synthetic"), out, synthetic=SyntheticParams(n_users=120, n_items=80, max_length=30))
    return out
