"""The Spark engine (local mode) writes the same tables as the single-machine path, and refuses bad input with the
same clear errors."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

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
