"""`m2rec register` and `m2rec package`: the MLflow registry and the Bento."""

from __future__ import annotations

import json

import click

from m2rec.params import read_params, section
from m2rec.registry.config import RegistryParams
from m2rec.serving.bento import PackageParams

TRACKING_HELP = "MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db here]."


@click.command("register")
@click.option("--model-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="A trained model folder (`m2rec train --output`).")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False),
              help="The prepared dataset it was trained on (adds the gate-weight plot).")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--model-name", help="Registered model name [default: m2rec].")
@click.option("--experiment", help="MLflow experiment [default: m2rec].")
@click.option("--params", "params_path", type=click.Path(), help="params.yaml (section `registry`).")
def register_command(model_dir, data_dir, tracking_uri, model_name, experiment, params_path) -> None:
    """Log a trained model as an MLflow run and register a new version; it becomes `champion` only if its
    validation NDCG@10 beats the champion's on the same dataset, else `challenger`."""
    from m2rec.stages.register import register

    params = section(read_params(params_path), "registry", RegistryParams, tracking_uri=tracking_uri,
                     model_name=model_name, experiment=experiment)
    click.echo(json.dumps(register(model_dir, params.tracking_uri, params.model_name, params.experiment, data_dir,
                                   params.artifact_location), indent=2))


@click.command("package")
@click.option("--model-uri", help="Registry version to package [default: models:/m2rec@champion].")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--bentoml-home", help="BentoML store for the model and the Bento [default: $BENTOML_HOME, else "
                                     "~/bentoml].")
@click.option("--feature-repo", type=click.Path(exists=True, file_okay=False),
              help="Feast repository built by `m2rec features build`, for /recommend by user.")
@click.option("--build/--no-build", default=None, help="Build the Bento, or only import the model [default: build].")
@click.option("--params", "params_path", type=click.Path(), help="params.yaml (sections `registry`, `package`).")
def package_command(model_uri, tracking_uri, bentoml_home, feature_repo, build, params_path) -> None:
    """Import a registered version into BentoML and build a Bento (offline); prints the `bentoml serve` command."""
    from m2rec.stages.package import package

    params = read_params(params_path)
    registry = section(params, "registry", RegistryParams, tracking_uri=tracking_uri)
    options = section(params, "package", PackageParams, model_uri=model_uri, bentoml_home=bentoml_home,
                      feature_repo=feature_repo, build=build)
    click.echo(json.dumps(package(options.model_uri, registry.tracking_uri, options.bentoml_home,
                                  options.feature_repo, options.build), indent=2))
