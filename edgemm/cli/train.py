"""`edgemm train`: train a matching model or a dual encoder and save a checkpoint."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer

from edgemm.cli.common import console, err_console, report_errors, write_json

BUILTIN_DATASET = "builtin"
# Size and seed of the built-in synthetic scenes dataset (80 % train, 20 % dev).
BUILTIN_SCENES = 600
BUILTIN_SEED = 0
BUILTIN_IMAGE_SIZE = 128


def builtin_dataset_folder() -> Path:
    """Return the folder of the built-in synthetic scenes, generating it on first use."""
    from edgemm.data.synthetic import generate_scenes
    from edgemm.training.features import default_cache_dir

    folder = default_cache_dir().parent / "datasets" / f"builtin-scenes-{BUILTIN_SCENES}-seed{BUILTIN_SEED}"
    if not (folder / "records.jsonl").is_file():
        err_console.print(f"Generating {BUILTIN_SCENES} synthetic scenes into {folder}", highlight=False)
        generate_scenes(folder, BUILTIN_SCENES, seed=BUILTIN_SEED, image_size=BUILTIN_IMAGE_SIZE, overwrite=True)
    return folder


def resolve_dataset(dataset: str) -> Path:
    """Turn the DATASET argument (a folder or `builtin`) into a dataset folder."""
    if dataset == BUILTIN_DATASET and not Path(dataset).exists():
        return builtin_dataset_folder()
    return Path(dataset)


@contextmanager
def feature_progress(epochs: int = 0) -> Iterator[Callable[[str, int, int], None]]:
    """Yield a progress(stage, done, total) callback that drives rich progress bars on stderr."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    descriptions = {"text": "text features", "image": "image features", "epoch": "epochs"}
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        tasks: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(descriptions.get(stage, stage), total=total)
            progress.update(tasks[stage], completed=done, total=total)

        yield update


@report_errors
def train_command(
    dataset: str = typer.Argument(
        ..., help="Dataset folder (records.jsonl, records.csv or captions.csv with images/), or 'builtin' for synthetic scenes.", show_default=False
    ),
    out: Path = typer.Option(..., "--out", "-o", help="Checkpoint folder to write.", show_default=False),
    arch: str = typer.Option("concat_fusion", "--arch", help="Architecture: concat_fusion, cross_attention or dual_encoder."),
    text_tower: str = typer.Option("minilm-l6", "--text-tower", help="Text tower: minilm-l6, tiny or a local MiniLM folder."),
    image_tower: str = typer.Option("efficientnet-lite0", "--image-tower", help="Image tower: efficientnet-lite0, tiny or a local .pth file."),
    epochs: int = typer.Option(10, "--epochs", help="Passes over the training pairs."),
    batch_size: int = typer.Option(64, "--batch-size", help="Pairs per optimisation step (per process under torchrun)."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate of the head."),
    tower_lr: float = typer.Option(2e-5, "--tower-lr", help="AdamW learning rate of the towers with --unfreeze."),
    weight_decay: float = typer.Option(0.01, "--weight-decay", help="AdamW weight decay."),
    unfreeze: bool = typer.Option(False, "--unfreeze", help="Fine-tune the towers end to end instead of training the head on cached features."),
    augment: bool = typer.Option(True, "--augment/--no-augment", help="Random crop, flip (with the caption mirrored), rotation and colour jitter of images; only with --unfreeze."),
    negatives: int = typer.Option(1, "--negatives", help="Mismatched captions per true caption (fusion models)."),
    calibration_fraction: float = typer.Option(
        0.15, "--calibration-fraction", help="Fraction of train images held out to pick the epoch and fit the decision threshold."
    ),
    split: str = typer.Option("train", "--split", help="Split of the dataset to train on."),
    seed: int = typer.Option(0, "--seed", help="Seed of the head's initial weights, the pairs and the held-out images."),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="Reuse tower features cached by an earlier run with the same towers and inputs."),
    cache_dir: Optional[Path] = typer.Option(None, "--cache-dir", help="Feature cache folder; default: ~/.cache/edgemm/features (EDGEMM_CACHE_DIR overrides)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out folder if it exists."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the training summary to this JSON file."),
) -> None:
    """Train a model on a dataset's train split and save a checkpoint with its decision threshold."""
    from edgemm.training.features import default_cache_dir
    from edgemm.training.train import TrainConfig, train

    config = TrainConfig(
        architecture=arch,
        text_tower=text_tower,
        image_tower=image_tower,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        tower_lr=tower_lr,
        weight_decay=weight_decay,
        seed=seed,
        freeze_towers=not unfreeze,
        augment=augment,
        negatives_per_positive=negatives,
        calibration_fraction=calibration_fraction,
        train_split=split,
        feature_cache_dir=(cache_dir or default_cache_dir()) if cache else None,
        overwrite=overwrite,
    )
    config.validate()
    folder = resolve_dataset(dataset)

    # Under torchrun only rank 0 reports, and the other ranks train silently.
    is_main = os.environ.get("RANK", "0") == "0"
    if is_main:
        with feature_progress() as progress:
            result = train(config, folder, out, progress=progress)
    else:
        result = train(config, folder, out)
    if not is_main:
        return

    summary = _summary(result, folder)
    _print_result(summary)
    if json_out is not None:
        write_json(json_out, summary)
        console.print(f"Summary written to {json_out}")


def _summary(result: Any, folder: Path) -> dict[str, Any]:
    from dataclasses import asdict

    summary = asdict(result)
    summary["checkpoint"] = str(result.checkpoint)
    summary["dataset"] = str(folder)
    return summary


def _print_result(summary: dict[str, Any]) -> None:
    from rich.table import Table

    dual = summary["architecture"] == "dual_encoder"
    table = Table(title=f"Training history ({summary['architecture']})")
    table.add_column("epoch", justify="right")
    table.add_column("train loss", justify="right")
    table.add_column("held-out ROC-AUC", justify="right")
    if dual:
        table.add_column("held-out R@5 text->image", justify="right")
    table.add_column("seconds", justify="right")
    for entry in summary["history"]:
        held_out = entry.get("calibration", {})
        marker = " *" if entry["epoch"] == summary["best_epoch"] else ""
        row = [f"{entry['epoch']}{marker}", f"{entry['train_loss']:.4f}", _format(held_out.get("roc_auc"))]
        if dual:
            row.append(_format(held_out.get("text_to_image_recall@5")))
        row.append(f"{entry['seconds']:.1f}")
        table.add_row(*row)
    console.print(table)

    calibration = summary["calibration"]
    console.print(
        f"Kept epoch {summary['best_epoch']} (*). Decision threshold {summary['decision_threshold']:.4f}, fitted on "
        f"{summary['threshold_source']}: accuracy {calibration['accuracy']:.4f}, ROC-AUC {calibration['roc_auc']:.4f} "
        f"on {calibration['pairs']} pairs.",
        highlight=False,
    )
    seconds = summary["seconds"]
    console.print(
        f"Checkpoint written to {summary['checkpoint']} (features {seconds['features']:.0f} s, training "
        f"{seconds['training']:.0f} s, total {seconds['total']:.0f} s).",
        highlight=False,
    )


def _format(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
