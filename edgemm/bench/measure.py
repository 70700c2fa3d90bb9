"""Timing loops, latency statistics and thread limits for benchmarks."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

logger = logging.getLogger(__name__)

# Variables read by OpenMP, OpenBLAS and MKL thread pools when a process starts.
THREAD_ENVIRONMENT_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")

# With a time budget, a setting still gets this many timed runs so the percentiles exist.
MIN_RUNS_WITH_BUDGET = 3


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of each timed run, and the process CPU time spent over all of them."""

    samples_s: list[float]
    wall_s: float
    cpu_s: float

    @property
    def cpu_time_ratio(self) -> float:
        """Process CPU time over wall time: about 1.0 when one core did the work."""
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0


def time_runs(
    run: Callable[[int], Any],
    runs: int,
    warmup: int,
    time_budget_s: float | None = None,
    on_run: Callable[[], None] | None = None,
) -> Timing:
    """Call `run(i)` `warmup` times untimed, then time each call with `time.perf_counter`.

    Without a budget there are exactly `runs` timed calls. With `time_budget_s`, timed calls go on
    until the budget is spent, with at least `MIN_RUNS_WITH_BUDGET` calls, and `runs` is ignored.
    `on_run` is called after every warm-up and timed call (for a progress bar).
    """
    for index in range(warmup):
        run(index)
        if on_run is not None:
            on_run()

    samples: list[float] = []
    cpu_start = time.process_time()
    wall_start = time.perf_counter()
    index = 0
    while True:
        if time_budget_s is None:
            if index >= runs:
                break
        elif index >= MIN_RUNS_WITH_BUDGET and time.perf_counter() - wall_start >= time_budget_s:
            break
        started = time.perf_counter()
        run(warmup + index)
        samples.append(time.perf_counter() - started)
        index += 1
        if on_run is not None:
            on_run()
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return Timing(samples_s=samples, wall_s=wall, cpu_s=cpu)


def latency_summary(samples_s: list[float]) -> dict[str, float]:
    """Summarise latencies in milliseconds: p50, p90, p99 (linear interpolation), mean, std, min, max."""
    import numpy as np

    values = np.asarray(samples_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def thread_environment(threads: int) -> dict[str, str]:
    """Return the environment variables that cap OpenMP, OpenBLAS and MKL pools at `threads`."""
    return {name: str(threads) for name in THREAD_ENVIRONMENT_VARIABLES}


@contextmanager
def limit_library_threads(threads: int) -> Iterator[str]:
    """Cap the numpy/BLAS/OpenMP thread pools already loaded in this process at `threads`.

    Yields "threadpoolctl" when threadpoolctl is installed and does the capping. Otherwise it
    yields "environment only" and caps nothing, because the variables of `thread_environment`
    take effect only in a new process. Cold-start processes get those variables.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield "environment only"
        return
    with threadpool_limits(limits=threads):
        yield "threadpoolctl"


def process_peak_rss_bytes() -> int | None:
    """Return this process's peak resident set size in bytes, or None where the OS does not report it.

    On Linux this is VmHWM from /proc/self/status, the high-water mark of the current address
    space. `ru_maxrss` is not used there, because it keeps the parent's peak across fork and
    exec, so a child started by a large benchmark process would report the parent's size.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    try:
        import resource
    except ImportError:
        resource = None
    if resource is not None:
        # NOTE: on macOS ru_maxrss is in bytes; whether it too carries the parent's peak over
        # fork and exec has not been checked.
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)

    import psutil

    peak_wset = getattr(psutil.Process().memory_info(), "peak_wset", None)  # Windows only
    return int(peak_wset) if peak_wset is not None else None
