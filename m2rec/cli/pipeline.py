"""`m2rec pipeline ...`: compile the Kubeflow pipeline, run it here with kfp.local, or send it to a cluster as a
run or a recurring run. `m2rec run` is `m2rec pipeline run --local` with the defaults."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any, Callable

import click
import yaml

from m2rec.data.errors import DataError
from m2rec.data.sources import FORMATS
from m2rec.model.config import MODEL_TYPES
from m2rec.params import read_params, section

DEFAULT_PARAMS = "params.yaml"


def parse_assignments(pairs: tuple[str, ...], option: str) -> dict[str, Any]:
    """NAME=VALUE pairs -> {NAME: value}, each value read as YAML (so 3 is an int, 0.1 a float, [1, 2] a list)."""
    from m2rec.errors import UsageError

    values = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"{option} {pair!r} is not NAME=VALUE", f"write e.g. {option} train.epochs=3")
        try:
            values[name.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise UsageError(f"{option} {pair!r}: the value is not valid YAML",
                             f"quote it, e.g. {option} '{name.strip()}=\"...\"'") from None
    return values


def load_params(params_path: str | None, overrides: tuple[str, ...]) -> dict:
    """params.yaml's content (default ./params.yaml when present) with `section.key=value` overrides applied;
    every section is validated here, so a bad value stops the command before anything runs."""
    from m2rec.params import apply_overrides, resolve_params

    if params_path is None and Path(DEFAULT_PARAMS).is_file():
        params_path = DEFAULT_PARAMS
    params = apply_overrides(read_params(params_path), parse_assignments(overrides, "--set"))
    resolve_params(params)
    return params


def pipeline_settings(params: dict, **overrides: Any):
    """The `pipeline` section as PipelineParams, with non-None command-line overrides."""
    from m2rec.pipeline.settings import PipelineParams

    return section(params, "pipeline", PipelineParams, **overrides)


def params_options(command: Callable) -> Callable:
    """--params and --set, shared by every command that builds the pipeline."""
    command = click.option("-S", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
                           help="Override one params.yaml value (repeatable), e.g. -S train.epochs=3.")(command)
    return click.option("--params", "params_path", type=click.Path(exists=True),
                        help=f"Hyperparameters and pipeline settings [default: ./{DEFAULT_PARAMS} if present]."
                        )(command)


def compile_options(command: Callable) -> Callable:
    """Compile-time settings: the component image and the training node."""
    for option in reversed([
        click.option("--image", help="Component image [default: pipeline.image, m2rec:0.1.0]."),
        click.option("--package", "packages", multiple=True,
                     help="pip package installed when each component starts (repeatable)."),
        click.option("--accelerator-type", help="Train step accelerator [default: nvidia.com/gpu]."),
        click.option("--accelerator-limit", type=int, help="Accelerators for the train step; 0 for none [default: 1]."),
    ]):
        command = option(command)
    return params_options(command)


def local_run_options(command: Callable) -> Callable:
    """Options of a local run: the data source, the working folder, the model and the stores."""
    options = [
        click.option("--data", "data", type=click.Path(exists=True),
                     help="Raw data file or folder [default: the embedded synthetic dataset]."),
        click.option("--format", "fmt", type=click.Choice(FORMATS), help="Format of --data."),
        click.option("--items", type=click.Path(exists=True), help="Item table for `sequences` / `table`."),
        click.option("--columns", help="`table`: user_id=COL,item_id=COL,timestamp=COL."),
        click.option("--item-columns", help="`table`: item_id=COL,text=COL[+COL...]."),
        click.option("--encoding", help="Text encoding of the input files."),
        click.option("--workdir", default="artifacts", show_default=True, type=click.Path(file_okay=False),
                     help="Working folder: KFP artifacts, MLflow database, Feast repository, BENTOML_HOME."),
        click.option("--model", "model_type", type=click.Choice(MODEL_TYPES), default="m2rec", show_default=True),
        click.option("--epochs", type=int, default=0, help="Override train.epochs (0: from params)."),
        click.option("--gate-metric", help="Registration gate, split/metric [default: pipeline.gate_metric]."),
        click.option("--threshold", "gate_threshold", type=float,
                     help="The gate metric must reach this to register [default: pipeline.gate_threshold]."),
        click.option("--min-improvement", "gate_min_improvement", type=float,
                     help="How much the gate metric must beat the champion's by [default: "
                          "pipeline.gate_min_improvement]."),
        click.option("--tracking-uri", help="MLflow tracking URI [default: sqlite:///WORKDIR/mlflow.db]."),
        click.option("--feature-root", type=click.Path(), help="Feature builds [default: WORKDIR/features]."),
        click.option("--events-url", help="Event log that retraining reads [default: sqlite:///WORKDIR/events.db]."),
        click.option("--bentoml-home", type=click.Path(), help="BENTOML_HOME [default: WORKDIR/bentoml_home]."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    command = params_options(command)
    for option in reversed(options):
        command = option(command)
    return command


def run_locally(data, fmt, items, columns, item_columns, encoding, workdir, model_type, epochs, gate_metric,
                gate_threshold, gate_min_improvement, tracking_uri, feature_root, events_url, bentoml_home, as_json,
                params_path, overrides) -> dict:
    """Run the pipeline with kfp.local, print the summary (also written to WORKDIR/summary.json), return it."""
    from components.stages import STAGES
    from pipelines.training import build_pipeline

    from m2rec.pipeline.local import PipelineFailed, run_local, source_spec
    from m2rec.pipeline.reports import format_summary
    from m2rec.utils.atomic import atomic_write_json

    params = load_params(params_path, overrides)
    settings = pipeline_settings(params)
    source = source_spec(data, fmt, items, columns, item_columns, encoding)
    try:
        summary = run_local(build_pipeline, [stage.__name__ for stage in STAGES], workdir, params, source, settings,
                            model_type=model_type, epochs=epochs, gate_metric=gate_metric,
                            gate_threshold=gate_threshold, gate_min_improvement=gate_min_improvement,
                            tracking_uri=tracking_uri, feature_root=feature_root, events_url=events_url,
                            bentoml_home=bentoml_home)
    except PipelineFailed as failed:
        if failed.task == "validate":  # bad data: exit status 2 like every other data error
            raise DataError(str(failed), "correct the data (see the report) and run again") from None
        raise click.ClickException(str(failed)) from None
    atomic_write_json(Path(summary["workdir"]) / "summary.json", summary)
    click.echo(json.dumps(summary, indent=2) if as_json else format_summary(summary))
    return summary


@click.group()
def pipeline() -> None:
    """The Kubeflow pipeline: compile it, run it locally, or submit and schedule it on a cluster."""


@pipeline.command("compile")
@click.option("--output", default="artifacts/m2rec_pipeline.yaml", show_default=True,
              type=click.Path(dir_okay=False), help="Where the pipeline YAML goes.")
@compile_options
def compile_command(output, image, packages, accelerator_type, accelerator_limit, params_path, overrides) -> None:
    """Write the pipeline YAML for a Kubeflow Pipelines cluster (the train step asks for a GPU node)."""
    from pipelines.training import compile_pipeline

    params = load_params(params_path, overrides)
    settings = pipeline_settings(params, image=image, packages=list(packages) or None,
                                 accelerator_type=accelerator_type, accelerator_limit=accelerator_limit)
    compile_pipeline(output, settings, params)
    click.echo(f"wrote {output} (image {settings.image}; train step: "
               + (f"{settings.accelerator_limit} x {settings.accelerator_type}" if settings.accelerator_limit
                  else "no accelerator") + f", {settings.train_retries} retries)")


@pipeline.command("run")
@click.option("--local", "local", is_flag=True, help="Run here with kfp.local (subprocesses, no Docker).")
@local_run_options
def run_command(local, **options) -> None:
    """Run the whole pipeline; `--local` runs it on this machine (use `submit` for a cluster)."""
    if not local:
        raise click.UsageError("`m2rec pipeline run` runs locally: pass --local, or use `m2rec pipeline submit`")
    run_locally(**options)


def remote_options(command: Callable) -> Callable:
    """Options shared by submit and schedule."""
    options = [
        click.option("--host", help="Kubeflow Pipelines endpoint [default: pipeline.host or $KF_PIPELINES_ENDPOINT]."),
        click.option("--pipeline-file", type=click.Path(exists=True, dir_okay=False),
                     help="A compiled pipeline YAML [default: compile one now]."),
        click.option("-a", "--arg", "args", multiple=True, metavar="NAME=VALUE",
                     help="A pipeline parameter (repeatable), e.g. -a source_format=movielens -a epochs=20."),
        click.option("--experiment", help="KFP experiment [default: pipeline.experiment]."),
        click.option("--namespace", help="Kubernetes namespace (multi-user Kubeflow)."),
    ]
    for option in reversed(options):
        command = option(command)
    return compile_options(command)


def _with_package(function: Callable) -> Callable:
    """Call `function(package_path, settings, arguments, ...)` with a compiled pipeline (given or compiled now)."""
    @functools.wraps(function)
    def wrapper(pipeline_file, args, image, packages, accelerator_type, accelerator_limit, params_path, overrides,
                **options):
        from pipelines.training import compile_pipeline

        params = load_params(params_path, overrides)
        settings = pipeline_settings(params, image=image, packages=list(packages) or None,
                                     accelerator_type=accelerator_type, accelerator_limit=accelerator_limit)
        arguments = parse_assignments(args, "--arg")
        if "params_json" in arguments and not isinstance(arguments["params_json"], str):
            arguments["params_json"] = json.dumps(arguments["params_json"])
        if pipeline_file:
            return function(pipeline_file, settings, arguments, **options)
        with tempfile.TemporaryDirectory() as scratch:
            package_path = str(Path(scratch) / "m2rec_pipeline.yaml")
            compile_pipeline(package_path, settings, params)
            return function(package_path, settings, arguments, **options)
    return wrapper


@pipeline.command("submit")
@click.option("--run-name", help="Run name [default: pipeline file name and time].")
@remote_options
@_with_package
def submit_command(package_path, settings, arguments, host, experiment, namespace, run_name) -> None:
    """Start one run of the pipeline on a Kubeflow Pipelines endpoint."""
    from m2rec.pipeline.remote import submit_run

    result = submit_run(package_path, host or settings.host, arguments, experiment or settings.experiment,
                        run_name, namespace)
    click.echo(json.dumps(result, indent=2))


@pipeline.command("schedule")
@click.option("--cron", required=True, help="When to retrain: 5-field cron ('0 3 * * *') or KFP's 6 fields.")
@click.option("--name", default="m2rec-retraining", show_default=True, help="Recurring run name.")
@click.option("--max-concurrency", type=int, default=1, show_default=True, help="Runs allowed at once.")
@click.option("--catchup/--no-catchup", default=False, show_default=True,
              help="Backfill the runs missed while the schedule was paused.")
@remote_options
@_with_package
def schedule_command(package_path, settings, arguments, host, experiment, namespace, cron, name, max_concurrency,
                     catchup) -> None:
    """Create a recurring run (scheduled retraining) of the pipeline on a Kubeflow Pipelines endpoint."""
    from m2rec.pipeline.remote import schedule_run

    result = schedule_run(package_path, host or settings.host, cron, arguments, experiment or settings.experiment,
                          name, namespace, max_concurrency, catchup)
    click.echo(json.dumps(result, indent=2))
