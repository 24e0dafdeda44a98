"""Great Expectations validation: real and synthetic tables pass; each expectation fails on a broken copy."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from m2rec.data.errors import DataError
from m2rec.errors import ConfigError
from m2rec.data.prepared import PreparedDataset
from m2rec.data.sources import SourceSpec
from m2rec.stages.prepare import prepare
from m2rec.stages.validate import ValidationFailed, validate
from m2rec.validation.suites import ValidationParams, run_suites

NOT_NULL = "expect_column_values_to_not_be_null"
OF_TYPE = "expect_column_values_to_be_of_type"
IN_TYPES = "expect_column_values_to_be_in_type_list"
BETWEEN = "expect_column_values_to_be_between"
IN_SET = "expect_column_values_to_be_in_set"
UNIQUE = "expect_column_values_to_be_unique"
COLUMNS = "expect_table_columns_to_match_set"
NON_EMPTY = "expect_column_values_to_match_regex"
COMPOUND_UNIQUE = "expect_compound_columns_to_be_unique"


@pytest.fixture(scope="module")
def tables(tiny_synthetic) -> PreparedDataset:
    return PreparedDataset.load(tiny_synthetic)


def failures(interactions: pd.DataFrame, items: pd.DataFrame, params: ValidationParams | None = None) -> set:
    """(suite, expectation, column) of every failed expectation."""
    return {(r["suite"], r["expectation"], r["column"])
            for r in run_suites(interactions, items, params or ValidationParams()) if not r["success"]}


def set_cell(frame: pd.DataFrame, column: str, value, row: int = 0) -> pd.DataFrame:
    frame = frame.copy()
    if column in frame and isinstance(frame[column].dtype, pd.CategoricalDtype) and value is not None:
        frame[column] = frame[column].cat.add_categories([value])
    frame.loc[row, column] = value
    return frame


def first_user_cut_to(interactions: pd.DataFrame, n: int) -> pd.DataFrame:
    first = interactions["user_id"].iloc[0]
    return pd.concat([interactions[interactions["user_id"] == first].head(n),
                      interactions[interactions["user_id"] != first]], ignore_index=True)


def unparseable_timestamp(interactions: pd.DataFrame) -> pd.DataFrame:
    frame = interactions.assign(timestamp=interactions["timestamp"].astype(str))
    return set_cell(frame, "timestamp", "not a date")


def duplicate_catalog_id(items: pd.DataFrame) -> pd.DataFrame:
    extra = items.iloc[[0]].assign(item_idx=items["item_idx"].max() + 1)
    return pd.concat([items, extra], ignore_index=True)


IA, CT = "interactions", "items"  # the two suites
# case id -> (broken interactions, broken items, the failures it must produce)
CASES = {
    "missing column": (lambda i: i.drop(columns="split"), None,
                       {(IA, COLUMNS, None), (IA, NOT_NULL, "split"), (IA, IN_SET, "split")}),
    "null user_id": (lambda i: set_cell(i, "user_id", None), None, {(IA, NOT_NULL, "user_id")}),
    "null item_id": (lambda i: set_cell(i, "item_id", None), None, {(IA, NOT_NULL, "item_id")}),
    "null user_idx": (lambda i: set_cell(i, "user_idx", None), None,
                      {(IA, NOT_NULL, "user_idx"), (IA, IN_TYPES, "user_idx")}),
    "null item_idx": (lambda i: set_cell(i, "item_idx", None), None,
                      {(IA, NOT_NULL, "item_idx"), (IA, IN_TYPES, "item_idx")}),
    "null split": (lambda i: set_cell(i, "split", None), None, {(IA, NOT_NULL, "split")}),
    "integer user_id": (lambda i: i.assign(user_id=i["user_idx"]), None, {(IA, OF_TYPE, "user_id")}),
    "integer item_id": (lambda i: i.assign(item_id=i["item_idx"]), None,
                        {(IA, OF_TYPE, "item_id"), (IA, IN_SET, "item_id")}),
    "float user_idx": (lambda i: i.assign(user_idx=i["user_idx"] + 0.5), None, {(IA, IN_TYPES, "user_idx")}),
    "float item_idx": (lambda i: i.assign(item_idx=i["item_idx"] * 1.0), None, {(IA, IN_TYPES, "item_idx")}),
    "user_idx 0": (lambda i: set_cell(i, "user_idx", 0), None, {(IA, BETWEEN, "user_idx")}),
    "negative item_idx": (lambda i: set_cell(i, "item_idx", -3), None, {(IA, BETWEEN, "item_idx")}),
    "naive timestamps": (lambda i: i.assign(timestamp=i["timestamp"].dt.tz_localize(None)), None,
                         {(IA, OF_TYPE, "timestamp")}),
    "unparseable timestamp": (unparseable_timestamp, None,
                              {(IA, OF_TYPE, "timestamp"), (IA, NOT_NULL, "timestamp_utc")}),
    "timestamp before floor": (lambda i: set_cell(i, "timestamp", pd.Timestamp("1980-05-01", tz="UTC")), None,
                               {(IA, BETWEEN, "timestamp_utc")}),
    "timestamp in the future": (lambda i: set_cell(i, "timestamp", pd.Timestamp("2100-01-01", tz="UTC")), None,
                                {(IA, BETWEEN, "timestamp_utc")}),
    "duplicate row": (lambda i: pd.concat([i, i.iloc[[0]]], ignore_index=True), None,
                      {(IA, COMPOUND_UNIQUE, "user_id, item_id, timestamp")}),
    "user with 2 interactions": (lambda i: first_user_cut_to(i, 2), None, {(IA, BETWEEN, "user_interactions")}),
    "unknown split": (lambda i: set_cell(i, "split", "holdout"), None, {(IA, IN_SET, "split")}),
    "item not in catalog": (lambda i: set_cell(i, "item_id", "no-such-item"), None, {(IA, IN_SET, "item_id")}),
    "catalog without text": (None, lambda c: c.drop(columns="text"),
                             {(CT, COLUMNS, None), (CT, NOT_NULL, "text"), (CT, NON_EMPTY, "text")}),
    "null catalog id": (None, lambda c: set_cell(c, "item_id", None),
                        {(CT, NOT_NULL, "item_id"), (IA, IN_SET, "item_id")}),
    "integer catalog ids": (None, lambda c: c.assign(item_id=c["item_idx"]),
                            {(CT, OF_TYPE, "item_id"), (IA, IN_SET, "item_id")}),
    "duplicate catalog id": (None, duplicate_catalog_id, {(CT, UNIQUE, "item_id")}),
    "null catalog item_idx": (None, lambda c: set_cell(c, "item_idx", None),
                              {(CT, NOT_NULL, "item_idx"), (CT, IN_TYPES, "item_idx")}),
    "float catalog item_idx": (None, lambda c: c.assign(item_idx=c["item_idx"] * 1.0), {(CT, IN_TYPES, "item_idx")}),
    "catalog item_idx 0": (None, lambda c: set_cell(c, "item_idx", 0), {(CT, BETWEEN, "item_idx")}),
    "repeated catalog item_idx": (None, lambda c: set_cell(c, "item_idx", 2), {(CT, UNIQUE, "item_idx")}),
    "null text": (None, lambda c: set_cell(c, "text", None), {(CT, NOT_NULL, "text")}),
    "blank text": (None, lambda c: set_cell(c, "text", "   "), {(CT, NON_EMPTY, "text")}),
}


def test_synthetic_tables_pass_every_expectation(tables):
    results = run_suites(tables.interactions, tables.items, ValidationParams())
    assert len(results) == 29 and all(r["success"] for r in results)


@pytest.mark.parametrize("case", CASES)
def test_each_expectation_fails_on_its_broken_copy(tables, case):
    break_interactions, break_items, expected = CASES[case]
    interactions = break_interactions(tables.interactions) if break_interactions else tables.interactions
    items = break_items(tables.items) if break_items else tables.items
    assert failures(interactions, items) == expected


def test_every_expectation_has_a_failing_case(tables):
    checked = set().union(*(expected for _, _, expected in CASES.values()))
    every = {(r["suite"], r["expectation"], r["column"])
             for r in run_suites(tables.interactions, tables.items, ValidationParams())}
    assert every == checked


def test_thresholds_come_from_params(tables):
    blank = set_cell(tables.items, "text", "")
    assert failures(tables.interactions, blank, ValidationParams(min_text_fraction=0.9)) == set()
    short = first_user_cut_to(tables.interactions, 3)
    assert failures(short, tables.items, ValidationParams(min_interactions_per_user=3)) == set()
    assert failures(tables.interactions, tables.items, ValidationParams(max_timestamp="2020-01-01")) \
        == {(IA, BETWEEN, "timestamp_utc")}
    with pytest.raises(ConfigError, match="validation.min_timestamp"):
        run_suites(tables.interactions, tables.items, ValidationParams(min_timestamp="last tuesday"))


def test_passing_batch_writes_a_report_marked_passed(tiny_synthetic, tmp_path):
    summary = validate(tiny_synthetic, report_dir=tmp_path / "report")
    assert summary["success"] and summary["failed"] == []
    report = (tmp_path / "report" / "report.md").read_text()
    assert report.startswith("# Data validation: PASSED") and "29 of 29 expectations met" in report
    assert json.loads((tmp_path / "report" / "results.json").read_text())["success"] is True


def test_failing_batch_raises_after_writing_the_report(tables, tiny_synthetic, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    set_cell(tables.interactions, "item_idx", -3, row=4).to_parquet(data / "interactions.parquet", index=False)
    with pytest.raises(ValidationFailed, match=r"item_idx >= 1 \(0 is padding\) \(1 failing rows\)") as error:
        validate(data)
    assert isinstance(error.value, DataError) and str(data / "validation" / "report.md") in str(error.value)
    report = (data / "validation" / "report.md").read_text()
    assert report.startswith("# Data validation: FAILED")
    assert "## FAILED interactions: item_idx >= 1 (0 is padding)" in report and "| 4 | " in report  # example row


@pytest.fixture
def blank_text_batch(tables, tiny_synthetic, tmp_path) -> Path:
    """A copy of the tiny dataset whose first item has a blank text: a batch validation must refuse."""
    data = tmp_path / "data"
    shutil.copytree(tiny_synthetic, data)
    set_cell(tables.items, "text", " ").to_parquet(data / "items.parquet", index=False)
    return data


def test_cli_exits_with_status_2_on_a_failing_batch(blank_text_batch, monkeypatch, capsys):
    from m2rec.cli import main

    data = blank_text_batch
    monkeypatch.setattr(sys, "argv", ["m2rec", "data", "validate", "--input", str(data)])
    with pytest.raises(SystemExit) as stopped:
        main()
    assert stopped.value.code == 2
    assert "items: text is not empty" in capsys.readouterr().err
    assert (data / "validation" / "report.md").exists()


def test_a_failing_batch_fails_a_script_without_a_main_file(blank_text_batch):
    """`python -c` (no `__main__.__file__`, as under pytest-xdist or an embedded interpreter) must not exit 0
    before validating: pyspark without its connect extra calls sys.exit(0) when Great Expectations imports it."""
    script = f"from m2rec.stages.validate import validate; validate({str(blank_text_batch)!r})"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "ValidationFailed" in done.stderr, done.stderr[-2000:]


def test_ml100k_passes(ml100k_dir, tmp_path):
    prepare(SourceSpec("movielens", str(ml100k_dir)), tmp_path / "ml-100k")
    summary = validate(tmp_path / "ml-100k")
    assert summary["success"] and summary["counts"] == {"interactions": 99287, "items": 1349}
