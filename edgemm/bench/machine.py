"""Describe the machine a benchmark runs on: CPU, SIMD features, OS, Python and ONNX Runtime.

Latency figures mean little without this record. INT8 and FP16 graphs are fast only on CPUs with
the matching instructions (VNNI or AMX for INT8 on x86, the dot-product extension on Arm), so the
record names those features explicitly.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

import edgemm

logger = logging.getLogger(__name__)

# Feature name in the benchmark record -> flag names in /proc/cpuinfo (x86 "flags", Arm "Features").
LINUX_FEATURE_FLAGS: dict[str, tuple[str, ...]] = {
    "sse4_2": ("sse4_2",),
    "avx": ("avx",),
    "avx2": ("avx2",),
    "fma": ("fma",),
    "f16c": ("f16c",),
    "avx512f": ("avx512f",),
    "avx512bw": ("avx512bw",),
    "avx512_vnni": ("avx512_vnni",),
    "avx512_bf16": ("avx512_bf16",),
    "avx512_fp16": ("avx512_fp16",),
    "avx_vnni": ("avx_vnni",),
    "amx_tile": ("amx_tile",),
    "amx_int8": ("amx_int8",),
    "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"),
    "asimddp": ("asimddp",),
    "fp16": ("asimdhp", "fphp"),
    "i8mm": ("i8mm",),
    "bf16": ("bf16",),
    "sve": ("sve",),
    "sve2": ("sve2",),
}

# Feature name in the benchmark record -> macOS sysctl keys (Apple silicon and Intel Macs).
# NOTE: written from Apple's documented `hw.optional.*` keys; not yet run on a Mac.
MACOS_FEATURE_KEYS: dict[str, tuple[str, ...]] = {
    "sse4_2": ("hw.optional.sse4_2",),
    "avx": ("hw.optional.avx1_0",),
    "avx2": ("hw.optional.avx2_0",),
    "fma": ("hw.optional.fma",),
    "f16c": ("hw.optional.f16c",),
    "avx512f": ("hw.optional.avx512f",),
    "avx512bw": ("hw.optional.avx512bw",),
    "avx512_vnni": ("hw.optional.avx512vnni",),
    "neon": ("hw.optional.neon", "hw.optional.AdvSIMD"),
    "asimddp": ("hw.optional.arm.FEAT_DotProd",),
    "fp16": ("hw.optional.arm.FEAT_FP16", "hw.optional.neon_fp16"),
    "i8mm": ("hw.optional.arm.FEAT_I8MM",),
    "bf16": ("hw.optional.arm.FEAT_BF16",),
}


def describe_machine() -> dict[str, Any]:
    """Collect the machine record stored with every benchmark result (see docs/bench-schema.md)."""
    import numpy
    import onnxruntime

    cpu_model, simd, flags_source = _cpu_model_and_features()
    return {
        "name": platform.node(),
        "cpu_model": cpu_model,
        "architecture": platform.machine(),
        "cores_physical": psutil.cpu_count(logical=False),
        "cores_logical": psutil.cpu_count(logical=True),
        "cores_usable": usable_core_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "simd": simd,
        "simd_source": flags_source,
        "os": {"system": platform.system(), "release": platform.release(), "platform": platform.platform()},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation()},
        "onnxruntime": {
            "version": onnxruntime.__version__,
            "available_providers": list(onnxruntime.get_available_providers()),
        },
        "numpy": numpy.__version__,
        "edgemm_version": edgemm.__version__,
        "thread_environment": {
            name: os.environ.get(name)
            for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
        },
        "recorded_at": utc_timestamp(),
    }


def usable_core_count() -> int:
    """Return the number of logical cores this process may run on (affinity mask or cgroup set)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def utc_timestamp() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _cpu_model_and_features() -> tuple[str, dict[str, bool | None], str]:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        return parse_proc_cpuinfo(cpuinfo.read_text(errors="replace"))
    if sys.platform == "darwin":
        return _macos_model_and_features()
    unknown = {name: None for name in LINUX_FEATURE_FLAGS}
    return platform.processor() or "unknown", unknown, "unavailable"


def parse_proc_cpuinfo(text: str) -> tuple[str, dict[str, bool | None], str]:
    """Read the CPU model and SIMD features from the text of /proc/cpuinfo (x86 or Arm)."""
    model = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key in ("model name", "hardware", "cpu model") and model is None:
            model = value.strip()
        elif key in ("flags", "features"):
            flags.update(value.split())
    simd = {name: any(flag in flags for flag in names) for name, names in LINUX_FEATURE_FLAGS.items()}
    if model is None:
        # Arm kernels often print only "CPU implementer"/"CPU part" codes and no model name.
        model = platform.processor() or platform.machine() or "unknown"
    return model, simd, "/proc/cpuinfo"


def _macos_model_and_features() -> tuple[str, dict[str, bool | None], str]:
    try:
        output = subprocess.run(
            ["sysctl", "-a"], capture_output=True, text=True, timeout=10, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as error:
        logger.warning("Could not read CPU features with sysctl: %s", error)
        unknown = {name: None for name in LINUX_FEATURE_FLAGS}
        return platform.processor() or "unknown", unknown, "unavailable"
    return parse_sysctl(output)


def parse_sysctl(text: str) -> tuple[str, dict[str, bool | None], str]:
    """Read the CPU model and SIMD features from the output of `sysctl -a` on macOS."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        values[key.strip()] = value.strip()
    model = values.get("machdep.cpu.brand_string") or platform.processor() or "unknown"
    simd: dict[str, bool | None] = {name: False for name in LINUX_FEATURE_FLAGS}
    for name, keys in MACOS_FEATURE_KEYS.items():
        simd[name] = any(values.get(key) == "1" for key in keys)
    # Intel Macs also list leaf-7 features by name, e.g. "AVX2 AVX512F AVX512VNNI".
    leaf7 = set(values.get("machdep.cpu.leaf7_features", "").upper().split())
    simd["avx2"] = simd["avx2"] or "AVX2" in leaf7
    simd["avx512f"] = simd["avx512f"] or "AVX512F" in leaf7
    simd["avx512_vnni"] = simd["avx512_vnni"] or "AVX512VNNI" in leaf7
    return model, simd, "sysctl"
