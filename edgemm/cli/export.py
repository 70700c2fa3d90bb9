"""`edgemm export`: export a checkpoint to a checked FP32 model package."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Optional

import typer
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from edgemm.cli.common import console, is_verbose, report_errors

# Loggers of the exporter stack that report every optimisation pass at INFO level.
_NOISY_LOGGERS = ("onnxscript", "onnx_ir", "torch.onnx", "torch.export", "torch._export")


def register(app: typer.Typer) -> None:
    app.command("export")(export_command)


@report_errors
def export_command(
    checkpoint: Path = typer.Argument(..., help="Checkpoint folder (config.json, model.safetensors, vocab.txt).", show_default=False),
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the model package to; must not exist unless --overwrite."),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", help="Dataset folder whose validation split (dev, val, validation or test) is used for parity; default: synthetic scenes."
    ),
    opset: int = typer.Option(18, "--opset", help="ONNX opset of the exported graphs (17 to 25)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    parity_pairs: int = typer.Option(512, "--parity-pairs", help="Maximum validation pairs for the parity check; 0 uses all of them."),
) -> None:
    """Export a checkpoint to ONNX, check parity with PyTorch and write a model package.

    Dual encoders get model.onnx, text_encoder.onnx and image_encoder.onnx; fusion models get
    model.onnx. The checkpoint folder is only read.
    """
    from edgemm.compression.export_onnx import check_opset
    from edgemm.compression.package import export_checkpoint
    from edgemm.errors import ConfigError

    check_opset(opset)
    if parity_pairs < 0:
        raise ConfigError(
            f"--parity-pairs is {parity_pairs}, a negative count.", "Pass a positive number, or 0 for all validation pairs."
        )
    _quiet_exporter_logs()

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False
    ) as progress:
        current: list[Any] = []

        def on_stage(name: str) -> None:
            if current:
                progress.update(current[-1], completed=1, total=1)
            current.append(progress.add_task(name, total=None))

        package = export_checkpoint(
            checkpoint,
            out,
            dataset=dataset,
            opset=opset,
            overwrite=overwrite,
            parity_pairs=parity_pairs or None,
            on_stage=on_stage,
        )
        if current:
            progress.update(current[-1], completed=1, total=1)

    _print_summary(package)


def _quiet_exporter_logs() -> None:
    if is_verbose():
        return
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # The exporters warn about deprecated torch APIs inside torch itself, which users cannot act on.
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\..*")


def _print_summary(package: Path) -> None:
    from edgemm.runtime.manifest import read_manifest

    manifest = read_manifest(package)
    parity = manifest.validation.get("parity", {})
    table = Table(title=escape(f"parity of {package} with PyTorch (FP32, opset {manifest.opset})"))
    table.add_column("inputs")
    table.add_column("samples", justify="right")
    table.add_column("max |logit diff|", justify="right")
    table.add_column("min embedding cosine", justify="right")
    table.add_column("decision agreement", justify="right")
    table.add_column("result")
    rows = [("validation", parity), ("random tensors", parity.get("random", {}))]
    for name, entry in rows:
        if not entry:
            continue
        table.add_row(
            name,
            str(entry["num_samples"]),
            _number(entry["max_abs_logit_diff"], "{:.2e}"),
            _number(entry["min_embedding_cosine"], "{:.6f}"),
            _number(entry["decision_agreement"], "{:.4f}"),
            "[green]pass[/]" if entry["passed"] else "[red]fail[/]",
        )
    console.print(table)
    if parity:
        console.print(f"validation inputs: {escape(str(parity['inputs']))}")
    files = ", ".join(sorted(manifest.files))
    console.print(f"wrote {escape(str(package))}: {escape(files)}")


def _number(value: Any, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
