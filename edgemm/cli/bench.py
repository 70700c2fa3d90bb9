"""`edgemm bench`: latency, throughput, memory and cold start of model packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from edgemm.cli.common import console, err_console, report_errors, write_json
from edgemm.errors import ConfigError

MODE_LABELS = {"end_to_end": "e2e", "inference": "infer"}


def parse_int_list(text: str, option: str) -> list[int]:
    """Parse "1,2,4" into [1, 2, 4]. Raises `ConfigError` naming `option` for any other text."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            values.append(int(part))
        except ValueError:
            raise ConfigError(
                f"Invalid {option} value {part!r} in {text!r}.",
                f"Pass comma-separated integers, e.g. {option} 1,2.",
            ) from None
    return values


@report_errors
def bench_command(
    packages: list[Path] = typer.Argument(..., help="Model package folders to measure.", show_default=False),
    threads: str = typer.Option("1", "--threads", help="Comma-separated intra-op thread counts, e.g. 1,2,4."),
    batch_sizes: str = typer.Option("1", "--batch-sizes", help="Comma-separated batch sizes in samples, e.g. 1,8."),
    runs: int = typer.Option(20, "--runs", help="Timed runs per setting (ignored with --time-budget)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed warm-up runs before the timed runs of each setting."),
    time_budget: Optional[float] = typer.Option(
        None, "--time-budget", help="Seconds of timed runs per setting, instead of a fixed --runs (at least 3 runs)."
    ),
    dataset: Optional[Path] = typer.Option(
        None, "--dataset", help="Dataset folder (records.jsonl or captions.csv) to take inputs from; default: the package's samples."
    ),
    baseline: Optional[Path] = typer.Option(
        None, "--baseline", help="FP32 package to compute speed-ups against; it is measured too."
    ),
    cold_starts: int = typer.Option(3, "--cold-starts", help="Fresh processes to time from start to first result (0 skips)."),
    preprocess: bool = typer.Option(
        True, "--preprocess/--no-preprocess", help="Also time end-to-end runs (decode, preprocess, run, postprocess)."
    ),
    allow_spinning: bool = typer.Option(
        False, "--allow-spinning", help="Let onnxruntime worker threads spin between runs (off by default for fair comparisons)."
    ),
    out: Path = typer.Option(Path("bench-results.json"), "--out", help="JSON file to write the results to."),
) -> None:
    """Measure latency (p50/p90/p99), throughput, cold start and peak memory of model packages."""
    from edgemm.bench.runner import BenchConfig, check_config, check_output_writable, run_benchmark

    config = BenchConfig(
        packages=list(packages),
        threads=parse_int_list(threads, "--threads"),
        batch_sizes=parse_int_list(batch_sizes, "--batch-sizes"),
        runs=runs,
        warmup=warmup,
        time_budget_s=time_budget,
        dataset=dataset,
        baseline=baseline,
        cold_starts=cold_starts,
        preprocess=preprocess,
        allow_spinning=allow_spinning,
    )
    early_warnings = check_config(config)
    for message in early_warnings:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False)
    check_output_writable(out)

    result = run_with_progress(config, run_benchmark)
    write_json(out, result)
    print_tables(result)
    for message in result["warnings"][len(early_warnings) :]:
        err_console.print(f"[yellow]warning:[/] {message}", highlight=False)
    console.print(f"Results written to {out}")


def run_with_progress(config: Any, run_benchmark: Any) -> dict[str, Any]:
    """Call `run_benchmark(config)` under a rich progress bar on stderr and return its result."""
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from edgemm.bench.runner import count_progress_steps

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task("loading packages", total=count_progress_steps(config))

        def on_progress(description: str, done: int) -> None:
            progress.update(task, advance=done, description=description)

        return run_benchmark(config, on_progress=on_progress, argv=sys.argv)


def print_tables(result: dict[str, Any]) -> None:
    """Print the machine line, the latency table and the size/cold-start/memory table of a result."""
    from rich.table import Table

    machine = result["machine"]
    simd = ", ".join(name for name, present in machine["simd"].items() if present) or "none found"
    console.print(
        f"[bold]{machine['cpu_model']}[/], {machine['cores_physical']} physical / {machine['cores_logical']} logical cores, "
        f"onnxruntime {machine['onnxruntime']['version']}; SIMD: {simd}",
        highlight=False,
    )

    latency = Table(title="Latency per batch (ms); e2e = decode + preprocess + run + postprocess")
    name_width = max(len(package["name"]) for package in result["packages"])
    latency.add_column("package", min_width=name_width)
    for column in ("thr", "batch", "mode", "runs", "p50", "p90", "p99", "samples/s", "pre %", "CPU/wall", "speed-up"):
        latency.add_column(column, justify="left" if column == "mode" else "right")
    for package in result["packages"]:
        for row in package["results"]:
            stats = row["latency_ms"]
            latency.add_row(
                package["name"],
                str(row["threads"]),
                str(row["batch_size"]),
                MODE_LABELS[row["mode"]],
                str(row["runs"]),
                f"{stats['p50']:.2f}",
                f"{stats['p90']:.2f}",
                f"{stats['p99']:.2f}",
                f"{row['throughput_per_s']:.1f}",
                _percent(row["preprocess_share"]),
                f"{row['cpu_time_ratio']:.2f}",
                _speedup(row["speedup_vs_baseline"]),
            )
    console.print(latency)

    packages = Table(title="Size, cold start (median) and peak memory")
    packages.add_column("package", min_width=name_width)
    for column in ("precision", "model MB", "cold start ms", "import/load/first ms", "peak RSS MB"):
        packages.add_column(column, justify="left" if column == "precision" else "right")
    for package in result["packages"]:
        cold = package["cold_start"]
        summary = cold["summary"] if cold else None
        phases = "n/a"
        total = "n/a"
        if summary:
            total = f"{summary['total_ms']['median']:.0f}"
            phases = " / ".join(f"{summary[phase]['median']:.0f}" for phase in ("import_ms", "load_ms", "first_result_ms"))
        peak = cold["peak_rss_bytes"] if cold else None
        packages.add_row(
            package["name"],
            package["precision"],
            f"{package['size']['model_bytes'] / 1e6:.2f}",
            total,
            phases,
            f"{peak / 1e6:.0f}" if peak is not None else "n/a",
        )
    console.print(packages)


def _speedup(value: float | None) -> str:
    """Format a speed-up against the baseline, in red when the package is slower than the baseline."""
    if value is None:
        return ""
    return f"[red]{value:.2f}x[/]" if value < 1.0 else f"{value:.2f}x"


def _percent(value: float | None) -> str:
    return "" if value is None else f"{value * 100:.0f}%"


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
