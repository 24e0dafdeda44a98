"""The `m2rec` command line. Subcommand groups load lazily so `m2rec --help` stays fast."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from m2rec.errors import M2RecError

# command name -> "module:attribute"; each module owns its commands
COMMANDS = {
    "data": "m2rec.cli.data:data",
    "features": "m2rec.cli.features:features",
    "pipeline": "m2rec.cli.pipeline:pipeline",
    "run": "m2rec.cli.run:run",
    "train": "m2rec.cli.train:train_command",
    "evaluate": "m2rec.cli.train:evaluate_command",
    "register": "m2rec.cli.registry:register_command",
    "package": "m2rec.cli.registry:package_command",
    "params": "m2rec.cli.params:params",
}


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def cli(verbose: bool) -> None:
    """M2Rec: train, evaluate, register and serve a multi-scale Mamba + Fourier + text recommender."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: an M2RecError ends with its one-line message and its class's exit status
    (2 for bad data, configuration or usage, 3 for a failed external service)."""
    try:
        cli(args=argv, standalone_mode=False)
    except M2RecError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
