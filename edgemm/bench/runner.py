"""Run a benchmark: every package x thread count x batch size x mode, plus cold starts.

`run_benchmark(config)` returns the result document described in docs/bench-schema.md. It logs
and never prints; the CLI draws the progress bar through the `on_progress` callback.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import edgemm
from edgemm.bench import machine
from edgemm.bench.inputs import BenchInputs, load_dataset_inputs, load_sample_inputs
from edgemm.bench.measure import latency_summary, limit_library_threads, time_runs
from edgemm.bench.schema import RESULT_FORMAT, SCHEMA_VERSION
from edgemm.errors import ConfigError, InputError

logger = logging.getLogger(__name__)

MODES = ("end_to_end", "inference")

# (description, units done); the CLI feeds it to a rich progress bar.
ProgressCallback = Callable[[str, int], None]


@dataclass(frozen=True)
class BenchConfig:
    """Settings of one benchmark run; `edgemm bench --help` describes each option."""

    packages: list[Path]
    threads: list[int] = field(default_factory=lambda: [1])
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    runs: int = 20
    warmup: int = 3
    time_budget_s: float | None = None
    dataset: Path | None = None
    baseline: Path | None = None
    cold_starts: int = 3
    preprocess: bool = True
    allow_spinning: bool = False
    providers: tuple[str, ...] = ("CPUExecutionProvider",)


def check_config(config: BenchConfig) -> list[str]:
    """Raise `ConfigError` for invalid settings and return warnings for suspicious but valid ones."""
    if not config.packages:
        raise ConfigError("No model package given.", "Pass one or more package folders: edgemm bench PKG [PKG ...].")
    for size in config.batch_sizes:
        if size <= 0:
            raise ConfigError(f"Invalid batch size {size}.", "Pass positive integers to --batch-sizes, e.g. --batch-sizes 1,8.")
    for count in config.threads:
        if count <= 0:
            raise ConfigError(f"Invalid thread count {count}.", "Pass positive integers to --threads, e.g. --threads 1,2.")
    if not config.threads or not config.batch_sizes:
        raise ConfigError("--threads and --batch-sizes need at least one value each.", "Example: --threads 1 --batch-sizes 1.")
    if config.time_budget_s is None and config.runs <= 0:
        raise ConfigError(f"Invalid --runs {config.runs}.", "Pass a positive number of timed runs, or --time-budget SECONDS.")
    if config.time_budget_s is not None and config.time_budget_s <= 0:
        raise ConfigError(f"Invalid --time-budget {config.time_budget_s}.", "Pass a positive number of seconds per setting.")
    if config.warmup < 0:
        raise ConfigError(f"Invalid --warmup {config.warmup}.", "Pass 0 or more warm-up runs.")
    if config.cold_starts < 0:
        raise ConfigError(f"Invalid --cold-starts {config.cold_starts}.", "Pass 0 or more cold-start processes.")

    warnings = []
    cores = machine.usable_core_count()
    for count in config.threads:
        if count > cores:
            warnings.append(
                f"--threads {count} is above the {cores} cores this process may use; "
                "threads will share cores, so latency at that setting measures oversubscription."
            )
    return warnings


def check_output_writable(path: Path) -> None:
    """Raise `InputError` when the result file cannot be written, before any measuring starts."""
    path = Path(path)
    folder = path.parent
    if path.is_dir():
        raise InputError(f"Output {path} is a folder.", "Pass a file name such as results.json to --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"Cannot create the output folder {folder}: {error.strerror}.", "Choose a writable --out path.") from error
    if not os.access(folder, os.W_OK):
        raise InputError(f"Output folder {folder} is not writable.", "Choose a writable --out path.")
    # os.access trusts permission bits, which root passes even where the file system rejects
    # new files (/proc, read-only mounts), so create and remove a probe file as well.
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise InputError(f"Output folder {folder} is not writable: {error.strerror}.", "Choose a writable --out path.") from error


def count_progress_steps(config: BenchConfig) -> int:
    """Return how many progress units `run_benchmark` reports for this configuration."""
    packages = len(_package_list(config))
    modes = 2 if config.preprocess else 1
    settings = len(config.threads) * len(config.batch_sizes) * modes
    return packages * (settings + config.cold_starts)


def run_benchmark(config: BenchConfig, on_progress: ProgressCallback | None = None, argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every package and return the result document (schema version `SCHEMA_VERSION`).

    Every package is loaded once with `edgemm.runtime.load` before anything is timed, so a broken
    package fails fast with a `PackageError`. Raises `ConfigError` for invalid settings and
    `DataError` for a bad dataset.
    """
    from edgemm.bench._cold import measure_cold_starts
    from edgemm.bench.harness import check_package

    warnings = check_config(config)
    for message in warnings:
        logger.debug(message)  # returned in the result's "warnings"; the CLI prints them before measuring
    progress = on_progress or (lambda description, done: None)

    load_before = _load_average()
    package_dirs = _package_list(config)
    manifests = {path: check_package(path, config.providers) for path in package_dirs}
    shared_inputs = load_dataset_inputs(config.dataset) if config.dataset is not None else None

    packages = []
    names = _unique_names(package_dirs)
    for path in package_dirs:
        inputs = shared_inputs if shared_inputs is not None else load_sample_inputs(manifests[path])
        is_baseline = config.baseline is not None and path.resolve() == Path(config.baseline).resolve()
        record = _package_record(manifests[path], names[path], is_baseline)
        record["inputs"] = inputs.source

        record["results"] = _measure_package(path, config, inputs, names[path], progress)
        record["cold_start"] = measure_cold_starts(
            path,
            threads=config.threads[0],
            runs=config.cold_starts,
            dataset=config.dataset,
            on_run=lambda: progress(f"{names[path]}: cold start", 1),
        )
        packages.append(record)

    _add_speedups(packages)
    load_after = _load_average()
    warnings += _contention_warnings(load_before, packages)
    return {
        "format": RESULT_FORMAT,
        "schema_version": SCHEMA_VERSION,
        "edgemm_version": edgemm.__version__,
        "created_at": machine.utc_timestamp(),
        "command": list(argv) if argv is not None else list(sys.argv),
        "machine": machine.describe_machine(),
        "settings": _settings_record(config, shared_inputs),
        "warnings": warnings,
        "load_average": {"before": load_before, "after": load_after},
        "packages": packages,
    }


def _load_average() -> list[float] | None:
    """Return the 1, 5 and 15 minute load averages, or None where the OS has none (Windows)."""
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _contention_warnings(load_before: list[float] | None, packages: list[dict[str, Any]]) -> list[str]:
    """Warn when other processes competed for the CPU, which makes latencies noisy and too high.

    The first sign is a 1-minute load average at or above the usable core count before the run
    started. The second is a 1-thread run whose process CPU time fell below 80% of its wall
    time, because a busy single thread with no I/O stays close to 100%.
    """
    warnings = []
    cores = machine.usable_core_count()
    if load_before is not None and load_before[0] >= cores:
        warnings.append(
            f"The 1-minute load average was {load_before[0]:.1f} on {cores} usable cores before the run started, "
            "so other processes competed for the CPU; re-run on an idle machine for stable figures."
        )
    ratios = [row["cpu_time_ratio"] for package in packages for row in package["results"] if row["threads"] == 1]
    if ratios and min(ratios) < 0.8:
        warnings.append(
            f"1-thread runs got as little as {min(ratios):.0%} of a core (cpu_time_ratio), so other processes "
            "competed for the CPU and those latencies are too high; re-run on an idle machine."
        )
    return warnings


def _package_list(config: BenchConfig) -> list[Path]:
    """Return the packages to measure, the baseline first unless it is also listed among them."""
    paths = [Path(path) for path in config.packages]
    if config.baseline is not None:
        baseline = Path(config.baseline)
        if baseline.resolve() not in {path.resolve() for path in paths}:
            paths.insert(0, baseline)
    return paths


def _unique_names(paths: list[Path]) -> dict[Path, str]:
    names: dict[Path, str] = {}
    used_names: set[str] = set()
    for path in paths:
        name = path.resolve().name
        candidate, index = name, 2
        while candidate in used_names:
            candidate, index = f"{name}-{index}", index + 1
        used_names.add(candidate)
        names[path] = candidate
    return names


def _package_record(manifest: Any, name: str, is_baseline: bool) -> dict[str, Any]:
    graph_files = set(manifest.graphs.values())
    model_bytes = sum(entry.bytes for file, entry in manifest.files.items() if file in graph_files or file.endswith(".data"))
    manifest_file = manifest.package_dir / "manifest.json"
    package_bytes = sum(entry.bytes for entry in manifest.files.values()) + manifest_file.stat().st_size
    return {
        "name": name,
        "path": str(manifest.package_dir),
        "baseline": is_baseline,
        "kind": manifest.kind,
        "architecture": manifest.architecture,
        "precision": manifest.precision,
        "size": {"model_bytes": model_bytes, "package_bytes": package_bytes},
        "manifest": {
            "edgemm_version": manifest.edgemm_version,
            "opset": manifest.opset,
            "graphs": dict(manifest.graphs),
            "compression": manifest.compression,
            "validation": manifest.validation,
        },
    }


def _measure_package(path: Path, config: BenchConfig, inputs: BenchInputs, name: str, progress: ProgressCallback) -> list[dict[str, Any]]:
    from edgemm.bench.harness import PackageHarness

    results = []
    for threads in config.threads:
        harness = PackageHarness.open(path, threads=threads, providers=config.providers, allow_spinning=config.allow_spinning)
        try:
            with limit_library_threads(threads) as library_limit:
                for batch_size in config.batch_sizes:
                    results += _measure_setting(harness, config, inputs, threads, batch_size, library_limit)
                    progress(f"{name}: {threads} thread(s), batch {batch_size}", 2 if config.preprocess else 1)
        finally:
            harness.close()
    return results


def _measure_setting(harness: Any, config: BenchConfig, inputs: BenchInputs, threads: int, batch_size: int, library_limit: str) -> list[dict[str, Any]]:
    batches = inputs.batches(batch_size)
    prepared = [harness.prepare(texts, images) for texts, images in batches]

    def run_inference(index: int) -> None:
        harness.infer(prepared[index % len(prepared)])

    def run_end_to_end(index: int) -> None:
        texts, images = batches[index % len(batches)]
        harness.end_to_end(texts, images)

    timings = {"inference": time_runs(run_inference, config.runs, config.warmup, config.time_budget_s)}
    if config.preprocess:
        timings["end_to_end"] = time_runs(run_end_to_end, config.runs, config.warmup, config.time_budget_s)

    results = []
    inference_p50 = latency_summary(timings["inference"].samples_s)["p50"]
    for mode in MODES:
        if mode not in timings:
            continue
        timing = timings[mode]
        latency = latency_summary(timing.samples_s)
        mean_s = latency["mean"] / 1000.0
        share = None
        if mode == "end_to_end" and latency["p50"] > 0:
            share = max(0.0, (latency["p50"] - inference_p50) / latency["p50"])
        results.append(
            {
                "threads": threads,
                "batch_size": batch_size,
                "mode": mode,
                "runs": len(timing.samples_s),
                "warmup": config.warmup,
                "distinct_batches": len(batches),
                "latency_ms": latency,
                "throughput_per_s": batch_size / mean_s if mean_s > 0 else None,
                "preprocess_share": share,
                "cpu_time_ratio": timing.cpu_time_ratio,
                "library_thread_limit": library_limit,
                "speedup_vs_baseline": None,
                "samples_ms": [round(sample * 1000.0, 4) for sample in timing.samples_s],
            }
        )
    return results


def _add_speedups(packages: list[dict[str, Any]]) -> None:
    """Set `speedup_vs_baseline` = baseline p50 / package p50 for each matching setting."""
    baseline = next((package for package in packages if package["baseline"]), None)
    if baseline is None:
        return
    reference = {(r["threads"], r["batch_size"], r["mode"]): r["latency_ms"]["p50"] for r in baseline["results"]}
    for package in packages:
        for result in package["results"]:
            base_p50 = reference.get((result["threads"], result["batch_size"], result["mode"]))
            if base_p50 is not None and result["latency_ms"]["p50"] > 0:
                result["speedup_vs_baseline"] = base_p50 / result["latency_ms"]["p50"]


def _settings_record(config: BenchConfig, shared_inputs: BenchInputs | None) -> dict[str, Any]:
    return {
        "threads": list(config.threads),
        "batch_sizes": list(config.batch_sizes),
        "runs": config.runs if config.time_budget_s is None else None,
        "warmup": config.warmup,
        "time_budget_s": config.time_budget_s,
        "cold_starts": config.cold_starts,
        "preprocess": config.preprocess,
        "providers": list(config.providers),
        "intra_op_allow_spinning": config.allow_spinning,
        "inter_op_num_threads": 1,
        "baseline": str(config.baseline) if config.baseline is not None else None,
        "inputs": shared_inputs.source if shared_inputs is not None else {"kind": "package_samples"},
    }
