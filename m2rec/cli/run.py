"""`m2rec run`: the main job on the embedded default dataset."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("run")
@click.option("--workdir", default="artifacts", show_default=True, type=click.Path(),
              help="Where the job writes its outputs.")
def run(workdir: str) -> None:
    """Prepare the embedded synthetic dataset and print its statistics."""
    from m2rec.data.sources import SourceSpec
    from m2rec.stages.prepare import prepare

    stats = prepare(SourceSpec("synthetic"), Path(workdir) / "data")
    click.echo(json.dumps({k: stats[k] for k in ("source", "before_filter", "after_filter", "split")}, indent=2))
