"""Latency, throughput, memory and cold-start benchmarks of model packages. Torch-free.

`run_benchmark(BenchConfig(...))` returns a result document (docs/bench-schema.md); the
`edgemm bench` command and `python -m edgemm.bench` wrap it. This package's import stays light
(no onnxruntime or numpy), because cold-start processes import it before their timed import phase.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "run_benchmark", "SCHEMA_VERSION"]


def __getattr__(name: str) -> Any:
    if name in ("BenchConfig", "run_benchmark"):
        from edgemm.bench import runner

        return getattr(runner, name)
    if name == "SCHEMA_VERSION":
        from edgemm.bench.schema import SCHEMA_VERSION

        return SCHEMA_VERSION
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
