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
@click.option("--data", "data_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="The prepared dataset it was trained on: the gate compares it with the champion there.")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--model-name", help="Registered model name [default: m2rec].")
@click.option("--experiment", help="MLflow experiment [default: m2rec].")
@click.option("--feature-build", help="Key of the feature build it was trained with (the service reads it).")
@click.option("--params", "params_path", type=click.Path(), help="params.yaml (sections `registry`, `pipeline`).")
def register_command(model_dir, data_dir, tracking_uri, model_name, experiment, feature_build, params_path) -> None:
    """Log a trained model as an MLflow run and register a new version; it becomes `champion` only if its
    validation metric (pipeline.gate_metric) reaches pipeline.gate_threshold and beats the champion's on the same
    validation data, else `challenger`."""
    from m2rec.pipeline.settings import PipelineParams
    from m2rec.stages.register import register

    params = read_params(params_path)
    registry = section(params, "registry", RegistryParams, tracking_uri=tracking_uri, model_name=model_name,
                       experiment=experiment)
    settings = section(params, "pipeline", PipelineParams)
    click.echo(json.dumps(register(model_dir, data_dir, registry.tracking_uri, registry.model_name,
                                   registry.experiment, registry.artifact_location, feature_build,
                                   settings.gate_threshold, settings.gate_min_improvement), indent=2))


@click.command("package")
@click.option("--model-uri", help="Registry version to package [default: models:/m2rec@champion].")
@click.option("--tracking-uri", help=TRACKING_HELP)
@click.option("--bentoml-home", help="BentoML store for the model and the Bento [default: $BENTOML_HOME, else "
                                     "~/bentoml].")
@click.option("--feature-root", type=click.Path(file_okay=False),
              help="Folder of feature builds the service reads each version's build from [default: features.root].")
@click.option("--feature-repo", type=click.Path(exists=True, file_okay=False),
              help="One feature build for the packaged version (instead of its registered build).")
@click.option("--events-url", help="Event log the service records events in [default: events.url].")
@click.option("--build/--no-build", default=None, help="Build the Bento, or only import the model [default: build].")
@click.option("--params", "params_path", type=click.Path(),
              help="params.yaml (sections `registry`, `package`, `features`, `events`, `serving`).")
def package_command(model_uri, tracking_uri, bentoml_home, feature_root, feature_repo, events_url, build,
                    params_path) -> None:
    """Import a registered version into BentoML and build a Bento (offline); prints the `bentoml serve` command."""
    from m2rec.events.log import EventParams
    from m2rec.features.repo import FeatureParams
    from m2rec.serving.follower import ServingParams
    from m2rec.stages.package import package

    params = read_params(params_path)
    registry = section(params, "registry", RegistryParams, tracking_uri=tracking_uri)
    options = section(params, "package", PackageParams, model_uri=model_uri, bentoml_home=bentoml_home,
                      feature_repo=feature_repo, build=build)
    events = section(params, "events", EventParams, url=events_url)
    click.echo(json.dumps(package(
        options.model_uri, registry.tracking_uri, options.bentoml_home,
        feature_root or section(params, "features", FeatureParams).root, events.url, options.build,
        options.feature_repo, section(params, "serving", ServingParams), events), indent=2))
