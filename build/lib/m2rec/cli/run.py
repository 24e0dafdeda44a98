"""`m2rec run`: the main job. The whole Kubeflow pipeline, run here with kfp.local, on the embedded synthetic
dataset by default (`--data PATH --format FMT` for another); ends with the metrics, the registered model version
and alias, the Bento tag and the `bentoml serve` command."""

from __future__ import annotations

import click

from m2rec.cli.pipeline import local_run_options, run_locally


@click.command("run")
@local_run_options
def run(**options) -> None:
    """Prepare, validate, build features, train, evaluate, register and package: the pipeline, locally."""
    run_locally(**options)
