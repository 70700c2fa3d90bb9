"""`edgemm inspect`: verify a model package and print what it contains."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from edgemm.cli.common import console, report_errors


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect_command)


@report_errors
def inspect_command(
    package: Path = typer.Argument(..., help="Model package folder (contains manifest.json).", show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
) -> None:
    """Verify a model package (checksums, opset, graph inputs and outputs) and summarise it.

    Shows the kind, the input preprocessing, the outputs, the files and their sizes, the
    precision and opset, the compression record and the validation record.
    """
    import edgemm.runtime

    model = edgemm.runtime.load(package)
    summary = package_summary(model)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        return
    _print_summary(summary)


def package_summary(model) -> dict[str, Any]:
    """Return the manifest of a loaded package with each graph's inputs and outputs filled in."""
    manifest = model.manifest
    summary = dict(manifest.data)
    summary["package_dir"] = str(manifest.package_dir)
    summary["graphs"] = model.describe_graphs()
    summary["total_bytes"] = sum(entry.bytes for entry in manifest.files.values())
    return summary


def _print_summary(summary: dict[str, Any]) -> None:
    console.print(f"[bold]{escape(summary['package_dir'])}[/]: verified (sizes, SHA-256 checksums, opset, graph inputs and outputs)")
    overview = Table(title="Package", show_header=False)
    overview.add_column("field")
    overview.add_column("value")
    for key in ("kind", "architecture", "precision", "opset", "labels", "decision_threshold", "logit_scale", "edgemm_version", "format_version"):
        overview.add_row(key, _format(summary.get(key)))
    console.print(overview)

    text, image = summary["inputs"]["text"], summary["inputs"]["image"]
    inputs = Table(title="Inputs", show_header=False)
    inputs.add_column("field")
    inputs.add_column("value")
    inputs.add_row("text", f"{text['tokenizer']} tokenizer, vocabulary {text['vocab_file']}, lowercase {text['lowercase']}, "
                   f"strip accents {text['strip_accents']}, max length {text['max_length']} tokens")
    inputs.add_row("image", f"resize shorter side to {image['resize']} ({image['resample']}), centre crop {image['crop']}x{image['crop']}, "
                   f"{image['channel_order']} {image['layout']} {image['dtype']}")
    inputs.add_row("normalisation", f"(pixel - mean) / std on the 0-255 scale, mean {_format(image['mean'])}, std {_format(image['std'])}")
    console.print(inputs)

    graphs = Table(title="Graphs")
    for column in ("graph", "file", "opsets", "inputs", "outputs"):
        graphs.add_column(column)
    for name, graph in summary["graphs"].items():
        opsets = "\n".join(f"{escape(domain or 'ai.onnx')} {version}" for domain, version in graph["opsets"].items())
        graphs.add_row(name, escape(graph["file"]), opsets, _format_io(graph["inputs"]), _format_io(graph["outputs"]))
    console.print(graphs)

    outputs = Table(title="Outputs")
    for column in ("name", "shape", "meaning"):
        outputs.add_column(column)
    for name, output in summary["outputs"].items():
        outputs.add_row(escape(name), _format(output.get("shape")), _format(output.get("meaning", "")))
    console.print(outputs)

    files = Table(title=f"Files ({_format_bytes(summary['total_bytes'])} in total)")
    for column in ("file", "size", "sha256"):
        files.add_column(column, justify="right" if column == "size" else "left")
    for name, entry in summary["files"].items():
        files.add_row(escape(name), _format_bytes(entry["bytes"]), entry["sha256"][:16] + "...")
    console.print(files)

    for section in ("compression", "validation"):
        record = summary.get(section) or {}
        table = Table(title=section.capitalize(), show_header=False)
        table.add_column("field")
        table.add_column("value")
        for key, value in _flatten(record):
            table.add_row(escape(key), _format(value))
        if not record:
            table.add_row("(none)", "the package records no " + section)
        console.print(table)


def _flatten(record: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows = []
    for key, value in record.items():
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{prefix}{key}."))
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _format_io(items: dict[str, Any]) -> str:
    return "\n".join(f"{escape(name)}: {item['type']} {_format(item['shape'])}" for name, item in items.items())


def _format(value: Any) -> str:
    """Format a value for a rich table cell, escaping brackets that rich would read as markup."""
    return escape(_plain(value))


def _plain(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        if all(isinstance(item, (str, int, float, bool)) or item is None for item in value):
            return "[" + ", ".join(_plain(item) for item in value) + "]"
        return json.dumps(value)
    return str(value)


def _format_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")
