"""`m2rec data ...`: prepare and validate datasets."""

from __future__ import annotations

import json

import click

from m2rec.data.prepare import PrepareParams
from m2rec.data.sources import FORMATS, SourceSpec
from m2rec.data.synthetic import SyntheticParams
from m2rec.params import read_params, section


@click.group()
def data() -> None:
    """Prepare and validate interaction datasets."""


@data.command("prepare")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="synthetic", show_default=True,
              help="Input format.")
@click.option("--input", "input_path", type=click.Path(), help="Input file or folder (not for synthetic).")
@click.option("--output", required=True, type=click.Path(), help="Folder for the canonical tables.")
@click.option("--items", type=click.Path(), help="Item table for `sequences` and `table` formats.")
@click.option("--columns", help="`table`: user_id=COL,item_id=COL,timestamp=COL.")
@click.option("--item-columns", help="`table`: item_id=COL,text=COL[+COL...].")
@click.option("--encoding", help="Text encoding of the input files (default per format).")
@click.option("--k-core-users", type=int, help="Minimum interactions per user (default 5).")
@click.option("--k-core-items", type=int, help="Minimum interactions per item (default 5).")
@click.option("--drop-duplicates/--no-drop-duplicates", default=None,
              help="Drop repeated (user, item, timestamp) rows instead of failing.")
@click.option("--users", "n_users", type=int, help="`synthetic`: number of users.")
@click.option("--n-items", type=int, help="`synthetic`: number of items.")
@click.option("--seed", type=int, help="`synthetic`: random seed.")
@click.option("--engine", type=click.Choice(["pandas", "spark"]),
              help="Where the work runs: this process, or Spark (`table` sources) [default: spark.enabled].")
@click.option("--spark-master", help="Spark master URL, e.g. local[*] or spark://HOST:7077 [default: spark.master].")
@click.option("--params", "params_path", type=click.Path(),
              help="params.yaml (sections `prepare`, `synthetic`, `spark`).")
def prepare_command(fmt, input_path, output, items, columns, item_columns, encoding, k_core_users, k_core_items,
                    drop_duplicates, n_users, n_items, seed, engine, spark_master, params_path) -> None:
    """Read a dataset, k-core filter it, split it leave-one-out by time, and write parquet tables."""
    from m2rec.spark.session import SparkParams
    from m2rec.stages.prepare import prepare

    params = read_params(params_path)
    spark = section(params, "spark", SparkParams, master=spark_master,
                    enabled=None if engine is None else engine == "spark")
    stats = prepare(
        SourceSpec(fmt, input_path, items, columns, item_columns, encoding),
        output,
        section(params, "prepare", PrepareParams, k_core_users=k_core_users, k_core_items=k_core_items,
                drop_duplicates=drop_duplicates),
        section(params, "synthetic", SyntheticParams, n_users=n_users, n_items=n_items, seed=seed),
        spark=spark,
    )
    click.echo(json.dumps({k: stats[k] for k in ("source", "before_filter", "after_filter", "split")}, indent=2))


@data.command("validate")
@click.option("--input", "input_dir", required=True, type=click.Path(),
              help="Folder of canonical tables written by `m2rec data prepare`.")
@click.option("--report-dir", type=click.Path(),
              help="Where report.md and results.json go [default: INPUT/validation].")
@click.option("--params", "params_path", type=click.Path(), help="params.yaml (section `validation`).")
def validate_command(input_dir, report_dir, params_path) -> None:
    """Check the tables with Great Expectations; exit status 2 and a report naming the failures if any fail."""
    from pathlib import Path

    from m2rec.stages.validate import validate
    from m2rec.validation.suites import ValidationParams

    summary = validate(input_dir, section(read_params(params_path), "validation", ValidationParams),
                       Path(report_dir) if report_dir else None)
    click.echo(json.dumps({k: summary[k] for k in ("success", "counts", "report")}, indent=2))
