"""Low-level parsing shared by the readers: decoding, field splitting and numeric columns with line numbers."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from m2rec.data.errors import DataError


def require_file(path: Path, what: str, fix: str) -> Path:
    """Return `path` if it is a file, else raise a DataError naming `what` is missing."""
    if not path.is_file():
        raise DataError(f"missing {what} (expected file {path})", fix)
    return path


def read_lines(path: Path, encoding: str) -> list[str]:
    """Decode a text file; a decoding failure names the line and suggests `--encoding`."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise DataError(
            f"cannot decode byte {raw[err.start]:#x} as {encoding}",
            "convert the file to UTF-8 or pass the right --encoding (MovieLens 100K/1M files are latin-1)",
            path=str(path),
            line=line,
        ) from None
    return text.splitlines()


def split_fields(
    path: Path, lines: list[str], sep: str, n_fields: int | None, *, skip_first: bool = False
) -> tuple[list[list[str]], list[int]]:
    """Split each non-empty line on `sep`; return the rows and their 1-based line numbers."""
    rows: list[list[str]] = []
    line_numbers: list[int] = []
    for number, line in enumerate(lines, start=1):
        if (skip_first and number == 1) or not line.strip():
            continue
        parts = line.rstrip("\r").split(sep)
        if n_fields is not None and len(parts) != n_fields:
            raise DataError(
                f"expected {n_fields} fields separated by {sep!r}, found {len(parts)}",
                "repair or delete that line, or check that --format matches the file",
                path=str(path),
                line=number,
            )
        rows.append(parts)
        line_numbers.append(number)
    if not rows:
        raise DataError("the file has no data rows", "point --input at a non-empty file", path=str(path))
    return rows, line_numbers


def _refuse_first_bad_line(
    bad: np.ndarray, describe: Callable[[int], str], line_numbers: np.ndarray | list[int], path: Path
) -> None:
    """Raise a DataError for the first row flagged in `bad` (bool array), with `describe(row)` and its line number."""
    rows = np.flatnonzero(bad)
    if len(rows):
        first = int(rows[0])
        raise DataError(describe(first), "repair or delete that line", path=str(path), line=int(line_numbers[first]))


def numeric_column(
    values: pd.Series, line_numbers: np.ndarray | list[int], path: Path, column: str
) -> pd.Series:
    """Parse `values` as numbers; the first unparseable one is reported with its line number."""
    parsed = pd.to_numeric(values, errors="coerce")
    _refuse_first_bad_line(parsed.isna().to_numpy(),
                           lambda row: f"column {column!r} must be numeric, found {values.iloc[row]!r}",
                           line_numbers, path)
    return parsed


def unix_seconds_to_utc(
    values: pd.Series, line_numbers: np.ndarray | list[int], path: Path, column: str = "timestamp"
) -> pd.Series:
    """Turn unix seconds (numbers or digit strings) into UTC datetimes, rejecting negatives with a line number."""
    seconds = numeric_column(values, line_numbers, path, column)
    _refuse_first_bad_line((seconds < 0).to_numpy(),
                           lambda row: f"column {column!r} must be a non-negative unix time in seconds, "
                                       f"found {seconds.iloc[row]}",
                           line_numbers, path)
    return pd.to_datetime(seconds.astype("float64"), unit="s", utc=True).reset_index(drop=True)


def synthetic_timestamps(positions: np.ndarray) -> pd.Series:
    """Timestamps for order-only data: position p of a user's sequence becomes 2000-01-01 + p days (UTC)."""
    base = pd.Timestamp("2000-01-01", tz="UTC")
    return pd.Series(base + pd.to_timedelta(positions, unit="D"))
