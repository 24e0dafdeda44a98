"""`m2rec params show` and `m2rec params schema`: the values a run would use, and what values are allowed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click
import yaml

DEFAULT_PARAMS = "params.yaml"


@click.group()
def params() -> None:
    """Inspect params.yaml: the resolved values of every section, or the JSON schema of the file."""


@params.command("show")
@click.option("--params", "params_path", type=click.Path(),
              help=f"params.yaml to read [default: ./{DEFAULT_PARAMS} if present, else only defaults].")
@click.option("-S", "--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="Override one value (repeatable), e.g. -S train.epochs=3.")
def show_command(params_path, overrides) -> None:
    """Print every section's values as a run would use them (defaults filled in, overrides applied, checked),
    as YAML."""
    from m2rec.cli.pipeline import parse_assignments
    from m2rec.params import apply_overrides, read_params, resolve_params

    if params_path is None and Path(DEFAULT_PARAMS).is_file():
        params_path = DEFAULT_PARAMS
    content = apply_overrides(read_params(params_path), parse_assignments(overrides, "--set"))
    resolved = {name: dataclasses.asdict(value) for name, value in resolve_params(content).items()}
    click.echo(yaml.safe_dump(resolved, sort_keys=False, default_flow_style=False), nl=False)


@params.command("schema")
def schema_command() -> None:
    """Print the JSON schema of params.yaml (one property per section), for editors and the pipeline UI."""
    from m2rec.params import params_schema

    click.echo(json.dumps(params_schema(), indent=2))
