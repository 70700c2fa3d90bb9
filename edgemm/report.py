"""Merge benchmark result files into a Markdown report with a CSV and PNG plots.

`build_report` reads files written by `edgemm bench`, from one or several machines and packages,
and writes `report.md`, `results.csv` (the rows of the main table) and, when matplotlib is
installed, PNG plots. Without matplotlib the report has tables only and a line that names the missing package.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from edgemm.bench.schema import ROW_COLUMNS, load_result, result_rows
from edgemm.errors import InputError
from edgemm.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

REPORT_NAME = "report.md"
CSV_NAME = "results.csv"
COLD_START_PHASES = ("interpreter_ms", "import_ms", "load_ms", "first_result_ms")
PLOT_NAMES = ("latency_distribution.png", "latency_scaling.png", "accuracy_latency_size.png", "cold_start.png")


@dataclass
class Report:
    """Paths and counts of the files `build_report` wrote."""

    markdown_path: Path
    csv_path: Path
    plot_paths: list[Path] = field(default_factory=list)
    plots_skipped_reason: str | None = None
    row_count: int = 0


@dataclass(frozen=True)
class _Entry:
    """One package measured on one machine, with a label that is unique across tables and plots."""

    label: str
    source: str
    machine: dict[str, Any]
    package: dict[str, Any]


def build_report(result_paths: Sequence[Path], out_dir: Path) -> Report:
    """Write report.md, results.csv and the plots for the given result files into `out_dir`.

    Raises `InputError` when no result file is given, a file is not a benchmark result of the
    supported schema version, or `out_dir` cannot be written.
    """
    if not result_paths:
        raise InputError("No benchmark result files given.", "Pass one or more JSON files written by `edgemm bench --out`.")
    results = [load_result(Path(path)) for path in result_paths]
    out_dir = Path(out_dir)
    _check_writable(out_dir)

    # Rows and labels name each result by its file name, or by its path when two names repeat.
    names = [Path(path).name for path in result_paths]
    sources = names if len(set(names)) == len(names) else [str(path) for path in result_paths]
    entries = _entries(results, sources)
    labels = {(entry.source, entry.package["name"]): entry.label for entry in entries}
    rows = []
    for result, source in zip(results, sources):
        for row in result_rows(result):
            rows.append({"source": source, "label": labels[(source, row["package"])], **row})

    csv_path = out_dir / CSV_NAME
    atomic_write_text(csv_path, _rows_to_csv(rows))

    plot_paths: list[Path] = []
    skipped_reason = None
    try:
        plot_paths = _write_plots(entries, out_dir)
    except ImportError as error:
        skipped_reason = f"matplotlib is not installed ({error}); install the plots extra: pip install 'edgemm[plots]'"
        logger.warning("Plots skipped: %s", skipped_reason)

    # A plot left from an earlier report in the same folder would contradict this one.
    for name in PLOT_NAMES:
        if out_dir / name not in plot_paths:
            (out_dir / name).unlink(missing_ok=True)

    markdown_path = out_dir / REPORT_NAME
    atomic_write_text(markdown_path, _markdown(results, sources, entries, rows, plot_paths, skipped_reason, out_dir))
    return Report(
        markdown_path=markdown_path,
        csv_path=csv_path,
        plot_paths=plot_paths,
        plots_skipped_reason=skipped_reason,
        row_count=len(rows),
    )


def _check_writable(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot create the report folder {out_dir}: {error.strerror}.", "Choose a writable --out folder.") from error
    if not os.access(out_dir, os.W_OK):
        raise InputError(f"Report folder {out_dir} is not writable.", "Choose a writable --out folder.")


def _entries(results: list[dict[str, Any]], sources: list[str]) -> list[_Entry]:
    """Label each package "NAME", or "NAME @ MACHINE" with several machines, and add "[FILE]" when a label repeats."""
    machine_names = {result["machine"].get("name") for result in results}
    entries = []
    for result, source in zip(results, sources):
        machine = result["machine"]
        for package in result["packages"]:
            label = package["name"]
            if len(machine_names) > 1:
                label = f"{label} @ {machine.get('name')}"
            entries.append(_Entry(label=label, source=source, machine=machine, package=package))

    counts: dict[str, int] = {}
    for entry in entries:
        counts[entry.label] = counts.get(entry.label, 0) + 1
    return [
        _Entry(label=f"{entry.label} [{entry.source}]", source=entry.source, machine=entry.machine, package=entry.package)
        if counts[entry.label] > 1
        else entry
        for entry in entries
    ]


def _rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    columns = ["source", "label", *ROW_COLUMNS]
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(row[key]) for key in columns})
    return buffer.getvalue()


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _markdown(
    results: list[dict[str, Any]],
    sources: list[str],
    entries: list[_Entry],
    rows: list[dict[str, Any]],
    plot_paths: list[Path],
    skipped_reason: str | None,
    out_dir: Path,
) -> str:
    lines = ["# edgemm benchmark report", ""]
    lines += [f"Merged from {len(results)} result file(s), {len(entries)} package measurement(s), {len(rows)} rows.", ""]

    lines += ["## Machines", ""]
    lines += _table(
        ["result file", "machine", "CPU", "cores (physical/logical)", "SIMD", "OS", "onnxruntime", "recorded"],
        [
            [
                source,
                result["machine"].get("name"),
                result["machine"].get("cpu_model"),
                f"{result['machine'].get('cores_physical')}/{result['machine'].get('cores_logical')}",
                ", ".join(name for name, present in (result["machine"].get("simd") or {}).items() if present) or "none found",
                (result["machine"].get("os") or {}).get("platform"),
                (result["machine"].get("onnxruntime") or {}).get("version"),
                result.get("created_at"),
            ]
            for result, source in zip(results, sources)
        ],
    )

    warnings = [(source, message) for result, source in zip(results, sources) for message in result.get("warnings", [])]
    if warnings:
        lines += ["## Warnings recorded by `edgemm bench`", ""]
        lines += [f"- {source}: {message}" for source, message in warnings]
        lines += [""]

    lines += ["## Packages", ""]
    lines += _table(
        ["label", "result file", "machine", "precision", "model size (MB)", "accuracy", "cold start median (ms)", "peak RSS (MB)"],
        [_package_cells(entry) for entry in entries],
    )

    lines += ["## Latency", ""]
    lines += [
        "Latency in milliseconds per batch over the timed runs; `end_to_end` includes image decoding, "
        "preprocessing and postprocessing, `inference` runs the ONNX graphs on prepared arrays.",
        "",
    ]
    columns = ["label", "precision", "threads", "batch_size", "mode", "runs", "p50_ms", "p90_ms", "p99_ms", "throughput_per_s", "speedup_vs_baseline"]
    lines += _table(columns, [[row[column] for column in columns] for row in rows])
    lines += [f"All columns are in `{CSV_NAME}`.", ""]

    lines += ["## Plots", ""]
    if skipped_reason is not None:
        lines += [f"Plots were skipped: {skipped_reason}. This report has tables only.", ""]
    for path in plot_paths:
        title = path.stem.replace("_", " ")
        lines += [f"![{title}]({path.relative_to(out_dir).as_posix()})", ""]
    return "\n".join(lines)


def _package_cells(entry: _Entry) -> list[Any]:
    from edgemm.bench.schema import headline_accuracy

    package = entry.package
    metric, value = headline_accuracy(package.get("manifest", {}).get("validation"))
    cold = package.get("cold_start") or {}
    cold_median = ((cold.get("summary") or {}).get("total_ms") or {}).get("median")
    peak = cold.get("peak_rss_bytes")
    return [
        entry.label,
        entry.source,
        entry.machine.get("name"),
        package.get("precision"),
        package["size"]["model_bytes"] / 1e6,
        f"{metric} {value:.4g}" if value is not None else "not recorded",
        cold_median,
        peak / 1e6 if peak is not None else None,
    ]


def _table(header: list[str], body: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for cells in body:
        lines.append("| " + " | ".join(_cell(value) for value in cells) + " |")
    lines.append("")
    return lines


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value).replace("|", "\\|")


def _write_plots(entries: list[_Entry], out_dir: Path) -> list[Path]:
    """Draw every plot; raises ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    machines = _machine_title(entries)
    figures = dict(
        zip(
            PLOT_NAMES,
            (
                _plot_distribution(plt, entries, machines),
                _plot_scaling(plt, entries, machines),
                _plot_tradeoff(plt, entries, machines),
                _plot_cold_start(plt, entries, machines),
            ),
        )
    )
    paths = []
    for name, figure in figures.items():
        if figure is None:
            continue
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        plt.close(figure)
        path = out_dir / name
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths


def _machine_title(entries: list[_Entry]) -> str:
    seen: dict[str, str] = {}
    for entry in entries:
        seen.setdefault(str(entry.machine.get("name")), str(entry.machine.get("cpu_model")))
    return "; ".join(f"{name} ({cpu})" for name, cpu in seen.items())


def _reference(package: dict[str, Any], mode: str | None = None) -> dict[str, Any] | None:
    """Return the result at the smallest batch size and thread count, preferring end-to-end mode."""
    results = package["results"]
    if not results:
        return None
    modes = [mode] if mode else ["end_to_end", "inference"]
    for requested_mode in modes:
        candidates = [result for result in results if result["mode"] == requested_mode]
        if candidates:
            return min(candidates, key=lambda result: (result["batch_size"], result["threads"]))
    return None


def _plot_distribution(plt: Any, entries: list[_Entry], machines: str) -> Any:
    modes = [mode for mode in ("end_to_end", "inference") if any(_reference(e.package, mode) for e in entries)]
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 4.5), squeeze=False)
    for axis, mode in zip(axes[0], modes):
        samples, labels = [], []
        for entry in entries:
            result = _reference(entry.package, mode)
            if result is None:
                continue
            samples.append(result["samples_ms"])
            labels.append(f"{entry.label}\n{result['threads']} thr, batch {result['batch_size']}")
        axis.boxplot(samples, showfliers=True)
        axis.set_xticks(range(1, len(labels) + 1), labels, rotation=20, ha="right", fontsize=8)
        axis.set_ylabel("latency per batch (ms)")
        axis.set_title(f"{mode.replace('_', ' ')}")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(f"Latency distribution over timed runs\n{machines}", fontsize=10)
    return figure


def _plot_scaling(plt: Any, entries: list[_Entry], machines: str) -> Any:
    figure, (threads_axis, batch_axis) = plt.subplots(1, 2, figsize=(11, 4.5))
    for entry in entries:
        reference = _reference(entry.package)
        if reference is None:
            continue
        mode = reference["mode"]
        results = [result for result in entry.package["results"] if result["mode"] == mode]

        smallest_batch = min(result["batch_size"] for result in results)
        by_threads = sorted((r["threads"], r["latency_ms"]["p50"]) for r in results if r["batch_size"] == smallest_batch)
        threads_axis.plot(*zip(*by_threads), marker="o", label=f"{entry.label} (batch {smallest_batch}, {mode})")

        max_threads = max(result["threads"] for result in results)
        by_batch = sorted((r["batch_size"], r["throughput_per_s"]) for r in results if r["threads"] == max_threads)
        batch_axis.plot(*zip(*by_batch), marker="o", label=f"{entry.label} ({max_threads} thr, {mode})")

    from matplotlib.ticker import MaxNLocator

    threads_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    threads_axis.set_xlabel("intra-op threads")
    threads_axis.set_ylabel("p50 latency per batch (ms)")
    threads_axis.set_title("Latency against threads")
    batch_axis.set_xlabel("batch size (samples)")
    batch_axis.set_ylabel("throughput (samples/s)")
    batch_axis.set_title("Throughput against batch size")
    for axis in (threads_axis, batch_axis):
        axis.grid(alpha=0.3)
        # Below the axes, so that the legend never hides a line.
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    figure.suptitle(machines, fontsize=10)
    return figure


def _plot_tradeoff(plt: Any, entries: list[_Entry], machines: str) -> Any:
    from edgemm.bench.schema import headline_accuracy

    points = []
    for entry in entries:
        reference = _reference(entry.package)
        if reference is None:
            continue
        metric, accuracy = headline_accuracy(entry.package.get("manifest", {}).get("validation"))
        size_mb = entry.package["size"]["model_bytes"] / 1e6
        points.append((entry.label, reference, metric, accuracy, size_mb))
    if not points:
        return None

    have_accuracy = any(point[3] is not None for point in points)
    figure, axis = plt.subplots(figsize=(7, 5))
    largest = max(point[4] for point in points) or 1.0
    for label, reference, metric, accuracy, size_mb in points:
        y_value = accuracy if have_accuracy else size_mb
        if y_value is None:
            continue
        area = 60 + 600 * size_mb / largest
        axis.scatter(reference["latency_ms"]["p50"], y_value, s=area, alpha=0.6, label=f"{label}: {size_mb:.3g} MB")
        axis.annotate(label, (reference["latency_ms"]["p50"], y_value), fontsize=8, xytext=(5, 5), textcoords="offset points")

    first = points[0][1]
    axis.set_xlabel(f"p50 latency per batch (ms), {first['threads']} thr, batch {first['batch_size']}, {first['mode']}")
    if have_accuracy:
        metrics = sorted({point[2] for point in points if point[2]})
        axis.set_ylabel(f"accuracy from the manifest ({', '.join(metrics)})")
        axis.set_title(f"Accuracy, latency and size (marker area: model size)\n{machines}", fontsize=10)
    else:
        axis.set_ylabel("model size on disk (MB)")
        axis.set_title(f"Latency and size (no manifest records accuracy)\n{machines}", fontsize=10)
    missing = [point[0] for point in points if point[3] is None]
    if have_accuracy and missing:
        note = "not shown, no accuracy in the manifest: " + ", ".join(missing)
        axis.text(0.01, 0.01, note, transform=axis.transAxes, fontsize=7, va="bottom")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, markerscale=0.4)
    return figure


def _plot_cold_start(plt: Any, entries: list[_Entry], machines: str) -> Any:
    measured = [entry for entry in entries if (entry.package.get("cold_start") or {}).get("summary")]
    if not measured:
        return None
    figure, axis = plt.subplots(figsize=(7, 1.2 + 0.6 * len(measured)))
    labels = [entry.label for entry in measured]
    left = [0.0] * len(measured)
    for phase in COLD_START_PHASES:
        widths = [entry.package["cold_start"]["summary"][phase]["median"] for entry in measured]
        axis.barh(labels, widths, left=left, label=phase.removesuffix("_ms").replace("_", " "))
        left = [start + width for start, width in zip(left, widths)]
    axis.set_xlabel("time from process start (ms, median over cold starts)")
    axis.set_title(f"Cold start by phase\n{machines}", fontsize=10)
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.grid(axis="x", alpha=0.3)
    return figure
