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
    full: bool = typer.Option(False, "--full", help="Also print every field of the compression and validation records."),
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
    _print_summary(summary, full=full)


def package_summary(model) -> dict[str, Any]:
    """Return the manifest of a loaded package with each graph's inputs and outputs filled in."""
    manifest = model.manifest
    summary = dict(manifest.data)
    summary["package_dir"] = str(manifest.package_dir)
    summary["graphs"] = model.describe_graphs()
    summary["total_bytes"] = sum(entry.bytes for entry in manifest.files.values())
    return summary


def _print_summary(summary: dict[str, Any], full: bool) -> None:
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

    console.print(_record_table(summary))
    if not full:
        console.print("Pass --full to list every field of the compression and validation records.")
        return
    for section in ("compression", "validation"):
        record = summary.get(section) or {}
        table = Table(title=f"{section.capitalize()} record", show_header=False)
        table.add_column("field")
        table.add_column("value")
        for key, value in _flatten(record):
            table.add_row(escape(key), _format(value))
        if not record:
            table.add_row("(none)", "the package records no " + section)
        console.print(table)


# Summary rows, each with the dotted paths of its value in the manifest. The records differ
# between the steps that write them (compress, export), so a row lists several paths and
# the first one present wins.
_RECORD_ROWS = (
    ("prune ratio", ("compression.prune.ratio",)),
    ("pruned", ("compression.prune.enabled",)),
    ("params before", ("compression.size.total.params_before", "compression.prune.params_before")),
    ("params after", ("compression.size.total.params_after", "compression.prune.params_after")),
    ("MACs before", ("compression.size.total.macs_before", "compression.prune.macs_before")),
    ("MACs after", ("compression.size.total.macs_after", "compression.prune.macs_after")),
    ("image size before", ("compression.input.image_size_before",)),
    ("image size after", ("compression.input.image_size_after",)),
    ("quantization", ("compression.quantization.mode", "compression.quantization.scheme")),
    ("quantization per tower", ("compression.quantization.towers",)),
    ("precision", ("compression.quantization.precision",)),
    ("activation type", ("compression.quantization.activation_type",)),
    ("per-channel", ("compression.quantization.per_channel",)),
    ("nodes kept in float", ("compression.quantization.accuracy_fallback.nodes_kept_float",)),
    ("calibration method", ("compression.quantization.calibration.method", "compression.calibration.method")),
    ("calibration samples", ("compression.quantization.calibration.samples", "compression.calibration.size")),
    ("calibration source", ("compression.calibration.source", "compression.calibration.path")),
    ("accuracy before", ("validation.before.accuracy", "validation.accuracy.before")),
    ("accuracy after", ("validation.after.accuracy", "validation.accuracy.after")),
    ("ROC-AUC before", ("validation.before.roc_auc",)),
    ("ROC-AUC after", ("validation.after.roc_auc",)),
    ("text-to-image recall@5 before", ("validation.before.text_to_image_recall@5",)),
    ("text-to-image recall@5 after", ("validation.after.text_to_image_recall@5",)),
    ("parity: max |score diff|", ("validation.parity.max_abs_score_diff", "validation.parity.max_abs_logit_diff", "validation.parity.max_abs_diff")),
    ("parity: decision agreement", ("validation.parity.decision_agreement",)),
    ("validation passed", ("validation.passed", "validation.parity.passed")),
)


def _record_table(summary: dict[str, Any]) -> Table:
    table = Table(title="Compression and validation", show_header=False)
    table.add_column("field")
    table.add_column("value")
    for label, paths in _RECORD_ROWS:
        value = next((found for found in (_lookup(summary, path) for path in paths) if found is not None), None)
        if value is not None:
            table.add_row(label, _format(value))
    if not table.rows:
        table.add_row("(none)", "the package records no compression or validation results")
    return table


def _lookup(data: dict[str, Any], dotted: str) -> Any:
    value: Any = data
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


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
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
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
