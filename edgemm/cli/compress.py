"""`edgemm compress`: from a trained checkpoint to a validated, compressed model package."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgemm.cli.common import console, report_errors, write_json

DEMO_DIR = Path("demo-out")


def register(app: typer.Typer) -> None:
    app.command(
        "compress",
        help=(
            "Prune, recover, export, quantize, validate and package a checkpoint. "
            "With no CHECKPOINT, run the built-in demo: train the reference model on generated "
            "scenes, compress it, benchmark it and print a summary."
        ),
    )(compress_command)


@report_errors
def compress_command(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder (from `edgemm train`). Omit it to run the built-in demo."),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="Recipe TOML, e.g. export/x86-avx512-vnni.toml. Default: the built-in recipe."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", "-c", help="Calibration-set TOML for static INT8, e.g. calibration/flickr8k.toml."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output package folder. Default with a checkpoint: CHECKPOINT-compressed; for the demo: demo-out/package."),
    dataset: Optional[Path] = typer.Option(None, "--dataset", "-d", help="Dataset or captions folder for recovery, calibration and validation. Default: the one the checkpoint was trained on."),
    prune_ratio: Optional[float] = typer.Option(None, "--prune-ratio", help="Fraction of channels to remove in every part, strictly between 0 and 1 (overrides prune.ratio)."),
    text_ratio: Optional[float] = typer.Option(None, "--text-ratio", help="Prune ratio of the text tower (overrides prune.text_ratio)."),
    image_ratio: Optional[float] = typer.Option(None, "--image-ratio", help="Prune ratio of the image tower (overrides prune.image_ratio)."),
    no_prune: bool = typer.Option(False, "--no-prune", help="Skip pruning and recovery."),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="Largest image edge in pixels the package is served with. A model trained smaller keeps its size (overrides input.image_size)."),
    recover_epochs: Optional[int] = typer.Option(None, "--recover-epochs", help="Distillation epochs after pruning (overrides recover.epochs)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", "-q", help="Quantization mode: int8-static, int8-dynamic, fp16 or none (overrides quantize.mode)."),
    calibration_method: Optional[str] = typer.Option(None, "--calibration-method", help="Static INT8 calibration: minmax, entropy or percentile."),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", help="Largest allowed accuracy drop in percentage points (default 1); recall@5 for dual encoders uses --max-recall-drop."),
    max_recall_drop: Optional[float] = typer.Option(None, "--max-recall-drop", help="Largest allowed text-to-image recall@5 drop in points for dual encoders (default 2)."),
    opset: Optional[int] = typer.Option(None, "--opset", help="ONNX opset of the exported graphs (default 18)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    keep_work: Optional[Path] = typer.Option(None, "--keep-work", help="Keep intermediate files (pruned checkpoint, FP32 graphs) in this folder."),
    recovery_cache: Optional[Path] = typer.Option(
        None, "--recovery-cache", help="Store pruned and recovered models here, and reuse one when checkpoint, data and the prune, recover and input settings match."
    ),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the summary and validation results to this JSON file."),
) -> None:
    from edgemm.compression.recipe import load_recipe

    overrides = {
        "prune.ratio": prune_ratio,
        "prune.text_ratio": text_ratio,
        "prune.image_ratio": image_ratio,
        "prune.enabled": False if no_prune else None,
        "recover.enabled": False if no_prune else None,
        "input.image_size": image_size,
        "recover.epochs": recover_epochs,
        "quantize.mode": quantize,
        "quantize.calibration_method": calibration_method,
        "validate.max_accuracy_drop": max_accuracy_drop,
        "validate.max_recall_drop": max_recall_drop,
        "export.opset": opset,
    }
    loaded = load_recipe(recipe, overrides)

    if checkpoint is None:
        from edgemm.cli.demo import run_demo

        run_demo(loaded, out or DEMO_DIR / "package", calibration, json_out)
        return

    out = out or checkpoint.with_name(checkpoint.name + "-compressed")
    result = run_compress(checkpoint, loaded, out, dataset, calibration, overwrite, keep_work, recovery_cache)
    print_summary(result)
    if json_out is not None:
        write_json(json_out, {"package": str(result.package), "summary": result.summary, "validation": result.validation})


def run_compress(checkpoint, recipe, out, dataset, calibration, overwrite, keep_work, recovery_cache=None):
    """Run the pipeline with a progress display of its stages."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from edgemm.compression.pipeline import CompressSettings, compress

    settings = CompressSettings(
        checkpoint=checkpoint,
        out=out,
        recipe=recipe,
        dataset=dataset,
        calibration=calibration,
        overwrite=overwrite,
        keep_work=keep_work,
        recovery_cache=recovery_cache,
    )
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=False) as progress:
        current = {"task": None}

        def on_stage(name: str) -> None:
            if current["task"] is not None:
                progress.update(current["task"], completed=1, total=1)
            current["task"] = progress.add_task(name, total=None)

        result = compress(settings, on_stage=on_stage)
        if current["task"] is not None:
            progress.update(current["task"], completed=1, total=1)
    return result


def print_summary(result) -> None:
    table = Table(title=f"edgemm compress: {result.package}")
    table.add_column("metric")
    table.add_column("original (FP32)", justify="right")
    table.add_column("compressed", justify="right")
    table.add_column("change (ratio or points)", justify="right")
    for row in result.summary:
        before, after = row["before"], row["after"]
        if row["metric"] in ("accuracy", "roc_auc") or "recall" in row["metric"]:
            # Task metrics change in points, the unit of the --max-*-drop limits.
            change = f"{after - before:+.4g}"
        else:
            change = f"{after / before:.2f}x" if before else ""
        table.add_row(row["metric"], f"{before:.4g}", f"{after:.4g}", change)
    console.print(table)
    latency = result.validation.get("latency", {})
    if latency.get("speedup"):
        console.print(f"Speed-up (p50, batch 1, {latency['threads']} thread): {latency['speedup']:.2f}x")
    fallback = result.manifest.get("compression", {}).get("quantization", {}).get("accuracy_fallback")
    if fallback and fallback["nodes_kept_float"]:
        names = ", ".join(escape(name) for name in fallback["nodes_kept_float"])
        console.print(f"Kept in float to keep {fallback['metric']} within {fallback['max_drop']:g} points: {names}")
    console.print(f"Validation passed on {result.validation.get('num_samples')} samples; package written to {result.package} in {result.seconds:.0f} s.")
