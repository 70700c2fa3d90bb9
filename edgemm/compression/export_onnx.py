"""Export an edgemm model, or one of its encoders, to ONNX and prove that the graph is sound.

Exporter choice (torch 2.13): the default is the dynamo exporter (`torch.onnx.export(...,
dynamo=True)`, built on `torch.export` and onnxscript). The legacy TorchScript exporter
(`dynamo=False`) traces with the example shapes, and `nn.MultiheadAttention` then bakes the
example batch and sequence length into Reshape nodes while the graph inputs still look
dynamic. The legacy exporter also fails on the fused `aten::_transformer_encoder_layer_fwd`
op that PyTorch picks under `torch.no_grad()`. The dynamo exporter has neither problem, so it
is the default, and the TorchScript exporter is only a fallback (with a logged warning) for
models that `torch.export` cannot trace.

Whatever the exporter, every graph goes through the same checks before `export_onnx` returns.
The ONNX checker runs with `full_check=True`, and the default-domain opset must equal the
requested one. Each requested dynamic axis must be symbolic (`dim_param`) on every graph input
and output. Finally onnxruntime runs the graph at batch sizes and sequence lengths other than
the example's, and its outputs must match PyTorch. Any failure raises `CompressionError` naming the graph, the
axis and the fix.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from edgemm.errors import CompressionError, ConfigError

logger = logging.getLogger(__name__)

GRAPHS = ("model", "text_encoder", "image_encoder")
EXPORTERS = ("dynamo", "torchscript")

TEXT_INPUTS = ("input_ids", "attention_mask")
IMAGE_INPUT = "pixel_values"
BATCH_AXIS = "batch"
SEQUENCE_AXIS = "sequence"

DEFAULT_OPSET = 18
# Opsets for which both the dynamo exporter of torch 2.13 and onnxruntime 1.32 produce and load
# a graph at exactly the requested version. Below 17 the dynamo exporter silently writes opset 18,
# and at 26 it writes a graph that onnxruntime 1.32 rejects.
MIN_OPSET = 17
MAX_OPSET = 25

# A batch of 1 in the example lets `torch.export` specialise the batch axis to the constant 1,
# so examples are repeated up to this batch size before export.
MIN_EXAMPLE_BATCH = 2

# Shapes at which the exported graph must run and match PyTorch: a larger batch, a longer
# sequence, then both axes smaller than the example.
CHECK_BATCHES = (3, 1)
CHECK_SEQUENCES = (37, 5)

# Tolerance of the shape checks: |onnx - torch| <= ATOL + RTOL * max|torch|.
ATOL = 1e-4
RTOL = 1e-4

# Protobuf cannot serialise a single file above 2 GiB. Larger models would need ONNX external
# data files, which the model package does not list yet, so they are rejected.
PROTOBUF_LIMIT_BYTES = 2 * 1024**3

ONNXSCRIPT_HINT = "Install it with `pip install onnxscript` (part of `pip install 'edgemm[host]'`)."


@dataclass(frozen=True)
class ShapeCheck:
    """One onnxruntime run of the exported graph compared to PyTorch."""

    batch: int
    sequence: int | None
    max_abs_diff: float


@dataclass(frozen=True)
class ExportResult:
    """An exported and checked ONNX graph."""

    graph: str
    path: Path
    exporter: str
    opset: int
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    checks: tuple[ShapeCheck, ...]
    seconds: float

    def to_dict(self) -> dict:
        return {
            "graph": self.graph,
            "file": self.path.name,
            "exporter": self.exporter,
            "opset": self.opset,
            "inputs": list(self.input_names),
            "outputs": list(self.output_names),
            "dynamic_axes": {name: {str(axis): dim for axis, dim in axes.items()} for name, axes in self.dynamic_axes.items()},
            "shape_checks": [
                {"batch": check.batch, "sequence": check.sequence, "max_abs_diff": check.max_abs_diff}
                for check in self.checks
            ],
            "seconds": round(self.seconds, 2),
        }


class ModelGraph(nn.Module):
    """The whole model with the ONNX input names as argument names and a tuple output."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        outputs = self.model(input_ids, attention_mask, pixel_values)
        return tuple(outputs) if isinstance(outputs, (tuple, list)) else (outputs,)


class TextEncoderGraph(nn.Module):
    """`model.encode_text` of a dual encoder as a module of its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return (self.model.encode_text(input_ids, attention_mask),)


class ImageEncoderGraph(nn.Module):
    """`model.encode_image` of a dual encoder as a module of its own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor):
        return (self.model.encode_image(pixel_values),)


_GRAPH_MODULES = {"model": ModelGraph, "text_encoder": TextEncoderGraph, "image_encoder": ImageEncoderGraph}
_GRAPH_INPUTS = {
    "model": TEXT_INPUTS + (IMAGE_INPUT,),
    "text_encoder": TEXT_INPUTS,
    "image_encoder": (IMAGE_INPUT,),
}


def check_opset(opset: int) -> int:
    """Return `opset` when edgemm can export and run it, else raise `ConfigError`."""
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise ConfigError(
            f"Unsupported ONNX opset {opset!r}: edgemm exports opsets {MIN_OPSET} to {MAX_OPSET} "
            f"(the range the torch {torch.__version__.split('+')[0]} dynamo exporter and the installed onnxruntime share).",
            f"Pass --opset {DEFAULT_OPSET}, the default.",
        )
    return opset


def require_onnxscript() -> None:
    """Raise `CompressionError` when onnxscript, which the dynamo exporter needs, cannot be imported."""
    try:
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise CompressionError(
            f"ONNX export needs the onnxscript package, which is not installed ({error}).",
            ONNXSCRIPT_HINT,
        ) from error


def output_names_for(graph: str, model: nn.Module, example_inputs: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
    """Return the ONNX output names of `graph`: `logits` for fusion models, embeddings for dual encoders."""
    if graph == "text_encoder":
        return ("text_embeds",)
    if graph == "image_encoder":
        return ("image_embeds",)
    with _export_mode(model), torch.no_grad():
        outputs = ModelGraph(model)(*[example_inputs[name] for name in _GRAPH_INPUTS["model"]])
    if len(outputs) == 2:
        return ("text_embeds", "image_embeds")
    if len(outputs) == 1:
        return ("logits",)
    raise CompressionError(
        f"The model returns {len(outputs)} outputs, but edgemm exports either logits or (text_embeds, image_embeds).",
        "Export a model built by edgemm.models (concat_fusion, cross_attention or dual_encoder).",
    )


def export_onnx(
    model: nn.Module,
    path: Path | str,
    *,
    graph: str = "model",
    example_inputs: Mapping[str, torch.Tensor],
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = True,
    dynamic_sequence: bool = True,
    max_sequence: int | None = None,
    exporter: str = "dynamo",
    fallback: bool = True,
) -> ExportResult:
    """Export `graph` of `model` to the ONNX file `path` and check it; see the module docstring.

    `graph` is "model" (the whole model), or "text_encoder" / "image_encoder" (a dual encoder's
    `encode_text` / `encode_image`). `example_inputs` maps ONNX input names (`input_ids`,
    `attention_mask`, `pixel_values`) to example tensors, of which the graph takes the ones it
    needs. `exporter` is "dynamo" (default) or "torchscript"; with `fallback`, a dynamo failure
    other than a missing onnxscript is logged and the TorchScript exporter is tried.
    `max_sequence` bounds the dynamic sequence axis; it defaults to the text tower's
    `max_position_embeddings`.
    The model is exported in eval mode and its training mode is restored afterwards.

    Raises `CompressionError` when export or any check fails, `ConfigError` for an invalid opset,
    graph or exporter.
    """
    if graph not in GRAPHS:
        raise ConfigError(f"Unknown graph {graph!r}.", f"Use one of {list(GRAPHS)}.")
    if exporter not in EXPORTERS:
        raise ConfigError(f"Unknown exporter {exporter!r}.", f"Use one of {list(EXPORTERS)}.")
    check_opset(opset)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    input_names = _GRAPH_INPUTS[graph]
    examples = _prepare_examples(graph, example_inputs, input_names)
    output_names = output_names_for(graph, model, examples)
    dynamic_axes = _dynamic_axes(input_names, output_names, dynamic_batch, dynamic_sequence)
    module = _GRAPH_MODULES[graph](model)
    if max_sequence is None:
        max_sequence = _max_positions(model)
    size = _parameter_bytes(model)
    if size > PROTOBUF_LIMIT_BYTES:
        raise CompressionError(
            f"The model has {size / 1024**3:.1f} GiB of weights, above the 2 GiB limit of a single ONNX file.",
            "Prune or shrink the model first; model packages with ONNX external data are not supported.",
        )

    started = time.perf_counter()
    used = exporter
    with _export_mode(model):
        module.eval()
        if exporter == "dynamo":
            require_onnxscript()
            try:
                _export_dynamo(module, path, examples, input_names, output_names, dynamic_axes, opset, max_sequence)
            except Exception as error:  # torch.export raises many unrelated types for untraceable code
                if not fallback:
                    raise CompressionError(
                        f"The dynamo exporter failed on graph {graph!r}: {_first_line(error)}.",
                        "Retry with exporter='torchscript', or make the model traceable by torch.export.",
                    ) from error
                logger.warning(
                    "Dynamo export of graph %r failed (%s); retrying with the TorchScript exporter.",
                    graph,
                    _first_line(error),
                )
                used = "torchscript"
        if used == "torchscript":
            _export_torchscript(module, path, examples, input_names, output_names, dynamic_axes, opset)
        seconds = time.perf_counter() - started
        logger.info("Exported graph %r with the %s exporter to %s in %.1f s.", graph, used, path, seconds)

        check_graph_file(
            path, graph=graph, opset=opset, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes
        )
        checks = check_dynamic_shapes(
            module,
            path,
            graph=graph,
            exporter=used,
            examples=examples,
            output_names=output_names,
            dynamic_batch=dynamic_batch,
            dynamic_sequence=dynamic_sequence,
            max_sequence=max_sequence,
        )
    return ExportResult(
        graph=graph,
        path=path,
        exporter=used,
        opset=opset,
        input_names=input_names,
        output_names=output_names,
        dynamic_axes=dynamic_axes,
        checks=checks,
        seconds=seconds,
    )


def check_graph_file(
    path: Path,
    *,
    graph: str,
    opset: int,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
) -> None:
    """Run the ONNX checker on `path` and check its opset, I/O names and symbolic axes."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise CompressionError(
            f"The ONNX checker rejects graph {graph!r} in {path}: {_first_line(error)}.",
            "Export again with the other exporter or another opset.",
        ) from error

    proto = onnx.load(str(path), load_external_data=False)
    written = [entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx")]
    if written != [opset]:
        raise CompressionError(
            f"Graph {graph!r} in {path} has opset {written}, but opset {opset} was requested.",
            f"Pass an opset from {MIN_OPSET} to {MAX_OPSET}.",
        )

    values = {value.name: value for value in list(proto.graph.input) + list(proto.graph.output)}
    for name in list(input_names) + list(output_names):
        if name not in values:
            raise CompressionError(
                f"Graph {graph!r} in {path} has no input or output named {name!r} "
                f"(it has {sorted(values)}).",
                "Export with the ONNX I/O names of docs/architecture.md.",
            )
    for name, axes in dynamic_axes.items():
        dims = values[name].type.tensor_type.shape.dim
        for axis, axis_name in axes.items():
            dim = dims[axis]
            if dim.dim_param:
                continue
            raise CompressionError(
                f"Graph {graph!r}: axis {axis} ({axis_name}) of {name!r} is fixed to {dim.dim_value} "
                "in the ONNX graph instead of being dynamic.",
                "Export with example inputs whose batch and sequence are at least 2 and differ from "
                "the model's other sizes, and check that no code path converts that size to a Python int.",
            )


def check_dynamic_shapes(
    module: nn.Module,
    path: Path,
    *,
    graph: str,
    exporter: str,
    examples: Mapping[str, torch.Tensor],
    output_names: Sequence[str],
    dynamic_batch: bool,
    dynamic_sequence: bool,
    max_sequence: int | None = None,
) -> tuple[ShapeCheck, ...]:
    """Run `path` in onnxruntime at shapes other than the example's and compare to PyTorch.

    Each requested dynamic axis is varied on its own first, so a failure names that axis.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    # A failed run is reported as CompressionError below, so onnxruntime's own error log is muted.
    options.log_severity_level = 4
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    example_batch, example_sequence = _example_shape(examples)
    has_text = TEXT_INPUTS[0] in examples

    long_sequence = CHECK_SEQUENCES[0] if max_sequence is None else min(CHECK_SEQUENCES[0], max_sequence)
    shapes: list[tuple[int, int | None, str]] = []
    if dynamic_batch:
        shapes.append((CHECK_BATCHES[0], example_sequence, BATCH_AXIS))
    if dynamic_sequence and has_text:
        shapes.append((example_batch, long_sequence, SEQUENCE_AXIS))
    if dynamic_batch and dynamic_sequence and has_text:
        shapes.append((CHECK_BATCHES[1], CHECK_SEQUENCES[1], f"{BATCH_AXIS} and {SEQUENCE_AXIS}"))
    elif dynamic_batch:
        shapes.append((CHECK_BATCHES[1], example_sequence, BATCH_AXIS))

    generator = torch.Generator().manual_seed(0)
    checks = []
    for batch, sequence, axis in shapes:
        inputs = make_check_inputs(examples, batch, sequence, generator)
        with torch.no_grad():
            expected = [tensor.numpy() for tensor in module(*inputs.values())]
        try:
            actual = session.run(list(output_names), {name: tensor.numpy() for name, tensor in inputs.items()})
        except Exception as error:  # onnxruntime raises its own Fail/InvalidArgument types
            raise CompressionError(
                f"Graph {graph!r} ({exporter} exporter) fails in onnxruntime when the {axis} axis changes "
                f"(batch {batch}, sequence {sequence}; example batch {example_batch}, sequence "
                f"{example_sequence}): {_first_line(error)}.",
                _shape_fix(exporter),
            ) from error

        diff = _max_abs_diff(graph, output_names, expected, actual, batch, sequence, axis, exporter)
        checks.append(ShapeCheck(batch=batch, sequence=sequence, max_abs_diff=diff))
        logger.debug("Graph %r at batch %d, sequence %s: max |onnx - torch| = %.2e", graph, batch, sequence, diff)
    return tuple(checks)


def make_check_inputs(
    examples: Mapping[str, torch.Tensor],
    batch: int,
    sequence: int | None,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """Build inputs of a new shape from the example inputs.

    Token ids are drawn from the ids the example uses, so they stay inside the vocabulary and
    the first one stays the example's first token ([CLS]). The last row of `attention_mask` is
    half padding. Pixels are Gaussian with the example's mean and standard deviation.
    """
    inputs = {}
    if TEXT_INPUTS[0] in examples:
        ids = examples["input_ids"]
        pool = ids.flatten()
        picks = torch.randint(0, pool.numel(), (batch, sequence), generator=generator)
        input_ids = pool[picks].to(ids.dtype)
        input_ids[:, 0] = ids[0, 0]
        attention_mask = torch.ones(batch, sequence, dtype=examples["attention_mask"].dtype)
        attention_mask[-1, max(1, sequence // 2) :] = 0
        inputs["input_ids"] = input_ids
        inputs["attention_mask"] = attention_mask
    if IMAGE_INPUT in examples:
        pixels = examples[IMAGE_INPUT]
        noise = torch.randn((batch,) + tuple(pixels.shape[1:]), generator=generator, dtype=pixels.dtype)
        inputs[IMAGE_INPUT] = noise * pixels.std().clamp(min=1e-3) + pixels.mean()
    return inputs


@contextmanager
def _export_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode with gradients enabled and the fused attention fast path off, restored afterwards.

    Under `torch.no_grad()` in eval mode, `nn.MultiheadAttention` and `nn.TransformerEncoderLayer`
    switch to fused kernels (`aten::_native_multi_head_attention`,
    `aten::_transformer_encoder_layer_fwd`) that the TorchScript exporter cannot convert.
    """
    was_training = model.training
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.enable_grad():
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        model.train(was_training)


def _export_dynamo(
    module: nn.Module,
    path: Path,
    examples: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
    max_sequence: int | None,
) -> None:
    # Named dims (not strings or Dim.AUTO) make torch.export raise instead of silently
    # specialising an axis that the model's code fixes to a constant. The sequence dim needs the
    # model's bound: without it, non-strict torch.export reports a constraint violation on the
    # position embedding slice, and torch.onnx then tries its other capture strategies.
    dims = {
        BATCH_AXIS: torch.export.Dim(BATCH_AXIS),
        SEQUENCE_AXIS: torch.export.Dim(SEQUENCE_AXIS, max=max_sequence) if max_sequence else torch.export.Dim(SEQUENCE_AXIS),
    }
    dynamic_shapes = {
        name: {axis: dims[axis_name] for axis, axis_name in dynamic_axes.get(name, {}).items()} for name in input_names
    }
    torch.onnx.export(
        module,
        tuple(examples[name] for name in input_names),
        str(path),
        dynamo=True,
        input_names=list(input_names),
        output_names=list(output_names),
        dynamic_shapes=dynamic_shapes,
        opset_version=opset,
        external_data=False,
        verbose=False,
    )


def _export_torchscript(
    module: nn.Module,
    path: Path,
    examples: Mapping[str, torch.Tensor],
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: Mapping[str, Mapping[int, str]],
    opset: int,
) -> None:
    try:
        torch.onnx.export(
            module,
            tuple(examples[name] for name in input_names),
            str(path),
            dynamo=False,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes={name: dict(axes) for name, axes in dynamic_axes.items()},
            opset_version=opset,
            do_constant_folding=True,
        )
    except Exception as error:  # the TorchScript exporter raises RuntimeError and its own error types
        raise CompressionError(
            f"The TorchScript exporter failed: {_first_line(error)}.",
            "Make the model traceable by torch.export so the default dynamo exporter can export it.",
        ) from error


def _prepare_examples(
    graph: str, example_inputs: Mapping[str, torch.Tensor], input_names: Sequence[str]
) -> dict[str, torch.Tensor]:
    missing = [name for name in input_names if name not in example_inputs]
    if missing:
        raise ConfigError(
            f"example_inputs lacks {missing} for graph {graph!r}.",
            f"Pass tensors for {list(input_names)}.",
        )
    examples = {name: example_inputs[name].detach().cpu() for name in input_names}

    batch = examples[input_names[0]].shape[0]
    if batch < MIN_EXAMPLE_BATCH:
        repeats = -(-MIN_EXAMPLE_BATCH // batch)
        examples = {name: tensor.repeat_interleave(repeats, dim=0) for name, tensor in examples.items()}
        logger.debug("Repeated the example batch of %d to %d so the batch axis stays dynamic.", batch, batch * repeats)
    if TEXT_INPUTS[0] in examples and examples["input_ids"].shape[1] < 2:
        raise ConfigError(
            f"The example input_ids have sequence length {examples['input_ids'].shape[1]}, so the "
            "sequence axis would be exported as the constant 1.",
            "Pass example texts that tokenize to at least 2 tokens.",
        )
    return examples


def _dynamic_axes(
    input_names: Sequence[str], output_names: Sequence[str], dynamic_batch: bool, dynamic_sequence: bool
) -> dict[str, dict[int, str]]:
    axes: dict[str, dict[int, str]] = {}
    for name in list(input_names) + list(output_names):
        entry = {}
        if dynamic_batch:
            entry[0] = BATCH_AXIS
        if dynamic_sequence and name in TEXT_INPUTS:
            entry[1] = SEQUENCE_AXIS
        if entry:
            axes[name] = entry
    return axes


def _example_shape(examples: Mapping[str, torch.Tensor]) -> tuple[int, int | None]:
    if TEXT_INPUTS[0] in examples:
        ids = examples["input_ids"]
        return ids.shape[0], ids.shape[1]
    return examples[IMAGE_INPUT].shape[0], None


def _max_abs_diff(
    graph: str,
    output_names: Sequence[str],
    expected: Sequence[np.ndarray],
    actual: Sequence[np.ndarray],
    batch: int,
    sequence: int | None,
    axis: str,
    exporter: str,
) -> float:
    worst = 0.0
    for name, reference, result in zip(output_names, expected, actual):
        if reference.shape != result.shape:
            raise CompressionError(
                f"Graph {graph!r} ({exporter} exporter) returns {name!r} with shape {list(result.shape)} "
                f"at batch {batch}, sequence {sequence}, but PyTorch returns {list(reference.shape)}.",
                _shape_fix(exporter),
            )
        diff = float(np.max(np.abs(result.astype(np.float64) - reference.astype(np.float64)), initial=0.0))
        limit = ATOL + RTOL * float(np.max(np.abs(reference), initial=0.0))
        if not diff <= limit:
            raise CompressionError(
                f"Graph {graph!r} ({exporter} exporter): {name!r} differs from PyTorch by {diff:.3g} "
                f"(limit {limit:.3g}) at batch {batch}, sequence {sequence}, after changing the {axis} axis.",
                _shape_fix(exporter),
            )
        worst = max(worst, diff)
    return worst


def _shape_fix(exporter: str) -> str:
    if exporter == "torchscript":
        return (
            "The TorchScript exporter baked an example size into a Reshape or Expand "
            "(nn.MultiheadAttention does this); export with the dynamo exporter instead."
        )
    return "Write reshapes with -1 or sizes read from the input tensor instead of Python ints."


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(getattr(model, "text_tower", None), "config", None)
    return getattr(config, "max_position_embeddings", None)


def _parameter_bytes(model: nn.Module) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in list(model.parameters()) + list(model.buffers()))


_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(error: BaseException) -> str:
    """Return the first line of the innermost cause, which names the failing operation."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = _ANSI_ESCAPE.sub("", str(error)).strip() or type(error).__name__
    return text.splitlines()[0][:400]
