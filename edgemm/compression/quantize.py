"""Quantize an exported FP32 ONNX graph with ONNX Runtime: static INT8 (QDQ), dynamic INT8, FP16.

`quantize_model` applies one `QuantizeConfig`, runs the result once in onnxruntime and returns
a `QuantizeResult` whose `to_dict()` is the manifest's `compression.quantization` record.

Choices that protect accuracy or correctness by default:
- Static INT8 quantizes only Conv, MatMul and Gemm. Transformer towers lose much more accuracy
  when LayerNorm, Softmax, GELU and residual Adds are quantized too.
- Dynamic INT8 quantizes only MatMul nodes with a constant weight, per-channel when the
  weight has rank 2 and per-tensor otherwise. With onnxruntime 1.32, a per-channel dynamic
  MatMul with a 3-D weight writes a model that fails at inference ("MatmulInteger : b zero
  point is not valid").
- `quant_pre_process` (shape inference and graph optimization) can fail on exported attention
  with a bare AssertionError from symbolic shape inference. The fallback is logged and recorded.

Which recipe is fastest depends on the CPU: measure with `measure_latency` instead of assuming
that INT8 is faster than FP32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edgemm.errors import CompressionError, ConfigError
from edgemm.io import atomic_write_bytes

logger = logging.getLogger(__name__)

MODES = ("int8-static", "int8-dynamic", "fp16", "none")
TOWER_MODES = ("int8-static", "int8-dynamic", "none")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
QUANT_TYPES = ("int8", "uint8")
TOWERS = ("text", "image")

# Relu and Clip (ReLU6) are folded into the quantized output of the Conv before them.
DEFAULT_STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Relu", "Clip")
# Outputs of these stay float: onnxruntime then runs DQ -> MatMul as MatMulIntegerToFloat, and
# bias Adds, Softmax and GELU after a projection see unrounded values.
STATIC_FLOAT_OUTPUT_OP_TYPES = ("MatMul", "Gemm")
# onnxruntime's dynamic (integer) quantizer handles Conv, MatMul, Attention, LSTM and Gather.
# Conv becomes ConvInteger, which can be slower than FP32 Conv, so it is left out by default.
DEFAULT_DYNAMIC_OP_TYPES = ("MatMul",)
# The operator types onnxruntime's dynamic quantizer can turn into integer operators. Other types
# in a shared `op_types` list (Add, Clip for a static image tower) stay float in dynamic mode.
DYNAMIC_OP_TYPES = ("Attention", "Conv", "EmbedLayerNormalization", "Gather", "LSTM", "MatMul", "Transpose")
HISTOGRAM_METHODS = ("entropy", "percentile")


@dataclass
class QuantizeConfig:
    """Settings of one quantization run.

    Args:
        mode: "int8-static" (QDQ, needs a calibration reader), "int8-dynamic", "fp16" or "none".
        per_channel: per-channel weight scales (default True). Dynamic per-channel applies
            only to MatMul weights of rank 2; other weights get one scale per tensor.
        calibration_method: "minmax", "entropy" or "percentile" (static only).
        percentile: the percentile kept by the "percentile" method, in percent.
        op_types_to_quantize: operator types to quantize. None picks the mode's default.
        nodes_to_exclude: node names that stay in float.
        text_mode, image_mode: a mode for the nodes of one tower ("int8-static",
            "int8-dynamic" or "none" for FP32). None uses `mode`. Nodes outside both towers
            (the fusion head) use `mode`.
        weight_only: with "int8-dynamic", store MatMul weights as 8-bit blocks (MatMulNBits)
            and keep activations in float.
        activation_type, weight_type: "int8" or "uint8". Use uint8 activations on x86.
            There onnxruntime (1.32) rewrites int8 activations of a QDQ graph to uint8, but not
            for every node group. A Conv whose input was rewritten and whose output was not
            runs in float between Dequantize and Quantize nodes. With uint8, every Conv of
            EfficientNet-Lite0 became a QLinearConv and the image tower ran 2x faster than FP32.
        reduce_range: 7-bit weights, for CPUs without VNNI where 8-bit products can saturate.
        pre_process: run `quant_pre_process` first, falling back to the raw graph if it fails.
    """

    mode: str = "int8-static"
    # Measured on concat_fusion with MiniLM-L6 and EfficientNet-Lite0 (16 Flickr8k dev pairs,
    # onnxruntime 1.32, 2-core Xeon): dynamic INT8 with per-tensor weights gave 0.29 relative
    # logit error and per-channel weights 0.08, at the same latency within noise.
    per_channel: bool = True
    calibration_method: str = "minmax"
    percentile: float = 99.999
    op_types_to_quantize: tuple[str, ...] | None = None
    nodes_to_exclude: tuple[str, ...] = ()
    text_mode: str | None = None
    image_mode: str | None = None
    weight_only: bool = False
    activation_type: str = "int8"
    weight_type: str = "int8"
    reduce_range: bool = False
    pre_process: bool = True

    def __post_init__(self) -> None:
        _check_choice("mode", self.mode, MODES)
        _check_choice("calibration_method", self.calibration_method, CALIBRATION_METHODS)
        _check_choice("activation_type", self.activation_type, QUANT_TYPES)
        _check_choice("weight_type", self.weight_type, QUANT_TYPES)
        for name in ("text_mode", "image_mode"):
            value = getattr(self, name)
            if value is not None:
                _check_choice(name, value, TOWER_MODES)
        if self.mode == "fp16" and (self.text_mode or self.image_mode):
            raise ConfigError(
                "Per-tower modes cannot be combined with mode='fp16'.",
                "Use fp16 for the whole graph, or int8/none per tower.",
            )
        if self.weight_only and self.mode != "int8-dynamic":
            raise ConfigError(f"weight_only=True needs mode='int8-dynamic', not {self.mode!r}.")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise ConfigError(f"percentile={self.percentile} is invalid.", "Use a value in (0, 100], e.g. 99.999.")
        self.nodes_to_exclude = tuple(self.nodes_to_exclude)
        if self.op_types_to_quantize is not None:
            self.op_types_to_quantize = tuple(self.op_types_to_quantize)

    @classmethod
    def from_recipe(cls, section: dict[str, Any]) -> "QuantizeConfig":
        """Build a config from a recipe's `[quantize]` section (keys of `edgemm.compression.recipe`)."""
        names = {
            "mode": "mode",
            "per_channel": "per_channel",
            "calibration_method": "calibration_method",
            "percentile": "percentile",
            "op_types": "op_types_to_quantize",
            "exclude_nodes": "nodes_to_exclude",
            "text_mode": "text_mode",
            "image_mode": "image_mode",
            "pre_process": "pre_process",
            "reduce_range": "reduce_range",
            "activation_type": "activation_type",
            "weight_type": "weight_type",
        }
        values = {names[key]: value for key, value in section.items() if key in names}
        return cls(**values)

    def tower_mode(self, tower: str | None) -> str:
        """Return the mode that applies to the nodes of `tower` ("text", "image" or None)."""
        override = {"text": self.text_mode, "image": self.image_mode}.get(tower or "")
        return override or self.mode

    def op_types_for(self, mode: str) -> tuple[str, ...]:
        if self.op_types_to_quantize is not None:
            return self.op_types_to_quantize
        return DEFAULT_STATIC_OP_TYPES if mode == "int8-static" else DEFAULT_DYNAMIC_OP_TYPES

    def per_channel_for(self, mode: str) -> bool:
        return self.per_channel


@dataclass
class QuantizeResult:
    """Record of one quantization run: the manifest's `compression.quantization` entry."""

    mode: str
    precision: str
    per_channel: bool
    op_types: list[str]
    nodes_excluded: list[str]
    nodes_quantized: dict[str, int]
    towers: dict[str, str]
    calibration: dict[str, Any] | None
    pre_process: dict[str, Any]
    activation_type: str
    weight_type: str
    reduce_range: bool
    weight_only: bool
    bytes_before: int
    bytes_after: int
    output: str
    notes: list[str] = field(default_factory=list)
    # Set by `quantize_with_fallback`: the attempts and the nodes kept in float.
    fallback: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"Quantization {name}={value!r} is invalid.", f"Use one of: {', '.join(choices)}.")


def quantize_model(
    fp32_path: Path | str,
    out_path: Path | str,
    config: QuantizeConfig,
    calibration_reader: Any = None,
) -> QuantizeResult:
    """Quantize the FP32 graph at `fp32_path` into `out_path` and check that it runs.

    `calibration_reader` (an onnxruntime `CalibrationDataReader`, e.g.
    `EdgemmCalibrationReader`) is required when any node is static INT8. Raises `ConfigError`
    for an invalid combination of settings and `CompressionError` when onnxruntime fails to
    quantize or the quantized graph fails its first inference.
    """
    import onnx

    fp32_path = Path(fp32_path)
    out_path = Path(out_path)
    if not fp32_path.is_file():
        raise CompressionError(f"ONNX model {fp32_path} not found.", "Export the model first (edgemm export).")
    if out_path.resolve() == fp32_path.resolve():
        raise ConfigError(f"Output {out_path} is the input model.", "Write the quantized model to another path.")

    with tempfile.TemporaryDirectory(prefix="edgemm-quantize-") as tmp:
        workdir = Path(tmp)
        original = onnx.load(str(fp32_path))
        _name_unnamed_nodes(original)
        source = workdir / "named.onnx"
        onnx.save(original, str(source))

        pre_process = {"requested": config.pre_process, "used": False, "fallback_reason": None}
        int8_modes = _int8_modes(config)
        if int8_modes and config.pre_process:
            source, pre_process = run_pre_process(source, workdir)

        if config.mode == "none" and not int8_modes:
            final = source
            counts: dict[str, int] = {}
            notes: list[str] = []
            calibration = None
        elif config.mode == "fp16":
            final = workdir / "fp16.onnx"
            _convert_fp16(source, final, config)
            counts, notes, calibration = {"fp16": 1}, [], None
        else:
            final, counts, notes, calibration = _quantize_int8(
                source, original, workdir, config, calibration_reader
            )

        model_bytes = final.read_bytes()
        check_inference(final, config.mode, calibration_reader)
        atomic_write_bytes(out_path, model_bytes)

    result = QuantizeResult(
        mode=config.mode,
        precision=_precision(config, counts),
        per_channel=any(config.per_channel_for(mode) for mode in _int8_modes(config)),
        op_types=sorted({op for mode in _int8_modes(config) for op in config.op_types_for(mode)}),
        nodes_excluded=sorted(config.nodes_to_exclude),
        nodes_quantized=counts,
        towers={tower: config.tower_mode(tower) for tower in TOWERS},
        calibration=calibration,
        pre_process=pre_process,
        activation_type=config.activation_type,
        weight_type=config.weight_type,
        reduce_range=config.reduce_range,
        weight_only=config.weight_only,
        bytes_before=model_bytes_on_disk(fp32_path),
        bytes_after=model_bytes_on_disk(out_path),
        output=str(out_path),
        notes=notes,
    )
    logger.info(
        "Quantized %s -> %s (%s): %d -> %d bytes",
        fp32_path, out_path, result.precision, result.bytes_before, result.bytes_after,
    )
    return result


def model_bytes_on_disk(path: Path) -> int:
    """Return the size of an ONNX file plus the external data files its initializers reference."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    locations = set()
    for init in model.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(entry.value for entry in init.external_data if entry.key == "location")
    total = path.stat().st_size
    for location in locations:
        data_file = path.parent / location
        if data_file.is_file():
            total += data_file.stat().st_size
    return total


def _int8_modes(config: QuantizeConfig) -> set[str]:
    """Return the INT8 modes that apply to some node: the base mode or a tower's."""
    if config.mode in ("none", "fp16") and not (config.text_mode or config.image_mode):
        return set()
    modes = {config.mode, *(config.tower_mode(tower) for tower in TOWERS)}
    return modes & {"int8-static", "int8-dynamic"}


def _precision(config: QuantizeConfig, counts: dict[str, int]) -> str:
    if config.mode == "fp16":
        return "fp16"
    used = [mode for mode in ("int8-static", "int8-dynamic") if counts.get(mode)]
    if not used:
        return "fp32"
    tower_modes = {config.tower_mode(tower) for tower in TOWERS}
    if len(used) > 1 or "none" in tower_modes:
        return "mixed"
    return used[0]


def _name_unnamed_nodes(model: Any) -> None:
    """Give every node a unique name: onnxruntime selects and excludes nodes by name."""
    taken = {node.name for node in model.graph.node if node.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def run_pre_process(source: Path, workdir: Path) -> tuple[Path, dict[str, Any]]:
    """Run `quant_pre_process` on `source`; on failure keep `source` and record why.

    A first failure is retried without symbolic shape inference, the step that raises a bare
    AssertionError on some exported attention graphs.
    """
    from onnxruntime.quantization import quant_pre_process

    info: dict[str, Any] = {"requested": True, "used": False, "fallback_reason": None}
    target = workdir / "preprocessed.onnx"
    reasons = []
    for skip_symbolic in (False, True):
        try:
            # onnxruntime's symbolic shape inference (1.32) saves a debug model with external
            # data into the working directory when it fails, so run it inside the scratch folder.
            # NOTE: changing the working directory affects every thread of the process.
            with _working_directory(workdir):
                quant_pre_process(str(source.resolve()), str(target.resolve()), skip_symbolic_shape=skip_symbolic)
        except Exception as error:  # noqa: BLE001 - onnxruntime raises bare AssertionError, ValueError, ...
            reasons.append(_describe_failure(error))
            continue
        info["used"] = True
        if skip_symbolic:
            info["skipped_symbolic_shape_inference"] = True
            info["fallback_reason"] = f"symbolic shape inference failed: {reasons[0]}"
        return target, info

    info["fallback_reason"] = f"quant_pre_process failed: {reasons[0]}; without symbolic shapes: {reasons[-1]}"
    logger.warning("Quantizing the graph without pre-processing: %s", info["fallback_reason"])
    return source, info


@contextlib.contextmanager
def _working_directory(folder: Path) -> Iterator[None]:
    previous = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _describe_failure(error: BaseException) -> str:
    """Name the error and, for a bare assertion, the line of onnxruntime that raised it."""
    message = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return f"{type(error).__name__}{': ' + message if message else ''}{where}"


def node_towers(model: Any) -> dict[str, str | None]:
    """Map each node name to "text", "image" or None (outside both towers).

    The tower comes from the torch exporter's metadata: `pkg.torch.onnx.name_scopes` (dynamo
    exporter, e.g. ['', 'text_tower', 'text_tower.ff1', 'linear_2']) or a module path in the
    node name (TorchScript exporter, e.g. '/text_tower/encoder/MatMul').
    """
    towers: dict[str, str | None] = {}
    for node in model.graph.node:
        scopes = ""
        for prop in node.metadata_props:
            if prop.key in ("pkg.torch.onnx.name_scopes", "namespace"):
                scopes += prop.value
        text = f"{node.name} {scopes}"
        if "text_tower" in text or "text_encoder" in text:
            towers[node.name] = "text"
        elif "image_tower" in text or "image_encoder" in text:
            towers[node.name] = "image"
        else:
            towers[node.name] = None
    return towers


def _towers_of_processed(model: Any, original: Any) -> dict[str, str | None]:
    """Carry the towers of the exported graph over to a pre-processed graph through tensor names.

    Graph optimization can rename or fuse nodes and drop their metadata, but the output tensor
    of a node that survives keeps its name.
    """
    original_towers = node_towers(original)
    by_output = {}
    for node in original.graph.node:
        for output in node.output:
            by_output[output] = original_towers[node.name]
    own = node_towers(model)
    towers = {}
    for node in model.graph.node:
        tower = own.get(node.name)
        if tower is None:
            tower = original_towers.get(node.name)
        if tower is None:
            tower = next((by_output[o] for o in node.output if by_output.get(o)), None)
        towers[node.name] = tower
    return towers


def _excluded_names(model: Any, original: Any, requested: tuple[str, ...]) -> set[str]:
    """Translate excluded node names of the exported graph to the names in `model`."""
    if not requested:
        return set()
    outputs = {o for node in original.graph.node if node.name in requested for o in node.output}
    excluded = set(requested)
    for node in model.graph.node:
        if outputs.intersection(node.output):
            excluded.add(node.name)
    return excluded


def _quantize_int8(
    source: Path, original: Any, workdir: Path, config: QuantizeConfig, reader: Any
) -> tuple[Path, dict[str, int], list[str], dict[str, Any] | None]:
    import onnx

    model = onnx.load(str(source))
    towers = _towers_of_processed(model, original)
    excluded = _excluded_names(model, original, config.nodes_to_exclude)
    missing = [name for name in config.nodes_to_exclude if name not in {n.name for n in original.graph.node}]
    if missing:
        raise ConfigError(
            f"Node {missing[0]!r} in nodes_to_exclude is not in the model.",
            "Use the node names printed by `edgemm inspect` or found by find_sensitive_nodes.",
        )

    constants = {init.name for init in model.graph.initializer}
    selected: dict[str, list[str]] = {"int8-static": [], "int8-dynamic": []}
    for node in model.graph.node:
        mode = config.tower_mode(towers.get(node.name))
        if mode not in selected or node.op_type not in config.op_types_for(mode) or node.name in excluded:
            continue
        # The dynamic quantizer leaves a product of two activations (attention scores) in float.
        # A Gather's table (input 0) is its weight; a MatMul's weight is input 1.
        weight = node.input[0:1] if node.op_type == "Gather" else node.input[1:2]
        if mode == "int8-dynamic" and (node.op_type not in DYNAMIC_OP_TYPES or not constants.intersection(weight)):
            continue
        selected[mode].append(node.name)

    notes: list[str] = []
    counts = {mode: len(names) for mode, names in selected.items() if names}
    calibration = None
    current = source

    if selected["int8-static"]:
        target = workdir / "static.onnx"
        calibration = _quantize_static(current, target, selected["int8-static"], config, reader)
        current = target

    if selected["int8-dynamic"]:
        if config.weight_only:
            target = workdir / "weight_only.onnx"
            _quantize_weight_only(current, target, selected["int8-dynamic"])
            current = target
        else:
            current, dynamic_notes = _quantize_dynamic(current, workdir, selected["int8-dynamic"], model, config)
            notes.extend(dynamic_notes)

    if not counts:
        notes.append("no node matched the op types and towers to quantize; the graph stays FP32")
    return current, counts, notes, calibration


def _quant_type(name: str) -> Any:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def _quantize_static(
    source: Path, target: Path, nodes: list[str], config: QuantizeConfig, reader: Any
) -> dict[str, Any]:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

    if reader is None:
        raise ConfigError(
            "Static INT8 quantization needs a calibration set.",
            "Pass a calibration definition (calibration/*.toml) or choose mode int8-dynamic.",
        )
    if config.calibration_method in HISTOGRAM_METHODS and getattr(reader, "text_padding", None) == "longest" and getattr(
        reader, "needs_text", False
    ):
        raise ConfigError(
            f"Calibration method {config.calibration_method!r} needs texts of one fixed length, "
            "but the calibration set pads to the longest text of each batch.",
            "Set text_padding = \"max_length\" in the calibration definition, or use calibration_method minmax.",
        )

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[config.calibration_method]
    extra_options: dict[str, Any] = {"OpTypesToExcludeOutputQuantization": list(STATIC_FLOAT_OUTPUT_OP_TYPES)}
    if config.calibration_method == "percentile":
        extra_options["CalibPercentile"] = float(config.percentile)
    stride = _calibration_stride(reader)
    if stride:
        extra_options["CalibStridedMinMax"] = stride
    if hasattr(reader, "rewind"):
        reader.rewind()

    try:
        quantize_static(
            str(source),
            str(target),
            reader,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(config.op_types_for("int8-static")),
            nodes_to_quantize=nodes,
            per_channel=config.per_channel_for("int8-static"),
            reduce_range=config.reduce_range,
            activation_type=_quant_type(config.activation_type),
            weight_type=_quant_type(config.weight_type),
            calibrate_method=method,
            extra_options=extra_options,
        )
    except (ValueError, RuntimeError, TypeError, KeyError) as error:
        raise CompressionError(
            f"Static INT8 quantization failed: {type(error).__name__}: {error}",
            "Check the calibration set (fixed-length text) or exclude the failing nodes.",
        ) from error

    _restore_float_inputs(target, set(nodes), _tensor_producers(source))

    samples = getattr(reader, "sample_count", None)
    return {
        "method": config.calibration_method,
        "percentile": float(config.percentile) if config.calibration_method == "percentile" else None,
        "samples": samples,
        "batches": len(reader) if hasattr(reader, "__len__") else None,
        "text_padding": getattr(reader, "text_padding", None),
        "stride_batches": stride,
    }


def _tensor_producers(path: Path) -> dict[str, str]:
    """Map each node output of a graph to the name of the node that writes it."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {name: node.name for node in model.graph.node for name in node.output}


def _restore_float_inputs(path: Path, quantized_nodes: set[str], original_producers: dict[str, str]) -> None:
    """Feed nodes that were not quantized from the float tensor instead of its Q/DQ copy.

    onnxruntime's QDQ quantizer inserts one QuantizeLinear/DequantizeLinear pair per tensor and
    hands the rounded copy to every consumer. A LayerNorm output that feeds both a quantized
    MatMul and a residual Add would then put rounding noise on the residual path, and a node
    excluded for accuracy would still read rounded inputs. Q/DQ pairs left without consumers
    are removed. When the quantizer folds a Relu or Clip into a Conv, the Conv takes over the
    activation's output name, so that tensor is no longer what the graph computed. A pair
    whose float input changed producer is therefore kept.
    """
    import onnx

    model = onnx.load(str(path))
    graph = model.graph
    producers = {output: node for node in graph.node for output in node.output}
    rounded_to_float = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        quantize = producers.get(node.input[0])
        if quantize is None or quantize.op_type != "QuantizeLinear":
            continue
        float_tensor = quantize.input[0]
        if producers.get(float_tensor) is None or original_producers.get(float_tensor) == producers[float_tensor].name:
            rounded_to_float[node.output[0]] = float_tensor

    keep_rounded = quantized_nodes | {"QuantizeLinear", "DequantizeLinear"}
    for node in graph.node:
        if node.name in keep_rounded or node.op_type in keep_rounded:
            continue
        for index, name in enumerate(node.input):
            if name in rounded_to_float:
                node.input[index] = rounded_to_float[name]

    graph_outputs = {output.name for output in graph.output}
    while True:
        consumed = {name for node in graph.node for name in node.input} | graph_outputs
        unused = [
            node
            for node in graph.node
            if node.op_type in ("QuantizeLinear", "DequantizeLinear") and not consumed.intersection(node.output)
        ]
        if not unused:
            break
        for node in unused:
            graph.node.remove(node)

    consumed = {name for node in graph.node for name in node.input}
    for initializer in [init for init in graph.initializer if init.name not in consumed]:
        graph.initializer.remove(initializer)
    onnx.save(model, str(path))


def _calibration_stride(reader: Any) -> int | None:
    """Return the batches per calibration stride, or None when the reader cannot stride.

    onnxruntime keeps every activation of a stride in memory and requires the stride to divide
    the number of batches, so one batch per stride keeps memory flat for any set size.
    """
    if not (hasattr(reader, "__len__") and hasattr(reader, "set_range")):
        return None
    return 1 if len(reader) > 0 else None


class _AlreadyQuantizedFilter(logging.Filter):
    """Drop onnxruntime's "already quantized" warning, which every mixed-mode run triggers.

    edgemm quantizes the static nodes first and the dynamic ones in a second pass, on a graph
    that then contains QDQ nodes. The warning, logged on the root logger, suggests a
    quantization-aware-trained model as the cause, which does not apply.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Please check if the model is already quantized")


@contextlib.contextmanager
def _without_already_quantized_warning() -> Iterator[None]:
    root = logging.getLogger()
    quiet = _AlreadyQuantizedFilter()
    root.addFilter(quiet)
    try:
        yield
    finally:
        root.removeFilter(quiet)


def _quantize_dynamic(
    source: Path, workdir: Path, nodes: list[str], model: Any, config: QuantizeConfig
) -> tuple[Path, list[str]]:
    from onnxruntime.quantization import quantize_dynamic

    per_channel = config.per_channel_for("int8-dynamic")
    groups = [(nodes, per_channel)]
    notes = []
    if per_channel:
        flat, other = _split_by_weight_rank(model, nodes)
        groups = [(flat, True), (other, False)]
        if other:
            notes.append(
                f"{len(other)} dynamic nodes (Gather tables, MatMul weights of rank other than 2) are "
                "quantized per-tensor: per-channel MatMul of other ranks fails at inference in onnxruntime"
            )

    current = source
    for index, (group, group_per_channel) in enumerate(groups):
        if not group:
            continue
        target = workdir / f"dynamic_{index}.onnx"
        try:
            with _without_already_quantized_warning():
                quantize_dynamic(
                    str(current),
                    str(target),
                    op_types_to_quantize=list(config.op_types_for("int8-dynamic")),
                    nodes_to_quantize=group,
                    per_channel=group_per_channel,
                    reduce_range=config.reduce_range,
                    weight_type=_quant_type(config.weight_type),
                )
        except (ValueError, RuntimeError, TypeError, KeyError) as error:
            raise CompressionError(
                f"Dynamic INT8 quantization failed: {type(error).__name__}: {error}",
                "Exclude the failing nodes or choose another mode.",
            ) from error
        current = target
    return current, notes


def _split_by_weight_rank(model: Any, nodes: list[str]) -> tuple[list[str], list[str]]:
    """Split nodes into those whose weight (input 1) is a rank-2 initializer and the others."""
    ranks = {init.name: len(init.dims) for init in model.graph.initializer}
    by_name = {node.name: node for node in model.graph.node}
    flat, other = [], []
    for name in nodes:
        node = by_name[name]
        # Only rank-2 MatMul weights take per-channel scales; Gather tables stay per-tensor.
        if node.op_type == "MatMul" and ranks.get(node.input[1], 2) == 2:
            flat.append(name)
        elif node.op_type != "MatMul" and node.op_type != "Gather":
            flat.append(name)
        else:
            other.append(name)
    return flat, other


def _quantize_weight_only(source: Path, target: Path, nodes: list[str]) -> None:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(source))
    skipped = [node.name for node in model.graph.node if node.op_type == "MatMul" and node.name not in nodes]
    quantizer = MatMulNBitsQuantizer(model, bits=8, block_size=32, is_symmetric=True, nodes_to_exclude=skipped)
    try:
        quantizer.process()
    except (ValueError, RuntimeError, AssertionError) as error:
        raise CompressionError(f"Weight-only INT8 quantization failed: {error}") from error
    quantizer.model.save_model_to_file(str(target))


def _convert_fp16(source: Path, target: Path, config: QuantizeConfig) -> None:
    """Convert weights and compute to float16, keeping float32 graph inputs and outputs."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(source))
    try:
        converted = convert_float_to_float16(
            model, keep_io_types=True, node_block_list=list(config.nodes_to_exclude) or None
        )
    except (ValueError, RuntimeError) as error:
        raise CompressionError(f"FP16 conversion failed: {error}") from error
    onnx.save(converted, str(target))


def example_feeds(onnx_path: Path | str, batch: int = 2, sequence: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Make feeds for every graph input: token ids of 1, a full attention mask, random pixels."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in session.get_inputs():
        shape = []
        for position, dim in enumerate(value.shape):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            else:
                shape.append(batch if position == 0 else sequence)
        if "int" in value.type:
            feeds[value.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def check_inference(onnx_path: Path, mode: str, reader: Any = None) -> None:
    """Run the model once; raise `CompressionError` naming the mode when it fails or gives NaN."""
    import onnxruntime as ort

    try:
        feeds = reader.first_batch() if hasattr(reader, "first_batch") else example_feeds(onnx_path)
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        outputs = session.run(None, feeds)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own Fail/InvalidGraph classes
        raise CompressionError(
            f"The {mode} model failed at inference: {type(error).__name__}: {str(error)[:300]}",
            "Exclude the failing nodes, change the quantization settings or choose another mode.",
        ) from error
    for output in outputs:
        if np.issubdtype(np.asarray(output).dtype, np.floating) and not np.all(np.isfinite(output)):
            raise CompressionError(
                f"The {mode} model outputs NaN or infinity.",
                "Exclude the nodes that overflow (see find_sensitive_nodes) or choose another mode.",
            )


def measure_latency(
    onnx_path: Path | str, feeds: dict[str, np.ndarray], threads: int = 1, runs: int = 50, warmup: int = 5
) -> float:
    """Return the median (p50) latency in milliseconds of one `session.run` on `feeds`.

    Use it to choose a recipe on the target CPU: INT8 is not always faster than FP32.
    """
    import onnxruntime as ort

    if runs < 1:
        raise ConfigError(f"runs={runs} is invalid.", "Use 1 or more runs.")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    for _ in range(warmup):
        session.run(None, feeds)
    timings = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        timings.append((time.perf_counter() - start) * 1000.0)
    return float(np.median(timings))
