"""Accuracy-aware quantization: find the nodes that cost accuracy and keep them in float.

`find_sensitive_nodes` runs the float and the quantized graph on the same feeds with every
intermediate tensor exposed, and ranks nodes by the relative L2 error that each adds to what
it received. `quantize_with_fallback` quantizes, evaluates, and excludes the top-ranked nodes
in doubling steps until the metric drop is within the limit.

`onnxruntime.quantization.qdq_loss_debug` is not used because it matches tensors through the
names of QDQ nodes only, so it cannot compare a dynamically quantized graph.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgemm.compression.quantize import (
    QuantizeConfig,
    QuantizeResult,
    example_feeds,
    quantize_model,
)
from edgemm.errors import AccuracyError, ConfigError
from edgemm.io import atomic_write_bytes

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class NodeSensitivity:
    """Quantization error at one node of the float graph.

    `error` is the relative L2 error of the node's output, ||quantized - float|| / ||float||,
    averaged over the feeds. `added_error` is `error` minus the largest error among its inputs:
    the part that this node's own quantization adds.
    """

    node: str
    op_type: str
    output: str
    error: float
    added_error: float


def find_sensitive_nodes(
    fp32_path: Path | str,
    quantized_path: Path | str,
    feeds: Feeds | Sequence[Feeds],
    top_k: int | None = 10,
    op_types: Sequence[str] | None = ("Conv", "MatMul", "Gemm"),
) -> list[NodeSensitivity]:
    """Rank the nodes of the float graph by the error their quantization adds, largest first.

    Only float tensors whose name exists in both graphs are compared: quantizers keep the
    output names of the nodes they replace. `op_types` limits the ranking to nodes that can be
    excluded from quantization (None ranks every node).

    NOTE: when static quantization folds a Relu or Clip into a Conv, the Conv's own output
    tensor disappears, so that Conv is missing from the ranking.
    """
    import onnx

    batches = [feeds] if isinstance(feeds, dict) else list(feeds)
    if not batches:
        raise ConfigError("find_sensitive_nodes got no feeds.", "Pass at least one feed dict.")

    float_model = onnx.load(str(fp32_path))
    quantized_model = onnx.load(str(quantized_path))
    quantized_tensors = {name for node in quantized_model.graph.node for name in node.output}
    graph_inputs = {value.name for value in float_model.graph.input}
    candidates = [
        output
        for node in float_model.graph.node
        for output in node.output
        if output and output in quantized_tensors
    ]

    float_values = _run_with_outputs(float_model, candidates, batches)
    quantized_values = _run_with_outputs(quantized_model, candidates, batches)

    errors: dict[str, float] = {}
    for name in candidates:
        pairs = list(zip(float_values[name], quantized_values[name]))
        if not all(_comparable(a, b) for a, b in pairs):
            continue
        errors[name] = float(np.mean([_relative_error(a, b) for a, b in pairs]))

    ranking = []
    for node in float_model.graph.node:
        if op_types is not None and node.op_type not in op_types:
            continue
        if not node.output or node.output[0] not in errors:
            continue
        input_errors = [errors.get(name, 0.0) for name in node.input if name in errors or name in graph_inputs]
        error = errors[node.output[0]]
        ranking.append(
            NodeSensitivity(
                node=node.name,
                op_type=node.op_type,
                output=node.output[0],
                error=error,
                added_error=error - max(input_errors, default=0.0),
            )
        )
    ranking.sort(key=lambda item: item.added_error, reverse=True)
    return ranking if top_k is None else ranking[:top_k]


def _run_with_outputs(model: Any, names: Sequence[str], batches: Sequence[Feeds]) -> dict[str, list[np.ndarray]]:
    """Run a copy of `model` that also outputs `names`; return the values per name and batch."""
    import onnx
    import onnxruntime as ort

    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    existing = {output.name for output in augmented.graph.output}
    for name in names:
        if name not in existing:
            # onnxruntime infers the type of an output that is declared by name only.
            augmented.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)

    session = ort.InferenceSession(augmented.SerializeToString(), providers=["CPUExecutionProvider"])
    output_names = [output.name for output in session.get_outputs()]
    requested = set(names)
    values: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for feeds in batches:
        for name, value in zip(output_names, session.run(output_names, feeds)):
            if name in requested:
                values[name].append(np.asarray(value))
    return values


def _comparable(reference: np.ndarray, other: np.ndarray) -> bool:
    return (
        reference.shape == other.shape
        and np.issubdtype(reference.dtype, np.floating)
        and np.issubdtype(other.dtype, np.floating)
    )


def _relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    reference = reference.astype(np.float64)
    other = other.astype(np.float64)
    return float(np.linalg.norm(other - reference) / (np.linalg.norm(reference) + 1e-12))


def quantize_with_fallback(
    fp32_path: Path | str,
    out_path: Path | str,
    config: QuantizeConfig,
    reader: Any,
    evaluate: Callable[[Path], float],
    max_drop: float,
    baseline: float | None = None,
    feeds: Feeds | Sequence[Feeds] | None = None,
    max_steps: int = 6,
) -> QuantizeResult:
    """Quantize, and keep the most error-prone nodes in float until the metric drop is within `max_drop`.

    `evaluate(model_path)` returns a metric where higher is better (accuracy, AUC, recall@k).
    `baseline` defaults to `evaluate(fp32_path)`. When the first quantized model drops more
    than `max_drop`, nodes are ranked once by `find_sensitive_nodes` on `feeds` (default: the
    reader's first batch) and the top 1, 2, 4, ... are excluded, for at most `max_steps`
    attempts. The returned result's `fallback` records every attempt and the nodes kept in
    float. Raises `AccuracyError` when no attempt meets the limit; `out_path` is then not written.
    """
    fp32_path = Path(fp32_path)
    out_path = Path(out_path)
    if max_drop < 0:
        raise ConfigError(f"max_drop={max_drop} is invalid.", "Use a drop of 0 or more, in the metric's unit.")
    if baseline is None:
        baseline = float(evaluate(fp32_path))

    with tempfile.TemporaryDirectory(prefix="edgemm-fallback-") as tmp:
        workdir = Path(tmp)
        first = workdir / "attempt_0.onnx"
        result = quantize_model(fp32_path, first, config, reader)
        score = float(evaluate(first))
        attempts = [{"nodes_kept_float": [], "score": score, "drop": baseline - score}]
        logger.info("Quantized metric %.4f (baseline %.4f, allowed drop %.4f)", score, baseline, max_drop)
        best = first

        if baseline - score > max_drop:
            if feeds is None:
                feeds = reader.first_batch() if hasattr(reader, "first_batch") else example_feeds(fp32_path)
            op_types = sorted(set(config.op_types_for("int8-static")) | set(config.op_types_for("int8-dynamic")))
            ranking = find_sensitive_nodes(fp32_path, first, feeds, top_k=None, op_types=op_types)
            ranked_names = [item.node for item in ranking if item.node not in config.nodes_to_exclude]
            if not ranked_names:
                raise AccuracyError(
                    f"The quantized model drops {baseline - score:.4f} (limit {max_drop}) and no node can be excluded.",
                    "Choose another mode or calibration method.",
                )

            count = 1
            for step in range(1, max_steps + 1):
                kept_float = ranked_names[:count]
                step_config = _with_excluded(config, kept_float)
                candidate = workdir / f"attempt_{step}.onnx"
                result = quantize_model(fp32_path, candidate, step_config, reader)
                score = float(evaluate(candidate))
                attempts.append({"nodes_kept_float": kept_float, "score": score, "drop": baseline - score})
                logger.info("Kept %d nodes in float: metric %.4f", len(kept_float), score)
                best = candidate
                if baseline - score <= max_drop or count >= len(ranked_names):
                    break
                count = min(count * 2, len(ranked_names))

        final_drop = attempts[-1]["drop"]
        if final_drop > max_drop:
            raise AccuracyError(
                f"The quantized model drops {final_drop:.4f} below the baseline {baseline:.4f} "
                f"(limit {max_drop}) even with {len(attempts[-1]['nodes_kept_float'])} nodes kept in float.",
                "Raise max_drop, allow more steps, or choose another mode or calibration method.",
            )
        atomic_write_bytes(out_path, best.read_bytes())

    result.output = str(out_path)
    result.fallback = {
        "baseline": baseline,
        "max_drop": max_drop,
        "attempts": attempts,
        "nodes_kept_float": attempts[-1]["nodes_kept_float"],
    }
    return result


def _with_excluded(config: QuantizeConfig, nodes: Sequence[str]) -> QuantizeConfig:
    values = asdict(config)
    values["nodes_to_exclude"] = tuple(dict.fromkeys((*config.nodes_to_exclude, *nodes)))
    return QuantizeConfig(**values)
