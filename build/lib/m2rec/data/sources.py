"""Dispatch `--format` to the right reader."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from m2rec.errors import DataError, UsageError
from m2rec.data.readers import read_movielens, read_recbole, read_sequences, read_table
from m2rec.data.schema import RawDataset
from m2rec.data.synthetic import SyntheticParams, generate_synthetic

FORMATS = ("synthetic", "movielens", "recbole", "sequences", "table")


@dataclass
class SourceSpec:
    """Where raw data comes from and how to read it."""

    format: str = "synthetic"
    input: str | None = None  # file or folder; unused for synthetic
    items: str | None = None  # item table for `sequences` / `table`
    columns: str | None = None  # `table`: user_id=...,item_id=...,timestamp=...
    item_columns: str | None = None  # `table`: item_id=...,text=...[+...]
    encoding: str | None = None


def read_source(spec: SourceSpec, synthetic: SyntheticParams | None = None) -> RawDataset:
    """Read raw interactions and items as described by `spec`."""
    if spec.format not in FORMATS:
        raise UsageError(f"unknown --format {spec.format!r}", f"use one of {', '.join(FORMATS)}")
    if spec.format == "synthetic":
        return generate_synthetic(synthetic)
    if not spec.input:
        raise UsageError(f"--format {spec.format} needs --input", "pass --input PATH")
    path = Path(spec.input).expanduser()
    if not path.exists():
        raise DataError(f"--input {path} does not exist", "check the path (datasets are read where they lie)")
    items = Path(spec.items).expanduser() if spec.items else None
    if spec.format == "movielens":
        return read_movielens(path, spec.encoding)
    if spec.format == "recbole":
        return read_recbole(path, spec.encoding)
    if spec.format == "sequences":
        return read_sequences(path, items, spec.encoding)
    return read_table(path, spec.columns, items, spec.item_columns, spec.encoding)
