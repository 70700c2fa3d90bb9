"""ONNX export of the tiny models and the exporter traps that `export_onnx` guards against."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from edgemm.compression.export_onnx import check_graph_file, check_opset, export_onnx
from edgemm.compression.parity import ParityLimits, measure_parity, random_batches
from edgemm.errors import CompressionError, ConfigError
from edgemm.models.checkpoint import load_checkpoint
from edgemm.models.testing import make_tiny_checkpoint
from edgemm.runtime.preprocess import Preprocessor

REPO_ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a small red circle above a large blue square", "a green star"]


@pytest.fixture(autouse=True)
def _quiet_exporter_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def tiny_examples(checkpoint) -> dict[str, torch.Tensor]:
    """Preprocess two real captions and two random images as a batch of example inputs."""
    preprocessor = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)
    crop = checkpoint.input_spec.image.crop
    images = [np.random.default_rng(index).integers(0, 256, (crop, crop, 3), dtype=np.uint8) for index in range(2)]
    batch = preprocessor(TEXTS, images)
    return {name: torch.from_numpy(array) for name, array in batch.items()}


def graph_dims(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path))
    values = list(proto.graph.input) + list(proto.graph.output)
    return {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in values}


class MeanPoolAttention(nn.Module):
    """A small text model built on nn.MultiheadAttention, whose reshapes the legacy exporter bakes."""

    def __init__(self, layer: nn.Module | None = None):
        super().__init__()
        self.embed = nn.Embedding(64, 16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.layer = layer
        self.classifier = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask, pixel_values):
        hidden = self.embed(input_ids)
        padding = attention_mask == 0
        if self.layer is not None:
            hidden = self.layer(hidden, src_key_padding_mask=padding)
        else:
            hidden, _ = self.attention(hidden, hidden, hidden, key_padding_mask=padding, need_weights=False)
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(pooled + pixel_values.mean(dim=(1, 2, 3)).unsqueeze(-1))


def small_examples(batch: int = 2, sequence: int = 8) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(1, 64, (batch, sequence), generator=generator),
        "attention_mask": torch.ones(batch, sequence, dtype=torch.long),
        "pixel_values": torch.randn(batch, 3, 8, 8, generator=generator),
    }


# concat_fusion and dual_encoder are exported in tests/test_package.py through export_checkpoint.
def test_cross_attention_export_dynamic_axes(tmp_path):
    checkpoint = load_checkpoint(make_tiny_checkpoint(tmp_path / "checkpoint", "cross_attention"))
    path = tmp_path / "model.onnx"

    result = export_onnx(checkpoint.model, path, example_inputs=tiny_examples(checkpoint))

    assert result.exporter == "dynamo"
    assert result.output_names == ("logits",)
    dims = graph_dims(path)
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"] == ["batch", "sequence"]
    assert dims["pixel_values"][0] == "batch"
    assert dims["logits"] == ["batch", 2]
    shapes = {(check.batch, check.sequence) for check in result.checks}
    example_sequence = tiny_examples(checkpoint)["input_ids"].shape[1]
    assert (3, example_sequence) in shapes
    assert (2, 37) in shapes
    assert (1, 5) in shapes
    assert max(check.max_abs_diff for check in result.checks) < 1e-4
    assert not checkpoint.model.training


def test_batch_one_example_stays_dynamic(tmp_path):
    model = MeanPoolAttention().eval()
    path = tmp_path / "model.onnx"

    result = export_onnx(model, path, example_inputs=small_examples(batch=1))

    dims = graph_dims(path)
    assert dims["logits"][0] == "batch"
    assert dims["input_ids"] == ["batch", "sequence"]
    assert {check.batch for check in result.checks} == {1, 2, 3}


def test_fixed_batch_axis_is_reported(tmp_path):
    model = MeanPoolAttention().eval()
    examples = small_examples()
    path = tmp_path / "fixed.onnx"
    names = ["input_ids", "attention_mask", "pixel_values"]
    torch.onnx.export(
        model,
        tuple(examples[name] for name in names),
        str(path),
        dynamo=False,
        input_names=names,
        output_names=["logits"],
        opset_version=18,
    )

    with pytest.raises(CompressionError) as raised:
        check_graph_file(
            path,
            graph="model",
            opset=18,
            input_names=names,
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch"}},
        )

    message = str(raised.value)
    assert "axis 0 (batch)" in message
    assert "'input_ids'" in message
    assert "fixed to 2" in message


def test_torchscript_mha_sequence_is_caught(tmp_path):
    model = MeanPoolAttention().eval()

    with pytest.raises(CompressionError) as raised:
        export_onnx(model, tmp_path / "legacy.onnx", example_inputs=small_examples(), exporter="torchscript")

    message = str(raised.value)
    assert "torchscript exporter" in message
    assert "axis changes" in message
    assert "dynamo exporter instead" in message


@pytest.fixture(scope="module")
def mha_export(tmp_path_factory):
    torch.manual_seed(0)
    model = MeanPoolAttention().eval()
    path = tmp_path_factory.mktemp("mha") / "model.onnx"
    return model, path, export_onnx(model, path, example_inputs=small_examples())


def test_dynamo_exports_mha_dynamic(mha_export):
    model, path, result = mha_export

    assert result.exporter == "dynamo"
    assert {check.sequence for check in result.checks} == {8, 37, 5}
    assert max(check.max_abs_diff for check in result.checks) < 1e-4


def test_no_grad_fused_encoder_layer_exports(tmp_path):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = MeanPoolAttention(layer=nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    model.train()
    fastpath_before = torch.backends.mha.get_fastpath_enabled()

    # The legacy exporter also bakes the sequence length of the layer's attention, so only the
    # batch axis is dynamic here, because this test is about the fused kernel picked under no_grad.
    with torch.no_grad():
        result = export_onnx(
            model,
            tmp_path / "encoder.onnx",
            example_inputs=small_examples(),
            exporter="torchscript",
            fallback=False,
            dynamic_sequence=False,
        )

    assert result.exporter == "torchscript"
    assert max(check.max_abs_diff for check in result.checks) < 1e-4
    assert model.training
    assert torch.backends.mha.get_fastpath_enabled() == fastpath_before


def test_no_grad_fused_layer_breaks_plain_export(tmp_path):
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    model = MeanPoolAttention(layer=nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)).eval()
    examples = small_examples()
    examples["attention_mask"][0, 6:] = 0

    with torch.no_grad(), pytest.raises(Exception, match="_transformer_encoder_layer_fwd"):
        torch.onnx.export(model, tuple(examples.values()), str(tmp_path / "plain.onnx"), dynamo=False, opset_version=18)


def test_missing_onnxscript_names_install(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys

        class BlockOnnxscript:
            def find_spec(self, name, path=None, target=None):
                if name == "onnxscript" or name.startswith("onnxscript."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, BlockOnnxscript())
        import torch
        from torch import nn
        from edgemm.compression.export_onnx import export_onnx
        from edgemm.errors import CompressionError

        class Encoder(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 3)

            def encode_image(self, pixel_values):
                return self.conv(pixel_values).mean(dim=(2, 3))

        try:
            export_onnx(Encoder(), {str(tmp_path / "x.onnx")!r}, graph="image_encoder",
                        example_inputs={{"pixel_values": torch.randn(2, 3, 8, 8)}})
        except CompressionError as error:
            print("CompressionError:", error)
        """
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT
    )

    assert completed.returncode == 0, completed.stderr
    assert "CompressionError:" in completed.stdout
    assert "pip install onnxscript" in completed.stdout
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("opset", [7, 16, 26, 99])
def test_unsupported_opset_rejected(opset):
    with pytest.raises(ConfigError) as raised:
        check_opset(opset)

    assert f"opset {opset}" in str(raised.value)
    assert "--opset 18" in str(raised.value)


def test_parity_detects_other_weights(mha_export):
    model, path, _ = mha_export
    batches = random_batches({name: tensor.numpy() for name, tensor in small_examples().items()}, num_batches=2)

    same = measure_parity(model, path, batches)
    torch.manual_seed(1)
    other = measure_parity(MeanPoolAttention().eval(), path, batches)

    assert same.passed
    assert same.max_abs_logit_diff < ParityLimits().max_abs_logit_diff
    assert same.decision_agreement == 1.0
    assert same.num_samples == 8
    assert not other.passed
    assert other.max_abs_logit_diff > ParityLimits().max_abs_logit_diff
    assert "max |logit diff|" in other.failures[0]


class DataDependentEncoder(nn.Module):
    """An image encoder with a branch on tensor values, which torch.export cannot trace."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def encode_image(self, pixel_values):
        features = self.conv(pixel_values).mean(dim=(2, 3))
        if pixel_values.max() > 1000:
            features = features * 2
        return features


def test_untraceable_model_falls_back(tmp_path, caplog):
    examples = {"pixel_values": torch.randn(2, 3, 8, 8)}

    with caplog.at_level("WARNING", logger="edgemm.compression.export_onnx"):
        result = export_onnx(DataDependentEncoder(), tmp_path / "image.onnx", graph="image_encoder", example_inputs=examples)

    assert result.exporter == "torchscript"
    assert result.output_names == ("image_embeds",)
    assert "retrying with the TorchScript exporter" in caplog.text
    assert "data-dependent" in caplog.text


def test_untraceable_model_without_fallback_fails(tmp_path):
    examples = {"pixel_values": torch.randn(2, 3, 8, 8)}

    with pytest.raises(CompressionError) as raised:
        export_onnx(
            DataDependentEncoder(), tmp_path / "image.onnx", graph="image_encoder", example_inputs=examples, fallback=False
        )

    assert "dynamo exporter failed on graph 'image_encoder'" in str(raised.value)
    assert "data-dependent" in str(raised.value)


def test_retrieval_decision_ignores_duplicate_images():
    from edgemm.compression.parity import _image_groups, _retrieval_decisions

    pixels = np.zeros((4, 3, 2, 2), dtype=np.float32)
    pixels[1] += 1.0
    pixels[3] += 1.0
    texts = np.eye(3)[[0, 1, 0, 1]]
    images = np.eye(3)[[0, 1, 0, 1]]
    rounded = images.copy()
    rounded[2, 0] += 1e-9  # the second copy of image 0 wins the argmax by rounding only

    groups = _image_groups(pixels)

    assert list(groups) == [0, 1, 0, 1]
    assert list(_retrieval_decisions(texts, images, groups)) == list(_retrieval_decisions(texts, rounded, groups))
