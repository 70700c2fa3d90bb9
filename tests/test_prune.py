"""Structural pruning of the tiny models with real torch-pruning, plus the traps it must catch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from edgemm.compression.profile import count_params_and_macs, profile_model
from edgemm.compression.prune import PruneConfig, find_attention_layers, prune_model
from edgemm.errors import CompressionError, ConfigError
from edgemm.models import build_model, create_model, load_checkpoint, model_config, save_checkpoint
from edgemm.models.image import ImageTowerConfig
from edgemm.models.registry import default_input_spec, default_vocab_path
from edgemm.models.testing import make_tiny_checkpoint

ARCHITECTURES = ["concat_fusion", "cross_attention", "dual_encoder"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions run far slower with 2 threads on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(architecture: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(architecture, pretrained=False, **kwargs)
    return model.eval()


def tiny_inputs(model: nn.Module, batch: int = 2, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.text_tower.config.vocab_size
    input_ids = torch.randint(5, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[-1, length // 2 :] = 0
    pixel_values = torch.randn(batch, 3, 64, 64, generator=generator)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": pixel_values}


def outputs_of(model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        output = model(**inputs)
    return list(output) if isinstance(output, tuple) else [output]


def pruned_layers(model: nn.Module, reference: nn.Module) -> list[tuple[str, int]]:
    """Return (name, width) of Linear/Conv layers whose output width pruning changed."""
    before = dict(reference.named_modules())
    changed = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if module.out_features != before[name].out_features:
                changed.append((name, module.out_features))
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            if module.out_channels != before[name].out_channels:
                changed.append((name, module.out_channels))
    return changed


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Return a checkpoint folder per architecture, written as `edgemm train` would."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {architecture: make_tiny_checkpoint(root / architecture, architecture) for architecture in ARCHITECTURES}


@pytest.mark.parametrize("ratio", [0.3, 0.5])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_prune_architecture(architecture, ratio, tiny_checkpoints, tmp_path):
    model = load_checkpoint(tiny_checkpoints[architecture]).model
    inputs = tiny_inputs(model)
    reference_shapes = [tuple(output.shape) for output in outputs_of(model, inputs)]

    result = prune_model(model, PruneConfig(ratio=ratio, round_to=8), inputs)
    pruned = result.model.eval()

    # The input model is untouched and the pruned one keeps its output shapes.
    assert [tuple(output.shape) for output in outputs_of(model, inputs)] == reference_shapes
    assert [tuple(output.shape) for output in outputs_of(pruned, inputs)] == reference_shapes

    for part in ("text_tower", "image_tower"):
        report = result.parts[part]
        assert report.requested_ratio == ratio
        assert 0.8 * ratio <= report.param_reduction < 0.95, (part, report)
        assert 0.8 * ratio <= report.mac_reduction < 0.95, (part, report)
        assert report.channel_reduction >= 0.8 * ratio, (part, report)
    assert result.parts["total"].params_after < result.parts["total"].params_before
    assert result.parts["total"].macs_after < result.parts["total"].macs_before

    # Every pruned width is a multiple of round_to.
    changed = pruned_layers(pruned, model)
    assert changed
    assert [item for item in changed if item[1] % 8 != 0] == []

    # Head counts are consistent in modules and config, and whole heads were removed.
    config = model_config(pruned)
    text_config = config["text_tower"]
    for index, layer in enumerate(pruned.text_tower.encoder.layer):
        attention = layer.attention.self
        assert attention.num_heads == text_config["num_heads"][index]
        assert attention.head_dim == text_config["head_dims"][index] == 16
        assert attention.query.out_features == attention.num_heads * attention.head_dim
        assert attention.key.out_features == attention.value.out_features == attention.query.out_features
        assert attention.num_heads == 4 - round(ratio * 4)
    assert result.parts["text_tower"].heads_after < result.parts["text_tower"].heads_before

    # Interfaces keep their widths.
    assert pruned.text_tower.embeddings.word_embeddings.num_embeddings == model.text_tower.config.vocab_size
    assert pruned.image_tower._conv_stem.in_channels == 3
    if architecture == "dual_encoder":
        assert pruned.text_proj.out_features == pruned.image_proj.out_features == model.text_proj.out_features
    else:
        assert pruned.classifier.fc2.out_features == 2

    # The saved config rebuilds the pruned model and a reloaded checkpoint gives identical outputs.
    assert sum(p.numel() for p in build_model(config).parameters()) == result.parts["total"].params_after
    folder = save_checkpoint(
        pruned,
        tmp_path / "pruned",
        labels=["mismatch", "match"],
        input_spec=default_input_spec(pruned),
        vocab_path=default_vocab_path(pruned),
    )
    reloaded = load_checkpoint(folder).model
    for expected, actual in zip(outputs_of(pruned, inputs), outputs_of(reloaded, inputs)):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_prune_report_to_dict():
    model = tiny_model("concat_fusion")
    result = prune_model(model, PruneConfig(ratio=0.3), tiny_inputs(model))
    summary = result.to_dict()
    assert set(summary["parts"]) == {"text_tower", "image_tower", "head", "total"}
    text = summary["parts"]["text_tower"]
    assert text["params_after"] < text["params_before"]
    assert 0 < text["param_reduction"] < 1
    assert summary["config"]["ratio"] == 0.3
    assert any(layer["before"] != layer["after"] for layer in summary["layers"])


def test_prune_part_ratios_leave_image_tower():
    model = tiny_model("concat_fusion")
    result = prune_model(model, PruneConfig(text_ratio=0.5), tiny_inputs(model))
    assert result.parts["text_tower"].param_reduction > 0.4
    assert result.parts["image_tower"].params_after == result.parts["image_tower"].params_before
    assert result.parts["image_tower"].requested_ratio is None
    assert result.model.image_tower.config.to_dict() == model.image_tower.config.to_dict()


def test_prune_cross_attention_text_ratio_sets_width():
    model = tiny_model("cross_attention")
    result = prune_model(model, PruneConfig(text_ratio=0.5, image_ratio=0.3, head_ratio=0.2), tiny_inputs(model))
    config = model_config(result.model)
    # The text residual width runs through the head's blocks, and the text ratio decides it.
    assert config["text_tower"]["hidden_size"] == 32
    assert config["head"]["width"] == 32
    assert result.model.image_proj.out_features == 32


def test_prune_cross_attention_text_only():
    model = tiny_model("cross_attention")
    result = prune_model(model, PruneConfig(text_ratio=0.5), tiny_inputs(model))
    config = model_config(result.model)
    # The blocks' residual layers carry the text width, so they follow the text ratio.
    assert config["text_tower"]["hidden_size"] == 32
    assert config["head"]["width"] == 32
    assert config["head"]["num_heads"] == [4]
    assert config["image_tower"] == model.image_tower.config.to_dict()
    assert result.warnings == []


def test_prune_taylor_with_calibration():
    model = tiny_model("dual_encoder")
    batches = [tiny_inputs(model, batch=4, seed=seed) for seed in range(3)]
    config = PruneConfig(ratio=0.3, importance="taylor", taylor_batches=3)
    result = prune_model(model, config, batches[0], calibration_batches=batches)
    assert result.parts["text_tower"].param_reduction > 0.2
    assert all(parameter.grad is None for parameter in result.model.parameters())


def test_prune_taylor_without_batches():
    model = tiny_model("concat_fusion")
    with pytest.raises(ConfigError, match="calibration batches"):
        prune_model(model, PruneConfig(ratio=0.3, importance="taylor"), tiny_inputs(model))


def test_prune_global_iterative():
    model = tiny_model("concat_fusion")
    config = PruneConfig(ratio=0.5, global_pruning=True, iterative_steps=3, round_to=16)
    result = prune_model(model, config, tiny_inputs(model))
    assert result.parts["total"].param_reduction > 0.3
    assert [item for item in pruned_layers(result.model, model) if item[1] % 16 != 0] == []


def test_prune_keeps_imagenet_classifier():
    model = tiny_model("concat_fusion", image_tower=ImageTowerConfig(name="tiny", with_classifier=True, num_classes=10))
    inputs = tiny_inputs(model)
    result = prune_model(model, PruneConfig(ratio=0.5), inputs)
    tower = result.model.image_tower
    assert tower._conv_head.out_channels == model.image_tower._conv_head.out_channels
    assert tower.classify(inputs["pixel_values"]).shape == (2, 10)
    assert result.parts["image_tower"].param_reduction > 0.3


@pytest.mark.parametrize("value", [0, 1, -0.2, 1.5, float("nan"), True])
def test_prune_config_rejects_ratio(value):
    with pytest.raises(ConfigError) as error:
        PruneConfig(ratio=value)
    assert repr(value) in str(error.value)
    assert "between 0 and 1" in str(error.value)


def test_prune_config_rejects_options():
    with pytest.raises(ConfigError, match="No prune ratio"):
        PruneConfig()
    with pytest.raises(ConfigError, match="text_ratio=1.5"):
        PruneConfig(ratio=0.3, text_ratio=1.5)
    with pytest.raises(ConfigError, match="importance"):
        PruneConfig(ratio=0.3, importance="random")
    with pytest.raises(ConfigError, match="round_to=0"):
        PruneConfig(ratio=0.3, round_to=0)
    with pytest.raises(ConfigError, match="Unknown prune options"):
        PruneConfig.from_dict({"ratio": 0.3, "sparsity": 0.5})


def test_prune_rejects_unknown_ignored_layer():
    model = tiny_model("concat_fusion")
    with pytest.raises(ConfigError, match="no_such_layer"):
        prune_model(model, PruneConfig(ratio=0.3, ignored_layers=("no_such_layer",)), tiny_inputs(model))


# ---- toy models for the traps ----


class NumpyDetour(nn.Module):
    """Leaves autograd through numpy, so the first layer is invisible to the tracer."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x):
        hidden = self.fc1(x).detach().numpy()
        return self.fc2(torch.from_numpy(np.maximum(hidden, 0)))


class ValueBranch(nn.Module):
    """Picks a layer from an activation value, so a trace records only one branch."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.positive = nn.Linear(32, 4)
        self.negative = nn.Linear(32, 4)

    def forward(self, x):
        hidden = self.fc1(x)
        if hidden.sum().item() > 0:
            return self.positive(hidden)
        return self.negative(hidden)


class TensorIf(ValueBranch):
    def forward(self, x):
        hidden = self.fc1(x)
        return self.positive(hidden) if hidden.mean() > 0 else self.negative(hidden)


@pytest.mark.parametrize("toy", [NumpyDetour, ValueBranch, TensorIf])
def test_prune_untraceable_model(toy):
    model = toy()
    with pytest.raises(CompressionError) as error:
        prune_model(model, PruneConfig(ratio=0.5), torch.randn(2, 16))
    message = str(error.value)
    assert toy.__name__ in message
    assert "ignored_layers" in message


class MHABlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x):
        normed = self.norm1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.fc2(torch.relu(self.fc1(self.norm2(x))))


class MHATransformer(nn.Module):
    """A small text encoder on nn.MultiheadAttention with a CLIP-style output projection."""

    def __init__(self, width: int = 64, heads: int = 4, bare_projection: bool = False):
        super().__init__()
        self.embed = nn.Embedding(100, width)
        self.blocks = nn.Sequential(MHABlock(width, heads), MHABlock(width, heads))
        self.norm = nn.LayerNorm(width)
        self.bare_projection = bare_projection
        if bare_projection:
            self.projection = nn.Parameter(torch.randn(width, 32) / width**0.5)
        else:
            self.projection = nn.Linear(width, 32, bias=False)

    def forward(self, input_ids):
        pooled = self.norm(self.blocks(self.embed(input_ids))).mean(dim=1)
        return pooled @ self.projection if self.bare_projection else self.projection(pooled)


def test_prune_mha_residual_width():
    torch.manual_seed(0)
    model = MHATransformer()
    input_ids = torch.randint(0, 100, (2, 8))
    result = prune_model(model, PruneConfig(ratio=0.5), input_ids)
    pruned = result.model

    # The residual width shrinks with the MLP, not only the MLP.
    assert pruned.embed.embedding_dim == 32
    assert pruned.blocks[0].attn.embed_dim == 32
    assert pruned.blocks[0].fc1.out_features == 128
    assert pruned(input_ids).shape == (2, 32)
    assert result.parts["model"].param_reduction > 0.5
    assert result.warnings == []


def test_prune_bare_projection_warns():
    torch.manual_seed(0)
    model = MHATransformer(bare_projection=True)
    input_ids = torch.randint(0, 100, (2, 8))
    result = prune_model(model, PruneConfig(ratio=0.5), input_ids)

    # torch-pruning 1.6.1 leaves the residual width alone here, and the report must list it.
    assert result.model.embed.embedding_dim == 64
    assert result.model(input_ids).shape == (2, 32)
    joined = "\n".join(result.warnings)
    assert "projection" in joined
    assert "kept their width" in joined
    assert "blocks.0.fc2 (64)" in joined


class LinearOnlyOutput(nn.Module):
    """Every layer feeds the output directly, so nothing may be pruned."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32)

    def forward(self, x):
        return self.fc(x)


def test_prune_nothing_prunable():
    with pytest.raises(CompressionError, match="did not shrink"):
        prune_model(LinearOnlyOutput(), PruneConfig(ratio=0.5), torch.randn(2, 16))
    result = prune_model(LinearOnlyOutput(), PruneConfig(ratio=0.5, strict=False), torch.randn(2, 16))
    assert any("did not shrink" in message for message in result.warnings)


class CachedWidthAttention(nn.Module):
    """Attention that caches its inner width at construction, so pruning leaves it stale."""

    def __init__(self, width: int = 32, heads: int = 4):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.out = nn.Linear(width, width)
        self.heads = heads
        self.inner = width

    def forward(self, x):
        batch = x.shape[0]
        split = lambda t: t.reshape(batch, -1, self.heads, self.inner // self.heads).transpose(1, 2)
        query, key, value = split(self.query(x)), split(self.key(x)), split(self.value(x))
        context = torch.softmax(query @ key.transpose(-1, -2), dim=-1) @ value
        return self.out(context.transpose(1, 2).reshape(batch, -1, self.inner))


class CachedWidthModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = CachedWidthAttention()
        self.head = nn.Linear(32, 2)

    def forward(self, x):
        return self.head(self.attention(x).mean(dim=1))


def test_prune_stale_width_attribute():
    torch.manual_seed(0)
    with pytest.raises(CompressionError, match="fails on the example inputs"):
        prune_model(CachedWidthModel(), PruneConfig(ratio=0.5), torch.randn(2, 6, 32))


def test_find_attention_layers_skips_mha():
    assert find_attention_layers(MHATransformer()) == []
    model = tiny_model("cross_attention")
    assert len(find_attention_layers(model)) == 3


def test_profile_counts_attention_matmuls():
    torch.manual_seed(0)
    model = MHATransformer().eval()
    input_ids = torch.randint(0, 100, (2, 8))
    params, macs = count_params_and_macs(model, input_ids)
    tokens, width = 2 * 8, 64
    per_block = tokens * width * 3 * width + tokens * width * width + 2 * tokens * width * 4 * width
    attention = 2 * 2 * 8 * 8 * width  # scores and context, summed over heads
    assert macs == 2 * (per_block + attention) + 2 * width * 32
    assert params == sum(p.numel() for p in model.parameters())


def test_profile_parts_add_up():
    model = tiny_model("cross_attention")
    profile = profile_model(model, tiny_inputs(model))
    assert set(profile) == {"text_tower", "image_tower", "head", "total"}
    assert profile["text_tower"].macs > 0
    assert profile["image_tower"].macs > 0
    assert profile["head"].macs > 0
    parts = [profile[name] for name in ("text_tower", "image_tower", "head")]
    assert sum(part.params for part in parts) == profile["total"].params
    assert sum(part.macs for part in parts) == profile["total"].macs
