"""Readers for the supported input formats; each returns a RawDataset with original ids and UTC timestamps."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd

from m2rec.errors import DataError, UsageError
from m2rec.data.parsing import (
    numeric_column,
    read_lines,
    require_file,
    split_fields,
    synthetic_timestamps,
    unix_seconds_to_utc,
)
from m2rec.data.schema import RawDataset

ML100K_GENRES = (
    "unknown Action Adventure Animation Children's Comedy Crime Documentary Drama Fantasy Film-Noir Horror "
    "Musical Mystery Romance Sci-Fi Thriller War Western"
).split()
_YEAR = re.compile(r"\((\d{4})\)\s*$")


def movie_text(title: str, genres: list[str], tags: list[str] | None = None) -> str:
    """The text a language model embeds for a movie: title (with year), genres and user tags."""
    text = f"{title}. Genres: {', '.join(genres) if genres else 'unknown'}."
    if tags:
        text += f" Tags: {', '.join(tags)}."
    return text


def _movies_frame(ids: list[str], titles: list[str], genres: list[list[str]], tags=None) -> pd.DataFrame:
    years = [int(m.group(1)) if (m := _YEAR.search(t)) else None for t in titles]
    tag_lists = [tags.get(i, []) for i in ids] if tags else [None] * len(ids)
    return pd.DataFrame(
        {
            "item_id": ids,
            "text": [movie_text(t, g, tg) for t, g, tg in zip(titles, genres, tag_lists)],
            "title": titles,
            "year": pd.array(years, dtype="Int64"),
            "genres": ["|".join(g) for g in genres],
        }
    )


def _interactions(users, items, timestamps) -> pd.DataFrame:
    return pd.DataFrame(
        {"user_id": pd.Series(users, dtype=str).to_numpy(), "item_id": pd.Series(items, dtype=str).to_numpy(),
         "timestamp": timestamps}
    )


def _ratings_table(path: Path, lines: list[str], sep: str, skip_first: bool) -> pd.DataFrame:
    """user, item, rating, unix-time rows (MovieLens u.data / ratings.dat / ratings.csv)."""
    rows, numbers = split_fields(path, lines, sep, 4, skip_first=skip_first)
    frame = pd.DataFrame(rows, columns=["user", "item", "rating", "ts"])
    numeric_column(frame["user"], numbers, path, "user_id")
    numeric_column(frame["item"], numbers, path, "item_id")
    numeric_column(frame["rating"], numbers, path, "rating")
    return _interactions(frame["user"].str.strip(), frame["item"].str.strip(),
                         unix_seconds_to_utc(frame["ts"].str.strip(), numbers, path))


def read_movielens(root: Path, encoding: str | None = None) -> RawDataset:
    """MovieLens 100K (u.data, u.item), 1M (ratings.dat, movies.dat) or ml-latest CSV (ratings.csv, movies.csv)."""
    if not root.is_dir():
        raise DataError(f"--input {root} is not a directory", "point --input at the unpacked MovieLens folder")
    if (root / "u.data").exists():
        return _read_ml100k(root, encoding or "latin-1")
    if (root / "ratings.dat").exists():
        return _read_ml1m(root, encoding or "latin-1")
    if (root / "ratings.csv").exists():
        return _read_ml_latest(root, encoding or "utf-8")
    raise DataError(
        f"no MovieLens ratings file in {root} (looked for u.data, ratings.dat, ratings.csv)",
        "point --input at an unpacked MovieLens 100K, 1M or ml-latest folder",
    )


def _read_ml100k(root: Path, encoding: str) -> RawDataset:
    data_path = root / "u.data"
    interactions = _ratings_table(data_path, read_lines(data_path, encoding), "\t", False)
    item_path = require_file(root / "u.item", "MovieLens 100K item file u.item", "copy u.item next to u.data")
    rows, numbers = split_fields(item_path, read_lines(item_path, encoding), "|", 5 + len(ML100K_GENRES))
    ids = [r[0] for r in rows]
    numeric_column(pd.Series(ids), numbers, item_path, "movie id")
    genres = [[g for g, flag in zip(ML100K_GENRES, r[5:]) if flag.strip() == "1"] for r in rows]
    items = _movies_frame(ids, [r[1] for r in rows], genres)
    items["release_date"] = [r[2] for r in rows]
    return RawDataset(interactions, items, source="movielens-100k")


def _read_ml1m(root: Path, encoding: str) -> RawDataset:
    data_path = root / "ratings.dat"
    interactions = _ratings_table(data_path, read_lines(data_path, encoding), "::", False)
    movie_path = require_file(root / "movies.dat", "MovieLens 1M item file movies.dat", "copy movies.dat next to ratings.dat")
    rows, _ = split_fields(movie_path, read_lines(movie_path, encoding), "::", 3)
    items = _movies_frame([r[0] for r in rows], [r[1] for r in rows], [r[2].split("|") for r in rows])
    return RawDataset(interactions, items, source="movielens-1m")


def _read_csv(path: Path, encoding: str, required: list[str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path, dtype=str, encoding=encoding, keep_default_na=False)
    except UnicodeDecodeError:
        read_lines(path, encoding)  # raises a DataError with the line number
        raise
    except pd.errors.ParserError as err:
        raise DataError(f"cannot parse CSV ({err})", "repair the line named above", path=str(path)) from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"missing column(s) {missing}; found {list(frame.columns)}",
            f"the header must name {required}",
            path=str(path),
        )
    return frame


def _read_ml_latest(root: Path, encoding: str) -> RawDataset:
    ratings_path = root / "ratings.csv"
    ratings = _read_csv(ratings_path, encoding, ["userId", "movieId", "rating", "timestamp"])
    numbers = np.arange(len(ratings)) + 2  # header is line 1
    numeric_column(ratings["userId"], numbers, ratings_path, "userId")
    numeric_column(ratings["movieId"], numbers, ratings_path, "movieId")
    interactions = _interactions(ratings["userId"], ratings["movieId"],
                                 unix_seconds_to_utc(ratings["timestamp"], numbers, ratings_path))
    movies_path = require_file(root / "movies.csv", "ml-latest item file movies.csv", "copy movies.csv next to ratings.csv")
    movies = _read_csv(movies_path, encoding, ["movieId", "title", "genres"])
    tags: dict[str, list[str]] = {}
    if (root / "tags.csv").exists():
        tag_frame = _read_csv(root / "tags.csv", encoding, ["movieId", "tag"])
        top = tag_frame.groupby(["movieId", "tag"]).size().rename("n").reset_index()
        top = top.sort_values(["movieId", "n"], ascending=[True, False]).groupby("movieId").head(10)
        tags = top.groupby("movieId")["tag"].agg(list).to_dict()
    genres = [[] if g == "(no genres listed)" else g.split("|") for g in movies["genres"]]
    items = _movies_frame(list(movies["movieId"]), list(movies["title"]), genres, tags)
    return RawDataset(interactions, items, source="movielens-latest")


def _recbole_header(path: Path, lines: list[str]) -> list[str]:
    header = lines[0].split("\t") if lines else []
    if not header or not all(":" in h for h in header):
        raise DataError(
            "the first line must be a RecBole header of name:type fields (e.g. user_id:token)",
            "add the header line RecBole atomic files start with",
            path=str(path),
            line=1,
        )
    return [h.split(":", 1)[0].strip() for h in header]


def read_recbole(path: Path, encoding: str | None = None) -> RawDataset:
    """RecBole atomic files: `<name>.inter` (user_id, item_id, optional timestamp) and optional `<name>.item`."""
    encoding = encoding or "utf-8"
    if path.is_dir():
        inter_files = sorted(path.glob("*.inter"))
        if len(inter_files) != 1:
            raise DataError(
                f"expected exactly one .inter file in {path}, found {len(inter_files)}",
                "point --input at the .inter file itself",
            )
        path = inter_files[0]
    require_file(path, "RecBole interaction file (.inter)", "point --input at a .inter file or its folder")
    lines = read_lines(path, encoding)
    names = _recbole_header(path, lines)
    for needed in ("user_id", "item_id"):
        if needed not in names:
            raise DataError(f"the header has no {needed!r} field (fields: {names})",
                            f"name the column {needed}:token", path=str(path), line=1)
    rows, numbers = split_fields(path, lines, "\t", len(names), skip_first=True)
    frame = pd.DataFrame(rows, columns=names)
    synthetic = "timestamp" not in names
    if synthetic:
        timestamps = synthetic_timestamps(frame.groupby("user_id").cumcount().to_numpy())
    else:
        timestamps = unix_seconds_to_utc(frame["timestamp"], numbers, path)
    interactions = _interactions(frame["user_id"], frame["item_id"], timestamps)
    item_path = path.with_suffix(".item")
    if item_path.exists():
        item_lines = read_lines(item_path, encoding)
        item_names = _recbole_header(item_path, item_lines)
        if "item_id" not in item_names:
            raise DataError("the header has no 'item_id' field", "name the column item_id:token",
                            path=str(item_path), line=1)
        item_rows, _ = split_fields(item_path, item_lines, "\t", len(item_names), skip_first=True)
        items = pd.DataFrame(item_rows, columns=item_names)
        text_fields = [n for n in item_names if n != "item_id"]
        items["text"] = [
            ". ".join(f"{n}: {v}" for n, v in zip(text_fields, values) if v.strip())
            for values in items[text_fields].itertuples(index=False)
        ]
    else:
        items = pd.DataFrame({"item_id": interactions["item_id"].unique(), "text": ""})
    return RawDataset(interactions, items, source=f"recbole:{path.stem}", timestamps_synthetic=synthetic)


def read_sequences(path: Path, items_path: Path | None = None, encoding: str | None = None) -> RawDataset:
    """One user a line (`user item item ...`, chronological) plus an item table (`item_id<TAB>text`)."""
    encoding = encoding or "utf-8"
    if path.is_dir():
        folder = path
        path = require_file(folder / "sequences.txt", "sequence file sequences.txt",
                            "name it sequences.txt or point --input at the file")
        items_path = items_path or folder / "items.tsv"
    require_file(path, "sequence file", "point --input at a file with one `user item item ...` line per user")
    users, item_ids, positions = [], [], []
    rows, numbers = split_fields(path, read_lines(path, encoding), " ", None)
    for parts, number in zip(rows, numbers):
        parts = [p for p in parts if p]
        if len(parts) < 2:
            raise DataError("a line needs a user id followed by at least one item id",
                            "repair or delete that line", path=str(path), line=number)
        users.extend([parts[0]] * (len(parts) - 1))
        item_ids.extend(parts[1:])
        positions.extend(range(len(parts) - 1))
    interactions = _interactions(users, item_ids, synthetic_timestamps(np.asarray(positions)))
    if items_path is None or not items_path.exists():
        raise DataError(f"missing item table {items_path}",
                        "give an `item_id<TAB>text` file with --items (or items.tsv beside sequences.txt)")
    item_lines = read_lines(items_path, encoding)
    first = item_lines[0].split("\t")[0].strip().lower() if item_lines else ""
    has_header = ":" in first or first in {"item_id", "item", "id"}
    item_rows, _ = split_fields(items_path, item_lines, "\t", 2, skip_first=has_header)
    items = pd.DataFrame({"item_id": [r[0].strip() for r in item_rows], "text": [r[1].strip() for r in item_rows]})
    items["title"] = items["text"]
    return RawDataset(interactions, items, source=f"sequences:{path.name}", timestamps_synthetic=True)


def parse_mapping(spec: str | None, option: str) -> dict[str, str]:
    """Parse `canonical=source,...` column mappings given on the command line."""
    mapping: dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise UsageError(f"{option} entry {part!r} is not canonical=source",
                             f"write {option} user_id=uid,item_id=iid,timestamp=ts")
        key, value = part.split("=", 1)
        mapping[key.strip()] = value.strip()
    return mapping


def _read_any_table(path: Path, encoding: str) -> pd.DataFrame:
    require_file(path, "table", "point --input at a .parquet or .csv file")
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return _read_csv(path, encoding, [])


def read_table(
    path: Path,
    columns: str | None,
    items_path: Path | None = None,
    item_columns: str | None = None,
    encoding: str | None = None,
) -> RawDataset:
    """Any parquet or CSV table with a column mapping (`user_id=...,item_id=...,timestamp=...`)."""
    encoding = encoding or "utf-8"
    mapping = {"user_id": "user_id", "item_id": "item_id", "timestamp": "timestamp"} | parse_mapping(columns, "--columns")
    frame = _read_any_table(path, encoding)
    for canonical, source in mapping.items():
        if source not in frame.columns:
            raise DataError(f"column {source!r} (for {canonical}) not found; columns are {list(frame.columns)}",
                            f"pass --columns {canonical}=<column name>", path=str(path))
    numbers = np.arange(len(frame)) + (2 if path.suffix != ".parquet" else 1)
    raw_ts = frame[mapping["timestamp"]]
    if pd.api.types.is_datetime64_any_dtype(raw_ts):
        timestamps = pd.to_datetime(raw_ts, utc=True).reset_index(drop=True)
    elif pd.to_numeric(raw_ts, errors="coerce").notna().all():
        timestamps = unix_seconds_to_utc(raw_ts, numbers, path, mapping["timestamp"])
    else:
        parsed = pd.to_datetime(raw_ts, utc=True, errors="coerce", format="mixed")
        bad = np.flatnonzero(parsed.isna().to_numpy())
        if len(bad):
            raise DataError(f"column {mapping['timestamp']!r} has a value that is neither unix seconds nor a "
                            f"date: {raw_ts.iloc[bad[0]]!r}", "repair or delete that row",
                            path=str(path), line=int(numbers[bad[0]]))
        timestamps = parsed.reset_index(drop=True)
    interactions = _interactions(frame[mapping["user_id"]].astype(str), frame[mapping["item_id"]].astype(str),
                                 timestamps)
    items = read_table_items(items_path, item_columns, encoding, interactions["item_id"].unique())
    return RawDataset(interactions, items, source=f"table:{path.name}")


def read_table_items(items_path: Path | None, item_columns: str | None, encoding: str | None,
                     item_ids: np.ndarray) -> pd.DataFrame:
    """The item table of a `table` source (`--item-columns item_id=...,text=COL[+COL...]`), or, without one, the
    interacted `item_ids` with empty texts."""
    if items_path is None:
        return pd.DataFrame({"item_id": item_ids, "text": ""})
    item_map = {"item_id": "item_id", "text": "text"} | parse_mapping(item_columns, "--item-columns")
    item_frame = _read_any_table(items_path, encoding or "utf-8")
    text_sources = item_map["text"].split("+")
    for source in [item_map["item_id"], *text_sources]:
        if source not in item_frame.columns:
            raise DataError(f"column {source!r} not found; columns are {list(item_frame.columns)}",
                            "pass --item-columns item_id=<column>,text=<column>[+<column>...]",
                            path=str(items_path))
    items = item_frame.rename(columns={item_map["item_id"]: "item_id"})
    items["item_id"] = items["item_id"].astype(str)
    items["text"] = [". ".join(str(v) for v in values if str(v).strip())
                     for values in item_frame[text_sources].itertuples(index=False)]
    return items
