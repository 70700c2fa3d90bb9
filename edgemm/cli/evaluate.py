"""`edgemm eval` and `edgemm eval-imagenet`: accuracy of a checkpoint on a dataset split, and of the image tower on ImageNet."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgemm.cli.common import console, report_errors, write_json
from edgemm.errors import ConfigError


@report_errors
def eval_command(
    checkpoint: Optional[Path] = typer.Argument(None, help="Checkpoint folder written by `edgemm train`.", show_default=False),
    dataset: Optional[str] = typer.Argument(
        None, help="Dataset folder (records.jsonl, records.csv or captions.csv with images/), or 'builtin'.", show_default=False
    ),
    split: str = typer.Option("dev", "--split", help="Split of the dataset to evaluate on."),
    imagenet: Optional[Path] = typer.Option(
        None, "--imagenet", help="Instead of a checkpoint: top-1 of the image tower's ImageNet classifier on this folder (labels.csv + images/)."
    ),
    image_tower: str = typer.Option("efficientnet-lite0", "--image-tower", help="Pretrained image tower for --imagenet."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse tower features cached by an earlier run with the same towers and inputs."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature cache folder; default: ~/.cache/edgemm/features (EDGEMM_CACHE_DIR overrides)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the metrics to this JSON file."),
) -> None:
    """Evaluate a checkpoint on a dataset split: matching accuracy and ROC-AUC, or recall@k for a dual encoder."""
    if imagenet is not None:
        _run_imagenet(imagenet, image_tower, json_out)
        return
    if checkpoint is None or dataset is None:
        raise ConfigError("Missing CHECKPOINT or DATASET.", "Run `edgemm eval CHECKPOINT DATASET`, or `edgemm eval --imagenet FOLDER`.")

    from edgemm.cli.train import feature_progress, resolve_dataset
    from edgemm.training.evaluate import evaluate_checkpoint
    from edgemm.training.features import default_cache_dir

    folder = resolve_dataset(dataset)
    with feature_progress() as progress:
        result = evaluate_checkpoint(
            checkpoint, folder, split=split, cache_dir=(cache_dir or default_cache_dir()) if cache else None, progress=progress
        )
    _print_checkpoint_result(result)
    if json_out is not None:
        write_json(json_out, result)
        console.print(f"Metrics written to {json_out}")


@report_errors
def eval_imagenet_command(
    folder: Path = typer.Argument(..., help="ImageNet sample folder with labels.csv (image,class_index,wnid,class_name) and images/.", show_default=False),
    image_tower: str = typer.Option("efficientnet-lite0", "--image-tower", help="Pretrained image tower (a name or a local .pth file)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the result to this JSON file."),
) -> None:
    """Measure top-1 accuracy of the image tower's own ImageNet classifier, with the tower's preprocessing."""
    _run_imagenet(folder, image_tower, json_out)


def _run_imagenet(folder: Path, image_tower: str, json_out: Path | None) -> None:
    from edgemm.cli.train import feature_progress
    from edgemm.training.evaluate import evaluate_imagenet

    with feature_progress() as progress:
        result = evaluate_imagenet(folder, image_tower=image_tower, progress=progress)
    spec = result["image_spec"]
    console.print(
        f"{result['image_tower']}: top-1 {100 * result['top1']:.2f} % on {result['images']} images of {folder} "
        f"(resize {spec['resize']}, crop {spec['crop']}, mean {spec['mean']}, std {spec['std']}; {result['seconds']:.0f} s)",
        highlight=False,
    )
    if json_out is not None:
        write_json(json_out, result)
        console.print(f"Result written to {json_out}")


def _print_checkpoint_result(result: dict[str, Any]) -> None:
    from rich.table import Table

    metrics = result["metrics"]
    table = Table(title=f"{result['architecture']} on split {result['split']!r} of {result['dataset']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if result["architecture"] == "dual_encoder":
        for direction in ("text_to_image", "image_to_text"):
            for k in (1, 5, 10):
                table.add_row(f"{direction.replace('_', ' ')} recall@{k}", f"{100 * metrics[f'{direction}_recall@{k}']:.1f} %")
        table.add_row("images / texts", f"{metrics['images']} / {metrics['texts']}")
    table.add_row("ROC-AUC", f"{metrics['roc_auc']:.4f}")
    if "accuracy" in metrics:
        table.add_row(f"accuracy at stored threshold {metrics['threshold']:.4f}", f"{100 * metrics['accuracy']:.1f} %")
    table.add_row(
        f"oracle accuracy (best threshold {metrics['oracle_threshold']:.4f} for these labels)", f"{100 * metrics['oracle_accuracy']:.1f} %"
    )
    table.add_row("pairs (positives)", f"{metrics['pairs']} ({metrics['positives']})")
    console.print(table)
    console.print(f"Pairs: {result['pairs']}.", highlight=False)


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("eval-imagenet")(eval_imagenet_command)
