"""`python -m edgemm.bench PKG ...`: the `edgemm bench` command without the rest of the CLI."""

import typer

from edgemm.cli.bench import bench_command
from edgemm.cli.common import configure_logging

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command()(bench_command)

if __name__ == "__main__":
    configure_logging(verbose=False)
    app()
