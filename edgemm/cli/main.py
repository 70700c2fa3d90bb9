"""Entry point of the `edgemm` command."""

from __future__ import annotations

import importlib

import typer

from edgemm import __version__
from edgemm.cli.common import configure_logging

app = typer.Typer(
    name="edgemm",
    help="Compress text-image fusion models for CPUs and edge devices, run them and benchmark them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Each module defines register(app). Keep this order: it is the order of `edgemm --help`.
COMMAND_MODULES = [
    "edgemm.cli.compress",
    "edgemm.cli.train",
    "edgemm.cli.evaluate",
    "edgemm.cli.export",
    "edgemm.cli.run",
    "edgemm.cli.inspect",
    "edgemm.cli.bench",
    "edgemm.cli.report",
    "edgemm.cli.data",
]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgemm {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages and show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    configure_logging(verbose)


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(_name)
    except ModuleNotFoundError as _error:
        if _error.name != _name:
            raise
        continue
    _module.register(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
