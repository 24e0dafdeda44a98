"""Hyperparameters live in `params.yaml`; each section maps onto a dataclass owned by the module that uses it."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar

import yaml

from m2rec.data.errors import DataError

T = TypeVar("T")


def read_params(path: str | Path | None) -> dict[str, Any]:
    """Load a params.yaml into a dict (empty when `path` is None)."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise DataError(f"params file {path} not found", "pass --params pointing at a params.yaml")
    content = yaml.safe_load(path.read_text()) or {}
    if not isinstance(content, dict):
        raise DataError("params file must hold a mapping of sections", "see params.yaml in the repository",
                        path=str(path))
    return content


def section(params: dict[str, Any], name: str, cls: type[T], **overrides: Any) -> T:
    """Build dataclass `cls` from `params[name]`, then apply non-None `overrides` (e.g. CLI options)."""
    values = dict(params.get(name) or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise DataError(f"unknown key(s) {unknown} in params section {name!r}",
                        f"use only {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**values)
