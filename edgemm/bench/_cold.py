"""Cold start: time a fresh process from its start to the first result of a model package.

The parent (`measure_cold_starts`) starts `python -m edgemm.bench._cold PKG ...` several times
with the thread variables set. The child runs what an application on the device runs:
`edgemm.runtime.load(PKG, threads=T)` and one `predict` (fusion classifier) or `similarity`
(dual encoder) on one real input. It reports, as one JSON line on stdout, when each phase
ended: interpreter start-up, reading the input (left out of the total), importing the runtime
(onnxruntime, numpy, Pillow), loading and checking the package, and the first result. It also
reports its peak resident memory.

The module's top level imports only the standard library, so the import phase of the child
measures the runtime's own imports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

PHASES = ("interpreter_ms", "input_read_ms", "import_ms", "load_ms", "first_result_ms", "total_ms")

# A cold start of a large model on a slow device can take a while, but not this long.
CHILD_TIMEOUT_S = 600

_MODULE_STARTED = time.time()


def measure_cold_starts(
    package_dir: Path,
    threads: int,
    runs: int,
    dataset: Path | None = None,
    on_run: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Start `runs` fresh processes on the package and summarise their phases and peak memory.

    Raises `PackageError` when a child process fails, with the last lines of its stderr.
    """
    from edgemm.bench.measure import thread_environment

    env = dict(os.environ)
    env.update(thread_environment(threads))
    records = []
    for _ in range(runs):
        records.append(_run_child(package_dir, threads, dataset, env))
        if on_run is not None:
            on_run()
    return {
        "threads": threads,
        "batch_size": 1,
        "thread_environment": thread_environment(threads),
        "runs": records,
        "summary": _summarise(records) if records else None,
        "peak_rss_bytes": max((r["peak_rss_bytes"] for r in records if r["peak_rss_bytes"] is not None), default=None),
    }


def _run_child(package_dir: Path, threads: int, dataset: Path | None, env: dict[str, str]) -> dict[str, Any]:
    from edgemm.errors import PackageError

    command = [sys.executable, "-m", "edgemm.bench._cold", str(package_dir), "--threads", str(threads)]
    if dataset is not None:
        command += ["--dataset", str(dataset)]
    command += ["--spawned-at", repr(time.time())]
    try:
        completed = subprocess.run(command, capture_output=True, text=True, env=env, timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise PackageError(
            f"Cold start of {package_dir} timed out after {CHILD_TIMEOUT_S} s.",
            "Check that the package loads with `edgemm run`; pass --cold-starts 0 to skip this measurement.",
        ) from error
    if completed.returncode != 0:
        tail = " | ".join(completed.stderr.strip().splitlines()[-3:])
        raise PackageError(
            f"Cold start of {package_dir} failed with exit code {completed.returncode}: {tail}",
            "Check that the package loads with `edgemm run`; pass --cold-starts 0 to skip this measurement.",
        )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _summarise(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    import statistics

    summary = {}
    for phase in PHASES:
        values = [record[phase] for record in records]
        summary[phase] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return summary


def _child(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m edgemm.bench._cold")
    parser.add_argument("package", type=Path)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dataset", type=Path)
    parser.add_argument("--spawned-at", type=float, required=True, help="time.time() of the parent just before it started this process")
    args = parser.parse_args(argv)

    from edgemm.bench.inputs import load_dataset_inputs, load_sample_inputs
    from edgemm.bench.measure import process_peak_rss_bytes
    from edgemm.runtime.manifest import read_manifest

    # Reading the input is the application's business, so it is timed apart and left out of total_ms.
    if args.dataset is not None:
        inputs = load_dataset_inputs(args.dataset, max_pairs=1)
    else:
        inputs = load_sample_inputs(read_manifest(args.package, verify_checksums=False))
    inputs_read = time.time()

    import edgemm.runtime.model

    imported = time.time()

    model = edgemm.runtime.model.load(args.package, threads=args.threads)
    loaded = time.time()

    if model.kind == "dual_encoder":
        model.similarity(inputs.texts[:1], inputs.images[:1])
    else:
        model.predict(inputs.texts[:1], inputs.images[:1])
    finished = time.time()

    input_read_s = inputs_read - _MODULE_STARTED
    record = {
        "interpreter_ms": (_MODULE_STARTED - args.spawned_at) * 1000.0,
        "input_read_ms": input_read_s * 1000.0,
        "import_ms": (imported - inputs_read) * 1000.0,
        "load_ms": (loaded - imported) * 1000.0,
        "first_result_ms": (finished - loaded) * 1000.0,
        "total_ms": (finished - args.spawned_at - input_read_s) * 1000.0,
        "peak_rss_bytes": process_peak_rss_bytes(),
    }
    print(json.dumps(record))
    return 0


def _main() -> int:
    from edgemm.errors import EdgemmError

    try:
        return _child(sys.argv[1:])
    except EdgemmError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(_main())
