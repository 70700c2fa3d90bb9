"""Helpers shared by CLI commands: error reporting, logging set-up and output."""

from __future__ import annotations

import functools
import json
import logging
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from edgemm.errors import EdgemmError

console = Console()
err_console = Console(stderr=True)
# Rich assumes 80 columns when output goes to a file or pipe, which truncates wide tables.
for _console in (console, err_console):
    if not _console.is_terminal:
        _console.width = 160

_state = {"verbose": False}

F = TypeVar("F", bound=Callable[..., Any])


def configure_logging(verbose: bool) -> None:
    """Log edgemm's own INFO messages (DEBUG with --verbose); other libraries log warnings only.

    Without --verbose, the exporter's and quantizer's chatter (hundreds of INFO lines, torch's
    notes on torchvision, Python warnings from torch.onnx) is hidden.
    """
    _state["verbose"] = verbose
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    logging.getLogger("edgemm").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        # torch configures some of its loggers itself, so name the one that warns about
        # torchvision (which edgemm deliberately does not use) as well as the parent.
        for name in ("torch", "torch.onnx", "torch.onnx._internal.exporter._registration"):
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)


def is_verbose() -> bool:
    return _state["verbose"]


def report_errors(command: F) -> F:
    """Turn an `EdgemmError` into one `error:` line and its exit code; other errors too, unless --verbose."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except EdgemmError as error:
            if is_verbose():
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=error.exit_code) from None
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError) as error:
            if is_verbose():
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(code=130) from None

    return wrapper  # type: ignore[return-value]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a temp file in the same folder, then rename."""
    from edgemm.io import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")
