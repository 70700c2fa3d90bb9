"""The benchmark result file: its version, how to read it back and how to flatten it into rows.

The fields are documented in docs/bench-schema.md. Increase `SCHEMA_VERSION` whenever a field
is removed, renamed or changes meaning; adding a field keeps the version.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgemm.errors import InputError

RESULT_FORMAT = "edgemm-bench"
SCHEMA_VERSION = 1

# Columns of the flat rows shared by the bench table, report.md and results.csv.
ROW_COLUMNS = (
    "machine",
    "cpu_model",
    "package",
    "precision",
    "threads",
    "batch_size",
    "mode",
    "runs",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "mean_ms",
    "min_ms",
    "max_ms",
    "throughput_per_s",
    "preprocess_share",
    "cpu_time_ratio",
    "speedup_vs_baseline",
    "model_mb",
    "cold_start_ms",
    "peak_rss_mb",
    "accuracy_metric",
    "accuracy",
)

# Metric names tried in order when picking one accuracy figure from a manifest's validation record.
# `edgemm compress` records "accuracy" (percent) for fusion models and recall@k (percent) for dual encoders.
ACCURACY_KEYS = (
    "accuracy",
    "text_to_image_recall@1",
    "matching_accuracy",
    "top1",
    "top1_accuracy",
    "recall@1",
    "roc_auc",
    "auc",
)


def load_result(path: Path) -> dict[str, Any]:
    """Read a benchmark result file and check its format and schema version.

    Raises `InputError` when the file is missing, not JSON, not a benchmark result, or written
    with another schema version.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Benchmark result {path} not found.", "Pass a JSON file written by `edgemm bench --out`.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}.", "Pass a file written by `edgemm bench --out`.") from error
    check_result(data, path)
    return data


def check_result(data: Any, source: Path | str) -> None:
    """Raise `InputError` unless `data` is a benchmark result of schema version `SCHEMA_VERSION`."""
    if not isinstance(data, dict) or data.get("format") != RESULT_FORMAT:
        raise InputError(
            f"{source} is not an edgemm benchmark result (expected \"format\": \"{RESULT_FORMAT}\").",
            "Pass a JSON file written by `edgemm bench --out`.",
        )
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(
            f"{source} has benchmark schema version {version!r}, but this edgemm reads only version {SCHEMA_VERSION}.",
            "Run `edgemm bench` again with this edgemm version, or report it with the edgemm version that wrote it.",
        )
    for key in ("machine", "settings", "packages"):
        if key not in data:
            raise InputError(f"{source} lacks the field {key!r} required by schema version {SCHEMA_VERSION}.", "The file is damaged; run `edgemm bench` again.")


def headline_accuracy(validation: dict[str, Any] | None) -> tuple[str | None, float | None]:
    """Pick one accuracy figure of the packaged model from a manifest's `validation` record.

    Looks, in this order, in `validation["after"]` (what `edgemm compress` writes: the metrics of
    the compressed model), in `validation["accuracy"]["compressed"]` and in
    `validation["accuracy"]`, for a `{"metric": NAME, "value": X}` pair or the first of
    `ACCURACY_KEYS`. A plain number in `validation["accuracy"]` counts too. Returns
    (metric name, value), or (None, None) when none is found.
    """
    if not validation:
        return None, None
    accuracy = validation.get("accuracy")
    if _is_number(accuracy):
        return "accuracy", float(accuracy)
    candidates = [validation.get("after")]
    if isinstance(accuracy, dict):
        candidates += [accuracy.get("compressed"), accuracy]
    for candidate in candidates:
        if not isinstance(candidate, dict):
            continue
        metric = candidate.get("metric")
        if isinstance(metric, str) and _is_number(candidate.get("value")):
            return metric, float(candidate["value"])
        for key in ACCURACY_KEYS:
            if _is_number(candidate.get(key)):
                return key, float(candidate[key])
    return None, None


def result_rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Flatten a result into one row per package, threads, batch size and mode (columns `ROW_COLUMNS`)."""
    machine = data["machine"]
    rows = []
    for package in data["packages"]:
        metric, accuracy = headline_accuracy(package.get("manifest", {}).get("validation"))
        cold = package.get("cold_start") or {}
        cold_total = (cold.get("summary") or {}).get("total_ms") or {}
        peak_rss = cold.get("peak_rss_bytes")
        for result in package["results"]:
            latency = result["latency_ms"]
            rows.append(
                {
                    "machine": machine.get("name"),
                    "cpu_model": machine.get("cpu_model"),
                    "package": package["name"],
                    "precision": package.get("precision"),
                    "threads": result["threads"],
                    "batch_size": result["batch_size"],
                    "mode": result["mode"],
                    "runs": result["runs"],
                    "p50_ms": latency["p50"],
                    "p90_ms": latency["p90"],
                    "p99_ms": latency["p99"],
                    "mean_ms": latency["mean"],
                    "min_ms": latency["min"],
                    "max_ms": latency["max"],
                    "throughput_per_s": result["throughput_per_s"],
                    "preprocess_share": result.get("preprocess_share"),
                    "cpu_time_ratio": result.get("cpu_time_ratio"),
                    "speedup_vs_baseline": result.get("speedup_vs_baseline"),
                    "model_mb": package["size"]["model_bytes"] / 1e6,
                    "cold_start_ms": cold_total.get("median"),
                    "peak_rss_mb": peak_rss / 1e6 if peak_rss is not None else None,
                    "accuracy_metric": metric,
                    "accuracy": accuracy,
                }
            )
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
