"""`edgemm data`: generate synthetic scenes, import captions and inspect dataset folders."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.table import Table

from edgemm.cli.common import console, report_errors, write_json
from edgemm.errors import ConfigError

if TYPE_CHECKING:
    from edgemm.data.records import Record
    from edgemm.data.summary import SplitSummary

data_app = typer.Typer(
    help="Create and inspect datasets: synthetic shape scenes, captions import, counts per split.",
    no_args_is_help=True,
)


@data_app.command("synth")
@report_errors
def synth_command(
    out: Path = typer.Argument(..., help="Dataset folder to create.", show_default=False),
    n: int = typer.Option(1000, "--n", help="Number of scenes (images), one caption each."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scene stream; the same seed gives the same pixels."),
    image_size: int = typer.Option(128, "--image-size", help="Image width and height in pixels (at least 32)."),
    dev_fraction: float = typer.Option(0.2, "--dev-fraction", help="Fraction of scenes in the 'dev' split; the rest are 'train'."),
    image_format: str = typer.Option("png", "--format", help="Image file format: png (exact colours) or jpg."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUT if it exists."),
) -> None:
    """Generate captioned shape scenes with one-attribute hard negatives."""
    from rich.progress import Progress

    from edgemm.data.synthetic import generate_scenes

    if not 0.0 <= dev_fraction < 1.0:
        raise ConfigError(f"--dev-fraction {dev_fraction} is invalid.", "Use a fraction from 0 up to (not including) 1.")
    splits = (("train", 1.0 - dev_fraction), ("dev", dev_fraction)) if dev_fraction > 0 else (("train", 1.0),)

    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("Drawing scenes", total=n)
        records = generate_scenes(
            out,
            n,
            seed=seed,
            image_size=image_size,
            splits=splits,
            image_format=image_format,
            overwrite=overwrite,
            progress=lambda done, total: progress.update(task, completed=done),
        )
    console.print(f"Wrote {len(records)} scenes to {out}")
    _print_summary(records)


@data_app.command("import-captions")
@report_errors
def import_captions_command(
    csv_path: Path = typer.Argument(..., help="Captions CSV with columns image,caption[,split].", show_default=False),
    out: Path = typer.Option(..., "--out", help="Dataset folder to create.", show_default=False),
    images: Optional[Path] = typer.Option(
        None, "--images", help="Folder the CSV's image paths are relative to; default: images/ beside the CSV."
    ),
    copy: bool = typer.Option(False, "--copy", help="Copy the images instead of hard-linking them (across file systems they are always copied)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the --out folder if it exists."),
) -> None:
    """Turn a captions CSV into a dataset folder (records.jsonl and images/)."""
    from edgemm.data.captions import import_captions
    from edgemm.data.records import load_dataset

    folder = import_captions(csv_path, out, images_dir=images, copy_images=copy, overwrite=overwrite)
    records = load_dataset(folder)
    console.print(f"Imported {len(records)} captions into {folder}")
    _print_summary(records)


@data_app.command("info")
@report_errors
def info_command(
    folder: Path = typer.Argument(
        ..., help="Dataset folder (with records.jsonl, records.csv or captions.csv) or one such file.", show_default=False
    ),
    split: Optional[str] = typer.Option(None, "--split", help="Show only this split."),
    rows: int = typer.Option(5, "--rows", help="Number of example records to show."),
    check_images: bool = typer.Option(False, "--check-images", help="Also decode every image to find corrupt files."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the counts to this JSON file."),
) -> None:
    """Show counts per split, labels and example records of a dataset."""
    from edgemm.data.records import load_dataset

    records = load_dataset(folder, split=split, check_images=check_images)
    summaries = _print_summary(records)

    examples = Table(title=f"First {min(rows, len(records))} records")
    for column in ("image", "text", "label", "split", "negatives"):
        examples.add_column(column, overflow="fold")
    root = folder.resolve() if folder.is_dir() else folder.resolve().parent
    for record in records[: max(rows, 0)]:
        image = record.image.relative_to(root) if record.image.is_relative_to(root) else record.image
        label = "" if record.label is None else str(record.label)
        examples.add_row(str(image), record.text, label, record.split or "", "; ".join(record.negatives))
    console.print(examples)

    if json_out is not None:
        write_json(json_out, {"folder": str(folder), "splits": [summary.to_dict() for summary in summaries]})
        console.print(f"Counts written to {json_out}")


def _print_summary(records: list[Record]) -> list[SplitSummary]:
    from edgemm.data.summary import summarize

    summaries = summarize(records)
    table = Table(title="Records per split")
    for column in ("split", "records", "images", "label 1", "label 0", "no label", "with hard negatives"):
        table.add_column(column, justify="left" if column == "split" else "right")
    for summary in summaries:
        table.add_row(
            summary.split,
            str(summary.records),
            str(summary.images),
            str(summary.matches),
            str(summary.mismatches),
            str(summary.unlabelled),
            str(summary.with_negatives),
        )
    console.print(table)
    return summaries


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
