"""Quantization of small exported models with real onnxruntime sessions.

The fusion model here has the module names of edgemm models (`text_tower`, `image_tower`), a
BERT-like attention block and a small conv net, so the traps of real exports show up in tests.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

from edgemm.compression.calibration import CalibrationSet, EdgemmCalibrationReader
from edgemm.compression.quantize import (
    QuantizeConfig,
    check_inference,
    measure_latency,
    quantize_model,
)
from edgemm.data.synthetic import generate_scenes
from edgemm.errors import CompressionError, ConfigError
from edgemm.runtime.image import ImageTransform
from edgemm.runtime.spec import ImageSpec, TextSpec
from edgemm.runtime.tokenizer import WordPieceTokenizer

VOCAB = Path(__file__).resolve().parents[1] / "edgemm" / "models" / "assets" / "tiny_vocab.txt"
MAX_LENGTH = 16
IMAGE_SPEC = ImageSpec(resize=36, crop=32)


class AttentionTower(nn.Module):
    """One BERT-like encoder layer: attention, residual Add, LayerNorm, GELU MLP, mean pooling."""

    def __init__(self, vocab_size: int, hidden: int = 32, heads: int = 4):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.attention_out = nn.Linear(hidden, hidden)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 64)
        self.fc2 = nn.Linear(64, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.heads = heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        batch, length, hidden = x.shape
        head_size = hidden // self.heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = q.view(batch, length, self.heads, head_size).transpose(1, 2)
        k = k.view(batch, length, self.heads, head_size).transpose(1, 2)
        v = v.view(batch, length, self.heads, head_size).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / head_size**0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].float()) * -1e4
        context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, hidden)
        x = self.norm1(x + self.attention_out(context))
        x = self.norm2(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))
        mask = attention_mask[..., None].float()
        return (x * mask).sum(1) / mask.sum(1)


class ConvTower(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.norm(self.conv1(pixel_values)))
        x = torch.relu(self.conv2(x))
        return x.mean((2, 3))


class TinyFusion(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.text_tower = AttentionTower(vocab_size)
        self.image_tower = ConvTower()
        self.head = nn.Linear(64, 2)

    def forward(self, input_ids, attention_mask, pixel_values):
        features = torch.cat([self.text_tower(input_ids, attention_mask), self.image_tower(pixel_values)], dim=-1)
        return self.head(features)


def vocab_size() -> int:
    return len(VOCAB.read_text(encoding="utf-8").splitlines())


@pytest.fixture(scope="module")
def fusion_onnx(tmp_path_factory) -> Path:
    """The tiny fusion model exported by the dynamo exporter with dynamic batch and sequence."""
    torch.manual_seed(0)
    model = TinyFusion(vocab_size()).eval()
    input_ids = torch.randint(5, vocab_size(), (2, MAX_LENGTH))
    attention_mask = torch.ones(2, MAX_LENGTH, dtype=torch.int64)
    pixel_values = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence")
    path = tmp_path_factory.mktemp("fusion") / "model.onnx"
    torch.onnx.export(
        model,
        (input_ids, attention_mask, pixel_values),
        str(path),
        input_names=["input_ids", "attention_mask", "pixel_values"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}, "pixel_values": {0: batch}},
        dynamo=True,
    )
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes") / "data"
    generate_scenes(folder, 32, seed=3, image_size=48, splits=(("train", 1.0),))
    return folder


def make_reader(scenes: Path, size: int = 16, batch_size: int = 4, padding: str = "max_length") -> EdgemmCalibrationReader:
    calibration = CalibrationSet(source="dataset", path=scenes, size=size, batch_size=batch_size, text_padding=padding)
    return EdgemmCalibrationReader(
        calibration.select_records(),
        ["input_ids", "attention_mask", "pixel_values"],
        encode_text=WordPieceTokenizer.from_spec(TextSpec(max_length=MAX_LENGTH), VOCAB),
        encode_images=ImageTransform(IMAGE_SPEC),
        batch_size=batch_size,
        text_padding=padding,
    )


def run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in onnx.load(str(path)).graph.node]


def relative_error(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.linalg.norm(reference - other) / (np.linalg.norm(reference) + 1e-12))


def test_static_int8_close_to_fp32(fusion_onnx, scenes, tmp_path):
    reader = make_reader(scenes)
    feeds = reader.first_batch()
    out = tmp_path / "static.onnx"

    result = quantize_model(fusion_onnx, out, QuantizeConfig(mode="int8-static"), reader)

    assert result.precision == "int8-static"
    assert result.calibration["samples"] == 16
    assert result.calibration["method"] == "minmax"
    assert "QuantizeLinear" in op_types(out)
    assert relative_error(run(fusion_onnx, feeds), run(out, feeds)) < 0.1


def test_static_per_channel_scales(fusion_onnx, scenes, tmp_path):
    out = tmp_path / "static.onnx"
    quantize_model(fusion_onnx, out, QuantizeConfig(mode="int8-static", per_channel=True), make_reader(scenes))

    model = onnx.load(str(out))
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    weight_scales = [
        initializers[node.input[1]]
        for node in model.graph.node
        if node.op_type == "DequantizeLinear" and node.input[0] in initializers and initializers[node.input[0]].ndim >= 2
    ]
    assert weight_scales, "no weight DequantizeLinear found"
    assert all(scale.size > 1 for scale in weight_scales)


def test_dynamic_int8_close_to_fp32(fusion_onnx, scenes, tmp_path):
    feeds = make_reader(scenes).first_batch()
    out = tmp_path / "dynamic.onnx"

    result = quantize_model(fusion_onnx, out, QuantizeConfig(mode="int8-dynamic"))

    assert result.precision == "int8-dynamic"
    assert result.per_channel is True
    assert "ConvInteger" not in op_types(out)
    assert relative_error(run(fusion_onnx, feeds), run(out, feeds)) < 0.1


def test_fp16_tight_and_float32_io(fusion_onnx, scenes, tmp_path):
    feeds = make_reader(scenes).first_batch()
    out = tmp_path / "fp16.onnx"

    result = quantize_model(fusion_onnx, out, QuantizeConfig(mode="fp16"))

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[2].type == "tensor(float)"
    assert session.get_outputs()[0].type == "tensor(float)"
    assert result.bytes_after < result.bytes_before
    np.testing.assert_allclose(run(out, feeds), run(fusion_onnx, feeds), rtol=1e-2, atol=2e-3)


def test_mode_none_copies_graph(fusion_onnx, scenes, tmp_path):
    feeds = make_reader(scenes).first_batch()
    out = tmp_path / "none.onnx"
    result = quantize_model(fusion_onnx, out, QuantizeConfig(mode="none"))
    assert result.precision == "fp32"
    np.testing.assert_array_equal(run(out, feeds), run(fusion_onnx, feeds))


def test_static_default_ops_skip_norm_softmax(fusion_onnx, scenes, tmp_path):
    out = tmp_path / "static.onnx"
    quantize_model(fusion_onnx, out, QuantizeConfig(mode="int8-static"), make_reader(scenes))

    model = onnx.load(str(out))
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    dequantized_consumers = {
        op
        for node in model.graph.node
        if node.op_type == "DequantizeLinear"
        for op in consumers.get(node.output[0], [])
    }
    # ReduceMean may read the Conv output with its Relu folded in; norms, Softmax, GELU and
    # residual Adds must read float tensors.
    assert not dequantized_consumers & {"LayerNormalization", "Softmax", "Add", "Erf", "Gelu", "Div", "Mul"}
    assert {"Conv", "MatMul", "Gemm"} <= dequantized_consumers
    assert "LayerNormalization" in op_types(out)


def test_mixed_towers_text_dynamic_image_static(fusion_onnx, scenes, tmp_path):
    reader = make_reader(scenes)
    feeds = reader.first_batch()
    out = tmp_path / "mixed.onnx"
    config = QuantizeConfig(mode="none", text_mode="int8-dynamic", image_mode="int8-static")

    result = quantize_model(fusion_onnx, out, config, reader)

    types = op_types(out)
    assert result.precision == "mixed"
    assert result.nodes_quantized["int8-dynamic"] == 4
    assert result.nodes_quantized["int8-static"] == 4  # two Conv, two Relu
    # qkv, attention output, fc1 and fc2 of the text tower; the attention products have no weight.
    assert types.count("MatMulInteger") == 4
    assert types.count("Conv") == 2
    # onnxruntime's dynamic pass rewrites the head Gemm as MatMul + Add, which stays float,
    # next to the two attention products.
    assert types.count("MatMul") == 3
    assert relative_error(run(fusion_onnx, feeds), run(out, feeds)) < 0.1


def test_text_tower_kept_fp32(fusion_onnx, scenes, tmp_path):
    out = tmp_path / "image_only.onnx"
    config = QuantizeConfig(mode="int8-static", text_mode="none")
    result = quantize_model(fusion_onnx, out, config, make_reader(scenes))
    assert result.precision == "mixed"
    # The two image convolutions, the two Relus folded into them and the head Gemm.
    assert result.nodes_quantized["int8-static"] == 5


def three_d_weight_model(path: Path) -> Path:
    """A MatMul with a [heads, in, out] weight, as batched per-head projections export."""
    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((4, 16, 8)).astype(np.float32), "weight")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["pixel_values", "weight"], ["logits"], name="image_tower/heads/MatMul")],
        "three_d",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 4, 5, 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4, 5, 8])],
        [weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)])
    onnx.save(model, str(path))
    return path


def test_dynamic_per_channel_3d_weight_runs(tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    source = three_d_weight_model(tmp_path / "three_d.onnx")
    feeds = {"pixel_values": np.random.default_rng(1).standard_normal((2, 4, 5, 16)).astype(np.float32)}

    # Plain onnxruntime per-channel output fails at inference: this is the trap.
    raw = tmp_path / "raw.onnx"
    quantize_dynamic(str(source), str(raw), per_channel=True)
    with pytest.raises(CompressionError, match="int8-dynamic"):
        check_inference(raw, "int8-dynamic")

    for per_channel in (None, True):
        out = tmp_path / f"ours_{per_channel}.onnx"
        result = quantize_model(source, out, QuantizeConfig(mode="int8-dynamic", per_channel=per_channel))
        assert relative_error(run(source, feeds), run(out, feeds)) < 0.1
    assert any("per-tensor" in note for note in result.notes)


def assertion_graph(path: Path) -> Path:
    """A graph that runs, but whose Reshape target has a data-dependent length.

    onnxruntime's symbolic shape inference raises a bare AssertionError on it, as it does on
    some exported attention graphs.
    """
    rng = np.random.default_rng(0)
    initializers = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "weight"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat"),
    ]
    nodes = [
        helper.make_node("MatMul", ["pixel_values", "weight"], ["projected"], name="image_tower/fc/MatMul"),
        helper.make_node("Shape", ["projected"], ["shape"], name="shape"),
        helper.make_node("Cast", ["shape"], ["shape_float"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("NonZero", ["shape_float"], ["nonzero"], name="nonzero"),
        helper.make_node("Reshape", ["nonzero", "flat"], ["indices"], name="indices"),
        helper.make_node("Gather", ["shape", "indices"], ["target_shape"], name="gather"),
        helper.make_node("Reshape", ["projected", "target_shape"], ["logits"], name="reshape"),
    ]
    graph = helper.make_graph(
        nodes,
        "assertion",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 8])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)]), str(path))
    return path


def test_pre_process_assertion_falls_back(tmp_path):
    from onnxruntime.quantization import quant_pre_process

    source = assertion_graph(tmp_path / "assertion.onnx")
    with pytest.raises(AssertionError):
        quant_pre_process(str(source), str(tmp_path / "direct.onnx"))

    out = tmp_path / "dynamic.onnx"
    result = quantize_model(source, out, QuantizeConfig(mode="int8-dynamic"))

    assert "AssertionError" in result.pre_process["fallback_reason"]
    assert result.nodes_quantized["int8-dynamic"] == 1
    feeds = {"pixel_values": np.ones((2, 16), dtype=np.float32)}
    assert run(out, feeds).shape == (2, 8)


def test_histogram_needs_fixed_length(fusion_onnx, scenes, tmp_path):
    reader = make_reader(scenes, padding="longest")
    with pytest.raises(ConfigError, match="max_length"):
        quantize_model(fusion_onnx, tmp_path / "q.onnx", QuantizeConfig(calibration_method="entropy"), reader)


def test_percentile_with_fixed_length(fusion_onnx, scenes, tmp_path):
    reader = make_reader(scenes)
    config = QuantizeConfig(calibration_method="percentile", percentile=99.9)
    result = quantize_model(fusion_onnx, tmp_path / "q.onnx", config, reader)
    assert result.calibration["method"] == "percentile"
    assert result.calibration["percentile"] == 99.9


class PlainReader:
    """Wraps a reader without `__len__` and `set_range`, so onnxruntime cannot calibrate in strides."""

    def __init__(self, reader: EdgemmCalibrationReader):
        self.reader = reader

    def get_next(self):
        return self.reader.get_next()

    def rewind(self):
        self.reader.rewind()


def calibration_peak_bytes(fusion_onnx: Path, reader, out: Path) -> int:
    tracemalloc.start()
    try:
        quantize_model(fusion_onnx, out, QuantizeConfig(calibration_method="entropy", pre_process=False), reader)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_histogram_memory_not_linear(fusion_onnx, scenes, tmp_path):
    # tracemalloc counts numpy arrays, which hold the activations onnxruntime's calibrator keeps.
    peaks = {}
    for size in (8, 32):
        peaks["strided", size] = calibration_peak_bytes(fusion_onnx, make_reader(scenes, size=size), tmp_path / "a.onnx")
        peaks["plain", size] = calibration_peak_bytes(fusion_onnx, PlainReader(make_reader(scenes, size=size)), tmp_path / "b.onnx")

    # Without strides the calibrator's data grows with the set, which shows the measurement sees it.
    assert peaks["plain", 32] > 1.5 * peaks["plain", 8], peaks
    assert peaks["strided", 32] < 1.2 * peaks["strided", 8], peaks


def test_missing_reader_for_static(fusion_onnx, tmp_path):
    with pytest.raises(ConfigError, match="calibration"):
        quantize_model(fusion_onnx, tmp_path / "q.onnx", QuantizeConfig(mode="int8-static"))


def test_unknown_excluded_node(fusion_onnx, tmp_path):
    config = QuantizeConfig(mode="int8-dynamic", nodes_to_exclude=("no_such_node",))
    with pytest.raises(ConfigError, match="no_such_node"):
        quantize_model(fusion_onnx, tmp_path / "q.onnx", config)


def test_invalid_mode():
    with pytest.raises(ConfigError, match="int8-static"):
        QuantizeConfig(mode="int4")


def test_measure_latency_positive(fusion_onnx, scenes):
    feeds = make_reader(scenes).first_batch()
    assert measure_latency(fusion_onnx, feeds, threads=1, runs=3, warmup=1) > 0.0


class ArrayReader:
    """A calibration reader over fixed arrays, for graphs that take only `pixel_values`."""

    def __init__(self, batches: list[np.ndarray]):
        self.batches = batches
        self.position = 0

    def get_next(self):
        if self.position == len(self.batches):
            return None
        self.position += 1
        return {"pixel_values": self.batches[self.position - 1]}

    def rewind(self):
        self.position = 0


def outlier_model(path: Path) -> Path:
    """Two MatMuls; the first writes one channel 1000x larger than the others.

    The second MatMul ignores that channel, but static INT8 rounds its whole input with one
    scale, which wipes out the small channels. Keeping that MatMul in float repairs the output.
    """
    rng = np.random.default_rng(0)
    first = rng.standard_normal((16, 16)).astype(np.float32) * 0.3
    first[:, 0] *= 3000.0
    second = rng.standard_normal((16, 4)).astype(np.float32)
    second[0, :] = 0.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["pixel_values", "first"], ["hidden"], name="image_tower/first/MatMul"),
            helper.make_node("MatMul", ["hidden", "second"], ["logits"], name="image_tower/second/MatMul"),
        ],
        "outlier",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(first, "first"), numpy_helper.from_array(second, "second")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_operatorsetid("", 17)]), str(path))
    return path


def test_fallback_keeps_sensitive_node_float(tmp_path):
    from edgemm.compression.sensitivity import find_sensitive_nodes, quantize_with_fallback

    source = outlier_model(tmp_path / "outlier.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(4)]
    evaluation = {"pixel_values": rng.standard_normal((32, 16)).astype(np.float32)}
    reference = run(source, evaluation)

    def evaluate(path: Path) -> float:
        return 1.0 - relative_error(reference, run(path, evaluation))

    config = QuantizeConfig(mode="int8-static", pre_process=False)
    plain = tmp_path / "plain.onnx"
    quantize_model(source, plain, config, ArrayReader(batches))
    assert evaluate(plain) < 0.5, "the outlier model should lose accuracy when fully quantized"

    ranking = find_sensitive_nodes(source, plain, evaluation, top_k=2)
    assert ranking[0].node == "image_tower/second/MatMul"

    out = tmp_path / "fallback.onnx"
    result = quantize_with_fallback(source, out, config, ArrayReader(batches), evaluate, max_drop=0.1)

    assert result.fallback["nodes_kept_float"] == ["image_tower/second/MatMul"]
    assert result.fallback["attempts"][-1]["drop"] <= 0.1
    assert evaluate(out) >= 0.9
    assert "QuantizeLinear" in op_types(out)


def test_fallback_limit_unreachable(tmp_path):
    from edgemm.compression.sensitivity import quantize_with_fallback
    from edgemm.errors import AccuracyError

    source = outlier_model(tmp_path / "outlier.onnx")
    rng = np.random.default_rng(1)
    batches = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(2)]
    out = tmp_path / "fallback.onnx"

    # A metric that no quantized model can keep: only the FP32 file scores 1.
    def evaluate(path: Path) -> float:
        return 1.0 if path == source else 0.0

    config = QuantizeConfig(mode="int8-static", pre_process=False)
    with pytest.raises(AccuracyError, match="limit"):
        quantize_with_fallback(source, out, config, ArrayReader(batches), evaluate, max_drop=0.01, max_steps=2)
    assert not out.exists()


def tiny_fusion_graph(scenes: Path, folder: Path):
    """Export a tiny edgemm concat-fusion model and return the graph with a calibration reader for it."""
    from edgemm.compression.calibration import graph_input_names
    from edgemm.compression.export_onnx import export_onnx
    from edgemm.models.checkpoint import load_checkpoint
    from edgemm.models.testing import make_tiny_checkpoint

    checkpoint = load_checkpoint(make_tiny_checkpoint(folder / "checkpoint", "concat_fusion"))
    examples = {
        "input_ids": torch.ones(2, 8, dtype=torch.int64),
        "attention_mask": torch.ones(2, 8, dtype=torch.int64),
        "pixel_values": torch.randn(2, 3, 64, 64),
    }
    path = folder / "model.onnx"
    export_onnx(checkpoint.model, path, example_inputs=examples)
    calibration = CalibrationSet(path=scenes, size=8, batch_size=4)
    reader = EdgemmCalibrationReader.from_spec(
        calibration, graph_input_names(path), checkpoint.input_spec, checkpoint.vocab_path
    )
    return path, reader


def test_tiny_edgemm_model_mixed_towers(scenes, tmp_path):
    from collections import Counter

    from edgemm.compression.quantize import node_towers

    path, reader = tiny_fusion_graph(scenes, tmp_path)
    towers = Counter(node_towers(onnx.load(str(path))).values())
    assert towers["text"] > 0
    assert towers["image"] > 0

    feeds = reader.first_batch()
    out = tmp_path / "mixed.onnx"
    config = QuantizeConfig(mode="none", text_mode="int8-dynamic", image_mode="int8-static")

    result = quantize_model(path, out, config, reader)

    assert result.precision == "mixed"
    assert result.nodes_quantized["int8-dynamic"] > 0
    assert result.nodes_quantized["int8-static"] > 0
    assert result.calibration["samples"] == 8
    assert relative_error(run(path, feeds), run(out, feeds)) < 0.1


def test_weight_only_int8(fusion_onnx, scenes, tmp_path):
    feeds = make_reader(scenes).first_batch()
    out = tmp_path / "weight_only.onnx"

    result = quantize_model(fusion_onnx, out, QuantizeConfig(mode="int8-dynamic", weight_only=True))

    assert result.weight_only is True
    assert "MatMulNBits" in op_types(out)
    assert "DynamicQuantizeLinear" not in op_types(out)
    assert relative_error(run(fusion_onnx, feeds), run(out, feeds)) < 0.05


def test_uint8_image_convs_all_qlinear(scenes, tmp_path, caplog):
    """The x86 recipe's image-tower settings: no Conv may stay float between Q and DQ nodes."""
    path, reader = tiny_fusion_graph(scenes, tmp_path)
    image_ops = ["Conv", "Clip", "Relu", "Add", "GlobalAveragePool"]

    def quantize(name: str, op_types: list[str]):
        config = QuantizeConfig(
            mode="int8-dynamic", image_mode="int8-static", activation_type="uint8", op_types_to_quantize=op_types
        )
        return quantize_model(path, tmp_path / name, config, reader)

    with caplog.at_level("WARNING"):
        mixed = quantize("mixed.onnx", ["MatMul", "Gather", *image_ops])
    # The dynamic pass runs on a graph with QDQ nodes, so onnxruntime's warning about
    # quantization-aware training does not apply and is filtered out.
    assert not [record for record in caplog.records if "already quantized" in record.getMessage()]
    text_only = quantize("text.onnx", ["MatMul", "Gather"])

    # Add and Clip are in the shared list for the static image tower. The dynamic text tower
    # cannot quantize them, so they must not be counted there.
    assert mixed.nodes_quantized["int8-dynamic"] == text_only.nodes_quantized["int8-dynamic"]
    assert mixed.nodes_quantized["int8-static"] > 0

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(tmp_path / "mixed.onnx"), options, providers=["CPUExecutionProvider"])
    optimized = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    convs = onnx.load(str(path)).graph.node
    assert optimized.count("QLinearConv") == sum(node.op_type == "Conv" for node in convs)
    assert not {"Conv", "FusedConv", "NhwcFusedConv"} & set(optimized)
