"""The Spark engine (local mode) writes the same tables as the single-machine path (prepare, the user sequence
table), refuses bad input with the same clear errors, and Feast's Spark offline store reads the same training
sequences as the file store."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from m2rec.data.errors import DataError
from m2rec.data.prepare import PrepareParams
from m2rec.data.sources import SourceSpec
from m2rec.stages.prepare import prepare

pytest.importorskip("pyspark", reason="pyspark is not installed (the `spark` extra: pip install 'm2rec[spark]')")
if shutil.which("java") is None and not Path("/usr/lib/jvm/java-17-openjdk-amd64").is_dir():
    pytest.skip("no Java runtime for Spark", allow_module_level=True)


@pytest.fixture(scope="module")
def spark():
    from m2rec.spark.session import SparkParams, spark_session

    session = spark_session(SparkParams(master="local[2]", shuffle_partitions=4))
    yield session
    session.stop()


@pytest.fixture(scope="module")
def ml100k_table(ml100k_dir, tmp_path_factory) -> SourceSpec:
    """ml-100k as a `table` source: interactions CSV (source order kept) and an item CSV."""
    from m2rec.data.readers import read_movielens

    folder = tmp_path_factory.mktemp("ml100k-table")
    raw = read_movielens(ml100k_dir, None)
    pd.read_csv(ml100k_dir / "u.data", sep="\t", names=["user", "item", "rating", "ts"]).to_csv(
        folder / "ratings.csv", index=False)
    raw.items[["item_id", "text"]].to_csv(folder / "items.csv", index=False)
    return SourceSpec("table", str(folder / "ratings.csv"), str(folder / "items.csv"),
                      "user_id=user,item_id=item,timestamp=ts", "item_id=item_id,text=text")


def read_tables(folder: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    interactions = pd.read_parquet(folder / "interactions.parquet")
    interactions = interactions.assign(split=interactions["split"].astype(str),
                                       timestamp=interactions["timestamp"].astype("datetime64[ns, UTC]"))
    return interactions, pd.read_parquet(folder / "items.parquet"), json.loads((folder / "stats.json").read_text())


def test_spark_prepare_writes_the_single_machine_tables_on_ml100k(spark, ml100k_table, tmp_path):
    from m2rec.spark.prepare import prepare_spark

    expected = prepare(ml100k_table, tmp_path / "pandas")
    stats = prepare_spark(spark, ml100k_table, tmp_path / "spark")
    assert stats["after_filter"] == {"interactions": 99287, "users": 943, "items": 1349}
    assert {k: v for k, v in stats.items() if k != "events"} == {k: v for k, v in expected.items() if k != "events"}
    ours, theirs = read_tables(tmp_path / "spark"), read_tables(tmp_path / "pandas")
    pd.testing.assert_frame_equal(ours[0], theirs[0], check_dtype=False)
    pd.testing.assert_frame_equal(ours[1], theirs[1], check_dtype=False)


def test_spark_k_core_ties_and_duplicates_follow_the_single_machine_rules(spark, tmp_path):
    from m2rec.spark.prepare import prepare_spark

    rows = pd.DataFrame({"user": [1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 4],
                         "item": [1, 2, 3, 1, 1, 2, 3, 3, 2, 1, 4, 1],
                         "ts": [5, 5, 6, 7, 1, 2, 3, 9, 9, 9, 9, 1]})  # ties in time; item 4 and user 4 fall out
    rows.to_csv(tmp_path / "rows.csv", index=False)
    source = SourceSpec("table", str(tmp_path / "rows.csv"), columns="user_id=user,item_id=item,timestamp=ts")
    params = PrepareParams(k_core_users=3, k_core_items=3)
    assert prepare_spark(spark, source, tmp_path / "spark", params) == prepare(source, tmp_path / "pandas", params)
    pd.testing.assert_frame_equal(read_tables(tmp_path / "spark")[0], read_tables(tmp_path / "pandas")[0],
                                  check_dtype=False)
    pd.concat([rows, rows.iloc[:1]]).to_csv(tmp_path / "twice.csv", index=False)
    twice = SourceSpec("table", str(tmp_path / "twice.csv"), columns="user_id=user,item_id=item,timestamp=ts")
    with pytest.raises(DataError, match="1 duplicate .* --drop-duplicates"):
        prepare_spark(spark, twice, tmp_path / "dup", params)
    assert not (tmp_path / "dup").exists()  # nothing written on failure


@pytest.mark.parametrize("content, columns, message", [
    ("u,i,ts\n1,2,3\n", "user_id=user,item_id=i,timestamp=ts", "column 'user' (for user_id) not found"),
    ("u,i,ts\n1,2,-3\n", "user_id=u,item_id=i,timestamp=ts", "non-negative unix time"),
    ("u,i,ts\n1,2,soon\n", "user_id=u,item_id=i,timestamp=ts", "not unix seconds"),
])
def test_spark_refuses_bad_input_with_the_same_clear_errors(spark, tmp_path, content, columns, message):
    from m2rec.spark.prepare import prepare_spark

    (tmp_path / "bad.csv").write_text(content)
    source = SourceSpec("table", str(tmp_path / "bad.csv"), columns=columns)
    with pytest.raises(DataError, match=re.escape(message)):
        prepare_spark(spark, source, tmp_path / "out")
    if "not found" in message:  # the single-machine path says the same
        with pytest.raises(DataError, match=re.escape(message)):
            prepare(source, tmp_path / "out")


def test_the_cli_selects_the_engine_by_option(tmp_path):
    from click.testing import CliRunner

    from m2rec.cli import cli

    rows = pd.DataFrame({"user": [1, 1, 1, 2, 2, 2], "item": [1, 2, 3, 1, 2, 3], "ts": [1, 2, 3, 4, 5, 6]})
    rows.to_csv(tmp_path / "rows.csv", index=False)
    args = ["data", "prepare", "--format", "table", "--input", str(tmp_path / "rows.csv"), "--columns",
            "user_id=user,item_id=item,timestamp=ts", "--k-core-users", "3", "--k-core-items", "2"]
    done = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "spark"), "--engine", "spark",
                                    "--spark-master", "local[1]"])
    assert done.exit_code == 0, done.output
    assert (tmp_path / "spark" / "interactions.parquet").is_dir()  # Spark's parts
    done = CliRunner().invoke(cli, [*args, "--output", str(tmp_path / "pandas")])
    assert read_tables(tmp_path / "spark")[2] == read_tables(tmp_path / "pandas")[2]


# --- the feature tables and Feast's Spark offline store ---------------------------------------------------------

SHORT = 20  # a window shorter than most ml-100k users' histories, so windows are cut


@pytest.fixture(scope="module")
def ml100k_prepared(ml100k_dir, tmp_path_factory) -> Path:
    """ml-100k prepared on one machine (the interactions as one parquet file)."""
    out = tmp_path_factory.mktemp("ml100k-prepared") / "data"
    prepare(SourceSpec("movielens", str(ml100k_dir)), out)
    return out


def sequence_frame(table) -> pd.DataFrame:
    """A user sequence table (arrow, or the parquet file or folder at a path) as pandas, sequences as lists."""
    import pyarrow as pa

    frame = table.to_pandas() if isinstance(table, pa.Table) else pd.read_parquet(table)
    return frame.assign(item_sequence=[[int(i) for i in s] for s in frame["item_sequence"]])


def assert_spark_table_matches(spark, interactions: Path, tmp_path: Path, max_length: int) -> pd.DataFrame:
    """Spark's user sequence table of `interactions` equals the single-machine one row for row, with its types."""
    import pyarrow as pa
    import pyarrow.dataset as ds

    from m2rec.features.tables import user_sequence_table as single_machine
    from m2rec.spark.features import write_user_sequences_spark

    written = tmp_path / f"user_sequences_{max_length}.parquet"
    write_user_sequences_spark(spark, interactions, written, max_length)
    schema = ds.dataset(written, format="parquet").schema
    expected_types = {"user_id": pa.string(), "event_timestamp": pa.timestamp("us", "UTC"),
                      "sequence_length": pa.int64(), "last_event_time": pa.timestamp("us", "UTC")}
    assert schema.names == ["user_id", "event_timestamp", "item_sequence", "sequence_length", "last_event_time"]
    assert {name: schema.field(name).type for name in expected_types} == expected_types
    assert pa.types.is_list(schema.field("item_sequence").type)
    assert schema.field("item_sequence").type.value_type == pa.int64()
    ours = sequence_frame(written)  # in the order written: by user, then time
    theirs = sequence_frame(single_machine(pd.read_parquet(interactions), max_length))
    pd.testing.assert_frame_equal(ours, theirs)
    return ours


@pytest.mark.parametrize("max_length", [200, SHORT])
def test_spark_user_sequence_table_equals_the_single_machine_one_on_ml100k(spark, ml100k_prepared, tmp_path,
                                                                           max_length):
    table = assert_spark_table_matches(spark, ml100k_prepared / "interactions.parquet", tmp_path, max_length)
    users = 943
    # the size formula: a snapshot per user and split cutoff, not one per event (99,287)
    assert len(table) == 3 * users  # at most 3 per user; every ml-100k user has train, valid and test events
    assert table["sequence_length"].sum() <= len(table) * max_length
    assert table["sequence_length"].max() == max_length  # windows are cut at max_length
    assert (table["sequence_length"] == table["item_sequence"].map(len)).all()


def test_spark_user_sequence_table_keeps_the_stored_order_across_parts(spark, ml100k_prepared, tmp_path):
    """Interactions as a folder of parts (as the Spark prepare writes them), a part boundary inside a run of one
    user's events at the same instant: the tie order and 1 µs steps are the stored order's."""
    interactions = pd.read_parquet(ml100k_prepared / "interactions.parquet")
    same = (interactions["user_idx"].diff() == 0) & (interactions["timestamp"].diff() == pd.Timedelta(0))
    inside_tie = int(np.flatnonzero(same.to_numpy())[len(same) // 1000])  # a row tied with the one before it
    parts = tmp_path / "interactions.parquet"
    parts.mkdir()
    for n, (lo, hi) in enumerate([(0, inside_tie), (inside_tie, 60_000), (60_000, len(interactions))]):
        interactions.iloc[lo:hi].to_parquet(parts / f"part-{n:05d}.parquet", index=False)
    assert_spark_table_matches(spark, parts, tmp_path, SHORT)


@pytest.fixture(scope="module")
def ml100k_builds(spark, ml100k_prepared, tmp_path_factory) -> dict[str, dict]:
    """ml-100k's features built three ways: pandas tables + file offline store; Spark tables (`m2rec features build
    --engine spark`) + file store; Spark tables + Feast's Spark offline store."""
    from click.testing import CliRunner

    from m2rec.cli import cli
    from m2rec.features.repo import FeatureParams
    from m2rec.spark.session import SparkParams
    from m2rec.stages.features import build_features

    root = tmp_path_factory.mktemp("ml100k-features")
    builds = {"pandas": build_features(ml100k_prepared, root / "pandas", FeatureParams())}
    done = CliRunner().invoke(cli, ["features", "build", "--data", str(ml100k_prepared), "--root",
                                    str(root / "spark"), "--engine", "spark", "--spark-master", "local[2]"])
    assert done.exit_code == 0, done.output
    builds["spark"] = json.loads((Path(json.loads(done.stdout)["repo_dir"]) / "data" / "build.json").read_text())
    builds["spark_store"] = build_features(ml100k_prepared, root / "spark_store", FeatureParams(offline_store="spark"),
                                           spark=SparkParams(enabled=True, master="local[2]", shuffle_partitions=4))
    return builds


def test_feature_build_with_engine_spark_gives_the_single_machine_features(ml100k_builds, ml100k_prepared):
    from m2rec.data.prepared import PreparedDataset
    from m2rec.features.store import FeatureClient
    from m2rec.features.tables import split_cutoffs

    pandas_build, spark_build = ml100k_builds["pandas"], ml100k_builds["spark"]
    assert (pandas_build["engine"], spark_build["engine"]) == ("pandas", "spark")
    assert spark_build["build_key"] == pandas_build["build_key"]  # the same tables: the same build
    assert spark_build["counts"] == pandas_build["counts"] == {"users": 943, "items": 1349, "sequence_rows": 943 * 3}
    assert Path(spark_build["files"]["user_sequences"]).is_dir()  # Spark's parts, read by Feast's DuckDB store
    pd.testing.assert_frame_equal(sequence_frame(spark_build["files"]["user_sequences"]),
                                  sequence_frame(pandas_build["files"]["user_sequences"]))
    dataset = PreparedDataset.load(ml100k_prepared)
    rows = split_cutoffs(dataset.interactions, "train")
    ours = FeatureClient(spark_build["repo_dir"]).training_sequences(rows)
    theirs = FeatureClient(pandas_build["repo_dir"]).training_sequences(rows)
    assert [list(s) for s in ours["item_sequence"]] == [list(s) for s in theirs["item_sequence"]] \
        == [s[-200:].tolist() for s in dataset.train_sequences()]
    users = rows["user_id"].tolist()
    assert FeatureClient(spark_build["repo_dir"]).snapshot_sequences(users) \
        == FeatureClient(pandas_build["repo_dir"]).snapshot_sequences(users)


def test_training_reads_through_the_spark_offline_store_equal_the_file_store(ml100k_builds, ml100k_prepared):
    import yaml

    from m2rec.data.prepared import PreparedDataset
    from m2rec.features.store import FeatureClient
    from m2rec.features.tables import split_cutoffs
    from m2rec.stages.train import features_from_store

    spark_store, file_store = ml100k_builds["spark_store"], ml100k_builds["pandas"]
    repo = Path(spark_store["repo_dir"])
    assert spark_store["build_key"] != file_store["build_key"]  # another repository: its own key
    config = yaml.safe_load((repo / "feature_store.yaml").read_text())
    assert config["offline_store"]["type"] == "spark"
    assert config["offline_store"]["spark_conf"]["spark.master"] == "local[2]"
    client, reference = FeatureClient(repo), FeatureClient(file_store["repo_dir"])
    assert type(client.store.get_data_source("user_sequences_source")).__name__ == "SparkSource"
    dataset = PreparedDataset.load(ml100k_prepared)
    for split in ("train", "valid"):  # point in time: the valid cutoff's sequence ends with the valid item
        rows = split_cutoffs(dataset.interactions, split)
        ours, theirs = client.training_sequences(rows), reference.training_sequences(rows)
        pd.testing.assert_frame_equal(ours.drop(columns="item_sequence"), theirs.drop(columns="item_sequence"),
                                      check_dtype=False)
        assert [list(s) for s in ours["item_sequence"]] == [list(s) for s in theirs["item_sequence"]]
    sequences, embeddings = features_from_store(repo, dataset)  # what `m2rec train --feature-repo` reads
    expected_sequences, expected_embeddings = features_from_store(file_store["repo_dir"], dataset)
    assert [s.tolist() for s in sequences] == [s.tolist() for s in expected_sequences]
    np.testing.assert_array_equal(embeddings, expected_embeddings)
