"""`m2rec features ...`: build the Feast features of a prepared dataset."""

from __future__ import annotations

import json

import click

from m2rec.features.repo import OFFLINE_STORES, ONLINE_STORES, FeatureParams
from m2rec.params import read_params, section
from m2rec.text.embeddings import TextEncoderParams


@click.group()
def features() -> None:
    """Item text embeddings and user sequences through Feast."""


@features.command("build")
@click.option("--data", "data_dir", required=True, type=click.Path(),
              help="Folder of canonical tables written by `m2rec data prepare`.")
@click.option("--root", "feature_root", type=click.Path(file_okay=False),
              help="Folder of feature builds; each build is a Feast repository ROOT/KEY [default: features.root].")
@click.option("--params", "params_path", type=click.Path(),
              help="params.yaml (sections `features`, `text`, `spark`).")
@click.option("--text-model", help="Text encoder: the packaged default, a Hugging Face name or a local path.")
@click.option("--online-store", type=click.Choice(ONLINE_STORES), help="Online store [default: sqlite].")
@click.option("--redis", "redis_connection_string", help="Redis connection string, e.g. 127.0.0.1:6379.")
@click.option("--max-sequence-length", type=int, help="Items kept per user sequence [default: 200].")
@click.option("--offline-store", type=click.Choice(OFFLINE_STORES),
              help="Where training's point-in-time reads run: the parquet files here, or Feast's Spark offline store "
                   "[default: features.offline_store].")
@click.option("--engine", type=click.Choice(["pandas", "spark"]),
              help="Where the user sequence table is built: this process, or a Spark job (the same table) "
                   "[default: spark.enabled].")
@click.option("--spark-master", help="Spark master URL, e.g. local[*] or spark://HOST:7077 [default: spark.master].")
def build_command(data_dir, feature_root, params_path, text_model, online_store, redis_connection_string,
                  max_sequence_length, offline_store, engine, spark_master) -> None:
    """Embed item texts, write the offline tables, run `feast apply` and materialize to the online store, as a new
    build (named by the dataset version and settings) that no other build shares."""
    from m2rec.spark.session import SparkParams
    from m2rec.stages.features import build_features

    params = read_params(params_path)
    summary = build_features(
        data_dir, feature_root,
        section(params, "features", FeatureParams, online_store=online_store,
                redis_connection_string=redis_connection_string, max_sequence_length=max_sequence_length,
                offline_store=offline_store),
        section(params, "text", TextEncoderParams, model=text_model),
        section(params, "spark", SparkParams, master=spark_master,
                enabled=None if engine is None else engine == "spark"),
    )
    shown = ("build_key", "repo_dir", "engine", "embedding_dim", "counts", "timings")
    click.echo(json.dumps({k: summary[k] for k in shown}, indent=2))
