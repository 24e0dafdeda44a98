"""Readers, k-core filtering, the split, real datasets and every bad-input case of the data layer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from m2rec.data.errors import DataError
from m2rec.data.prepare import PrepareParams, build_tables, k_core_filter
from m2rec.data.prepared import PreparedDataset
from m2rec.data.sources import SourceSpec, read_source
from m2rec.data.synthetic import SyntheticParams, generate_synthetic
from m2rec.stages.prepare import prepare

LOOSE = PrepareParams(k_core_users=3, k_core_items=1)


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def ml100k_files(root: Path, data_lines: list[str]) -> Path:
    write(root / "u.data", "\n".join(data_lines) + "\n")
    flags = "|".join(["0"] * 19)
    write(root / "u.item", "1|Amélie (2001)|01-Jan-2001||http://x|" + flags.replace("0", "1", 1)[:-1] + "0\n"
          "2|Heat (1995)|01-Jan-1995||http://x|" + flags + "\n", encoding="latin-1")
    return root


BASIC_RATINGS = ["1\t1\t5\t100", "1\t2\t4\t200", "1\t1\t3\t300", "2\t2\t5\t50", "2\t1\t4\t60", "2\t2\t1\t70"]


# --- readers on small files -------------------------------------------------------------------------------------

def test_movielens_100k_reader_builds_text_from_latin1_titles(tmp_path):
    raw = read_source(SourceSpec("movielens", str(ml100k_files(tmp_path, BASIC_RATINGS))))
    assert raw.source == "movielens-100k"
    assert list(raw.interactions.columns) == ["user_id", "item_id", "timestamp"]
    assert str(raw.interactions["timestamp"].dt.tz) == "UTC"
    amelie = raw.items.set_index("item_id").loc["1"]
    assert amelie["title"] == "Amélie (2001)" and amelie["year"] == 2001
    assert amelie["text"].startswith("Amélie (2001). Genres: unknown")


def test_movielens_1m_and_latest_layouts_are_detected(tmp_path):
    one_m = tmp_path / "ml1m"
    write(one_m / "ratings.dat", "1::10::5::978300760\n1::20::3::978302109\n")
    write(one_m / "movies.dat", "10::Toy Story (1995)::Animation|Comedy\n20::Heat (1995)::Action\n", "latin-1")
    raw = read_source(SourceSpec("movielens", str(one_m)))
    assert raw.source == "movielens-1m" and len(raw.interactions) == 2
    assert raw.items.set_index("item_id").loc["10", "genres"] == "Animation|Comedy"

    latest = tmp_path / "latest"
    write(latest / "ratings.csv", "userId,movieId,rating,timestamp\n1,10,4.0,1000\n2,10,3.5,2000\n")
    write(latest / "movies.csv", 'movieId,title,genres\n10,"Heat, The (1995)",Action|Crime\n')
    write(latest / "tags.csv", "userId,movieId,tag,timestamp\n1,10,heist,1\n2,10,heist,2\n2,10,noir,3\n")
    raw = read_source(SourceSpec("movielens", str(latest)))
    assert raw.source == "movielens-latest"
    assert raw.items.loc[0, "text"] == "Heat, The (1995). Genres: Action, Crime. Tags: heist, noir."


def test_recbole_reader_with_and_without_timestamps(tmp_path):
    write(tmp_path / "d.inter", "user_id:token\titem_id:token\ttimestamp:float\nu1\ta\t10\nu1\tb\t5\n")
    write(tmp_path / "d.item", "item_id:token\ttitle:token_seq\tbrand:token\na\tZelda\tNintendo\nb\tHalo\t\n")
    raw = read_source(SourceSpec("recbole", str(tmp_path)))
    assert not raw.timestamps_synthetic
    texts = raw.items.set_index("item_id")["text"]
    assert texts["a"] == "title: Zelda. brand: Nintendo" and texts["b"] == "title: Halo"

    write(tmp_path / "n" / "e.inter", "user_id:token\titem_id:token\nu1\ta\nu1\tb\n")
    raw = read_source(SourceSpec("recbole", str(tmp_path / "n" / "e.inter")))
    assert raw.timestamps_synthetic and raw.interactions["timestamp"].is_monotonic_increasing


def test_sequences_reader_synthesizes_ordered_timestamps(tmp_path):
    write(tmp_path / "sequences.txt", "7 3 1 2\n8 2 3\n")
    write(tmp_path / "items.tsv", "item_id:token\ttitle:token_seq\n1\tOne\n2\tTwo\n3\tThree\n")
    raw = read_source(SourceSpec("sequences", str(tmp_path)))
    assert raw.timestamps_synthetic
    user7 = raw.interactions[raw.interactions.user_id == "7"]
    assert list(user7.item_id) == ["3", "1", "2"] and user7.timestamp.is_monotonic_increasing
    assert raw.items.set_index("item_id").loc["2", "text"] == "Two"


def test_table_reader_maps_columns_and_parses_dates(tmp_path):
    pd.DataFrame({"uid": [1, 1], "iid": ["x", "y"], "when": ["2024-01-02T10:00:00Z", "2024-01-01"]}).to_csv(
        tmp_path / "t.csv", index=False)
    pd.DataFrame({"id": ["x", "y"], "name": ["Ex", "Why"], "kind": ["a", "b"]}).to_parquet(tmp_path / "i.parquet")
    raw = read_source(SourceSpec("table", str(tmp_path / "t.csv"), str(tmp_path / "i.parquet"),
                                 "user_id=uid,item_id=iid,timestamp=when", "item_id=id,text=name+kind"))
    assert raw.interactions["timestamp"].iloc[1] == pd.Timestamp("2024-01-01", tz="UTC")
    assert raw.items.set_index("item_id").loc["y", "text"] == "Why. b"


def test_synthetic_is_seeded_and_periodic():
    params = SyntheticParams(n_users=50, n_items=100, seed=3)
    first, second = generate_synthetic(params), generate_synthetic(params)
    pd.testing.assert_frame_equal(first.interactions, second.interactions)
    assert first.interactions["user_id"].nunique() == 50
    # the routine repeats weekly: a category 7 events later matches far more often than chance (1/12)
    category = first.items.set_index("item_id")["category"]
    matches = []
    for _, group in first.interactions.groupby("user_id"):
        cats = category.loc[group["item_id"]].to_numpy()
        matches.append(np.mean(cats[7:] == cats[:-7]))
    assert np.mean(matches) > 0.4
    assert first.items["text"].str.contains("Category: ").all()


# --- filtering and split ----------------------------------------------------------------------------------------

def test_k_core_is_iterative():
    # item c has 2 interactions; dropping it leaves user u2 with 2, which then drops item b below 2 ...
    frame = pd.DataFrame({"user_id": ["u1", "u1", "u2", "u2", "u2", "u3", "u3"],
                          "item_id": ["a", "b", "a", "b", "c", "a", "c"]})
    kept, rounds = k_core_filter(frame, 2, 3)
    assert set(kept["item_id"]) == {"a"} or kept.empty
    assert rounds >= 2


def test_split_is_leave_one_out_by_time_with_padding_free_ids(tmp_path):
    raw = read_source(SourceSpec("movielens", str(ml100k_files(tmp_path, BASIC_RATINGS))))
    table, items, stats = build_tables(raw, LOOSE)
    user1 = table[table.user_id == "1"]
    assert list(user1["split"]) == ["train", "valid", "test"]
    assert list(user1["timestamp"].astype("int64") // 10**9) == [100, 200, 300]
    assert table["item_idx"].min() == 1 and table["user_idx"].min() == 1  # 0 is padding
    assert sorted(items["item_idx"]) == list(range(1, len(items) + 1))
    assert stats["split"] == {"train": 2, "valid": 2, "test": 2}


def test_prepared_dataset_histories(tiny_synthetic):
    data = PreparedDataset.load(tiny_synthetic)
    inputs, targets = data.histories("test")
    sequences = data.user_sequences
    assert len(inputs) == data.num_users == len(sequences)
    assert all(len(i) == len(s) - 1 and t == s[-1] for i, t, s in zip(inputs, targets, sequences))
    assert all(len(t) == len(s) - 2 for t, s in zip(data.train_sequences(), sequences))


# --- real datasets ----------------------------------------------------------------------------------------------

def test_ml100k_known_counts(ml100k_dir, tmp_path):
    stats = prepare(SourceSpec("movielens", str(ml100k_dir)), tmp_path / "out")
    assert stats["before_filter"] == {"interactions": 100000, "users": 943, "items": 1682}
    assert stats["after_filter"] == {"interactions": 99287, "users": 943, "items": 1349}
    items = pd.read_parquet(tmp_path / "out" / "items.parquet")
    assert items["text"].str.len().min() > 5 and len(items) == 1349


def test_amazon_games_known_counts(amazon_games_dir, tmp_path):
    stats = prepare(SourceSpec("sequences", str(amazon_games_dir)), tmp_path / "out")
    assert stats["after_filter"] == {"interactions": 437772, "users": 50335, "items": 16428}
    assert stats["timestamps_synthetic"] and stats["items_without_text"] == 0


# --- bad input --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "case, spec_kwargs, files, message",
    [
        ("missing file", {"format": "movielens"}, {"u.data": "1\t1\t1\t1\n"}, "missing MovieLens 100K item file"),
        ("unparseable line", {"format": "movielens"}, {"u.data": "1\t1\t1\t1\n1\t2\t3\n"}, "u.data, line 2"),
        ("non-numeric timestamp", {"format": "movielens"}, {"u.data": "1\t1\t1\t1\n1\t2\t3\tyesterday\n"},
         "line 2: column 'timestamp' must be numeric"),
        ("negative timestamp", {"format": "movielens"}, {"u.data": "1\t1\t1\t1\n1\t2\t3\t-5\n"},
         "line 2: column 'timestamp' must be a non-negative"),
        ("missing column", {"format": "recbole"}, {"x.inter": "user_id:token\tthing:token\nu\ti\n"},
         "no 'item_id' field"),
        ("misnamed column", {"format": "table", "columns": "user_id=user"},
         {"t.csv": "uid,item_id,timestamp\n1,2,3\n"}, "column 'user' (for user_id) not found"),
        ("wrong encoding", {"format": "sequences"},
         {"sequences.txt": "1 2 3\n", "items.tsv": b"1\tcaf\xe9\n"}, "items.tsv, line 1: cannot decode"),
        ("missing item table", {"format": "sequences"}, {"sequences.txt": "1 2 3\n"}, "missing item table"),
    ],
)
def test_bad_input_names_problem_and_fix(tmp_path, case, spec_kwargs, files, message):
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    if spec_kwargs["format"] == "movielens" and "u.item" not in files and case != "missing file":
        ml100k_files(tmp_path, files["u.data"].strip().split("\n"))
        (tmp_path / "u.data").write_text(files["u.data"])
    target = tmp_path / "t.csv" if spec_kwargs["format"] == "table" else tmp_path
    with pytest.raises(DataError) as err:
        prepare(SourceSpec(input=str(target), **spec_kwargs), tmp_path / "out", LOOSE)
    assert message in str(err.value) and "Fix:" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_duplicates_fail_or_drop(tmp_path):
    root = ml100k_files(tmp_path / "ml", BASIC_RATINGS + ["1\t2\t4\t200"])
    with pytest.raises(DataError, match="1 duplicate .* --drop-duplicates"):
        prepare(SourceSpec("movielens", str(root)), tmp_path / "out", LOOSE)
    stats = prepare(SourceSpec("movielens", str(root)), tmp_path / "out",
                    PrepareParams(k_core_users=3, k_core_items=1, drop_duplicates=True))
    assert stats["after_filter"]["interactions"] == 6


def test_empty_after_filtering_keeps_previous_output(tmp_path):
    root = ml100k_files(tmp_path / "ml", BASIC_RATINGS)
    out = tmp_path / "out"
    prepare(SourceSpec("movielens", str(root)), out, LOOSE)
    before = (out / "stats.json").read_text()
    with pytest.raises(DataError, match="no interactions left after 5/5-core"):
        prepare(SourceSpec("movielens", str(root)), out)
    assert (out / "stats.json").read_text() == before  # the old result is untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")] == []


def test_cli_prepare_synthetic_and_error_exit(tmp_path):
    cli = [str(Path(sys.executable).parent / "m2rec")]
    done = subprocess.run(cli + ["data", "prepare", "--format", "synthetic", "--users", "60", "--output",
                                 str(tmp_path / "syn")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["after_filter"]["users"] == 60
    failed = subprocess.run(cli + ["data", "prepare", "--format", "movielens", "--input", str(tmp_path / "nope"),
                                   "--output", str(tmp_path / "x")], capture_output=True, text=True)
    assert failed.returncode == 2 and "does not exist. Fix:" in failed.stderr
    helped = subprocess.run(cli + ["data", "prepare", "--help"], capture_output=True, text=True)
    assert "--k-core-users" in helped.stdout
