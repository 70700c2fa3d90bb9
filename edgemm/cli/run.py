"""`edgemm run`: run a model package on texts and images and print the result."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from edgemm.cli.common import console, report_errors
from edgemm.errors import InputError


def register(app: typer.Typer) -> None:
    app.command("run")(run_command)


@report_errors
def run_command(
    package: Path = typer.Argument(..., help="Model package folder (contains manifest.json).", show_default=False),
    text: List[str] = typer.Option([], "--text", "-t", help="Input text; repeat for several."),
    image: List[Path] = typer.Option([], "--image", "-i", help="Input image file; repeat for several."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON instead of a table."),
    threads: Optional[int] = typer.Option(None, "--threads", help="onnxruntime intra-op threads; default: one per physical core."),
    batch_size: int = typer.Option(32, "--batch-size", help="Inputs per onnxruntime call."),
) -> None:
    """Run a model package: classify text-image pairs, or score texts against images.

    A fusion classifier pairs the i-th --text with the i-th --image. A dual encoder scores
    every --text against every --image (cosine similarity). Without --text and --image,
    the sample inputs stored in the package are used.
    """
    import edgemm.runtime

    model = edgemm.runtime.load(package, threads=threads)
    if not text and not image:
        text, image = _package_samples(model)
    if model.kind == "dual_encoder":
        _run_dual_encoder(model, text, image, as_json, batch_size)
    else:
        _run_fusion(model, text, image, as_json, batch_size)


def _package_samples(model) -> tuple[list[str], list[Path]]:
    samples = model.manifest.samples
    texts = [str(text) for text in samples.get("texts", [])]
    images = []
    for image in samples.get("images", []):
        model.manifest.path(str(image))  # rejects a path that leaves the package
        images.append(model.manifest.package_dir / str(image))
    if not texts or not images:
        raise InputError(
            f"No --text or --image given, and {model.manifest.package_dir} stores no sample inputs.",
            "Pass --text and --image.",
        )
    return texts, images


def _run_fusion(model, texts: list[str], images: list[Path], as_json: bool, batch_size: int) -> None:
    if not texts or not images:
        raise InputError(
            f"Got {len(texts)} --text and {len(images)} --image options.",
            "A fusion classifier needs pairs: pass --text and --image once per pair.",
        )
    prediction = model.predict(texts, [str(path) for path in images], batch_size=batch_size)
    if as_json:
        data = prediction.to_dict()
        for item, text, path in zip(data["predictions"], texts, images):
            item.update(text=text, image=str(path))
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return

    table = Table(title=escape(f"{model.manifest.package_dir.name}: {model.manifest.architecture}"))
    table.add_column("text")
    table.add_column("image")
    table.add_column("label", style="bold")
    for name in prediction.label_names:
        table.add_column(f"p({name})", justify="right")
    for index, (text, path) in enumerate(zip(texts, images)):
        scores = [f"{score:.4f}" for score in prediction.scores[index]]
        table.add_row(escape(text), escape(str(path)), prediction.labels[index], *scores)
    console.print(table)
    if prediction.threshold is not None and prediction.match_score is not None:
        console.print(f"decision: match when p(match) >= {prediction.threshold}")


def _run_dual_encoder(model, texts: list[str], images: list[Path], as_json: bool, batch_size: int) -> None:
    if not texts or not images:
        raise InputError(
            f"Got {len(texts)} --text and {len(images)} --image options.",
            "A dual encoder scores texts against images: pass at least one of each.",
        )
    text_embeds = model.encode_text(texts, batch_size=batch_size)
    image_embeds = model.encode_image([str(path) for path in images], batch_size=batch_size)
    matrix = model.similarity(text_embeds, image_embeds)
    if as_json:
        data = {
            "texts": texts,
            "images": [str(path) for path in images],
            "similarity": matrix.round(6).tolist(),
            "logit_scale": model.logit_scale,
        }
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False))
        return

    table = Table(title=escape(f"{model.manifest.package_dir.name}: cosine similarity (text x image)"))
    table.add_column("text")
    for path in images:
        table.add_column(escape(path.name), justify="right")
    for text, row in zip(texts, matrix):
        best = int(row.argmax())
        cells = [f"[bold]{value:.4f}[/]" if index == best else f"{value:.4f}" for index, value in enumerate(row)]
        table.add_row(escape(text), *cells)
    console.print(table)
