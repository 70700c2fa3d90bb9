"""Distillation recovery of pruned tiny models on synthetic scenes, in one process and under torchrun."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from edgemm.compression.prune import PruneConfig, prune_model
from edgemm.compression.recover import RecoverConfig, calibration_batches, matrix_labels, prune_and_recover, recover
from edgemm.data.synthetic import generate_scenes
from edgemm.errors import ConfigError, DataError
from edgemm.models import create_model, model_config
from edgemm.models.registry import default_input_spec, default_vocab_path
from edgemm.runtime.preprocess import Preprocessor

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny convolutions run far slower with 2 threads on a busy 2-core machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp("recover") / "scenes", 32, image_size=48, seed=3)


def small_preprocessor(model) -> Preprocessor:
    # 32x32 crops keep each step fast; the convolutional towers accept any size.
    spec = default_input_spec(model)
    spec = replace(spec, image=replace(spec.image, resize=36, crop=32))
    return Preprocessor(spec, default_vocab_path(model))


def example_inputs(preprocessor: Preprocessor, records) -> dict[str, torch.Tensor]:
    arrays = preprocessor([record.text for record in records[:4]], [record.image for record in records[:4]])
    return {name: torch.from_numpy(array) for name, array in arrays.items()}


def confident_fusion_teacher(architecture: str):
    """Return a random fusion model whose logits are far from uniform, so there is something to distil."""
    torch.manual_seed(0)
    model = create_model(architecture, pretrained=False).eval()
    with torch.no_grad():
        model.classifier.fc2.weight.mul_(30)
    return model


def trained_dual_teacher(scenes, preprocessor_of=small_preprocessor):
    """Return a tiny dual encoder trained briefly on the scenes with the task loss only."""
    torch.manual_seed(0)
    model = create_model("dual_encoder", pretrained=False).eval()
    config = RecoverConfig(steps=40, lr=2e-3, batch_size=8, alpha=0.0, feature_weight=0.0)
    result = recover(model, copy.deepcopy(model), scenes, preprocessor_of(model), config)
    assert result.after["accuracy"] > result.before["accuracy"]
    return model.eval()


def test_matrix_labels_mark_own_images():
    pixels = torch.randn(3, 3, 8, 8)
    batch = torch.stack([pixels[0], pixels[1], pixels[0], pixels[2]])
    labels = matrix_labels(batch).view(4, 4)

    assert labels.diagonal().tolist() == [1, 1, 1, 1]
    assert labels[0, 2] == 1
    assert labels[2, 0] == 1
    assert labels[0, 1] == 0
    assert int(labels.sum()) == 6


def test_recover_dual_encoder(scenes):
    teacher = trained_dual_teacher(scenes)
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(ratio=0.5), example_inputs(preprocessor, scenes)).model

    result = recover(pruned, teacher, scenes, preprocessor, RecoverConfig(steps=30, lr=1e-3, batch_size=8))

    assert result.model is pruned
    assert result.steps == 30
    assert result.after["distillation"] < 0.5 * result.before["distillation"]
    assert result.after["feature"] < result.before["feature"]
    assert result.after["accuracy"] >= result.before["accuracy"]
    assert result.history[-1]["step"] == 30
    summary = result.to_dict()
    assert summary["steps"] == 30
    assert json.dumps(summary)


@pytest.mark.parametrize("pairing", ["pairs", "matrix"])
@pytest.mark.parametrize("architecture", ["concat_fusion", "cross_attention"])
def test_recover_fusion_distils(scenes, architecture, pairing):
    # The random teacher's decisions disagree with the scene labels, so distil only (alpha=1).
    teacher = confident_fusion_teacher(architecture)
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(ratio=0.5), example_inputs(preprocessor, scenes)).model

    config = RecoverConfig(steps=20, lr=1e-3, batch_size=8, alpha=1.0, pairing=pairing)
    result = recover(pruned, teacher, scenes, preprocessor, config)

    assert result.steps == 20
    assert result.after["distillation"] < 0.8 * result.before["distillation"]


@pytest.mark.parametrize("pairing", ["pairs", "matrix"])
def test_recover_fusion_task_loss(scenes, pairing):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(ratio=0.5), example_inputs(preprocessor, scenes)).model

    config = RecoverConfig(steps=20, lr=1e-3, batch_size=8, alpha=0.0, feature_weight=0.0, pairing=pairing)
    result = recover(pruned, teacher, scenes, preprocessor, config)

    assert result.after["task"] < result.before["task"]
    assert result.after["accuracy"] >= result.before["accuracy"]


def test_recover_leaves_teacher(scenes):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(ratio=0.3), example_inputs(preprocessor, scenes)).model
    state = {name: value.clone() for name, value in teacher.state_dict().items()}

    result = recover(pruned, teacher, scenes, preprocessor, RecoverConfig(epochs=1, batch_size=8))

    # One epoch over 32 positives and 32 negatives in batches of 8.
    assert result.steps == 8
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_recover_freezes_batchnorm(scenes):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(ratio=0.3), example_inputs(preprocessor, scenes)).model
    running_mean = pruned.image_tower._bn0.running_mean.clone()

    recover(pruned, teacher, scenes, preprocessor, RecoverConfig(steps=2, batch_size=8))
    assert torch.equal(pruned.image_tower._bn0.running_mean, running_mean)

    recover(pruned, teacher, scenes, preprocessor, RecoverConfig(steps=2, batch_size=8, freeze_batchnorm=False))
    assert not torch.equal(pruned.image_tower._bn0.running_mean, running_mean)


def test_prune_and_recover_steps(scenes):
    teacher = confident_fusion_teacher("cross_attention")
    preprocessor = small_preprocessor(teacher)
    inputs = example_inputs(preprocessor, scenes)
    progress = []

    result = prune_and_recover(
        teacher,
        PruneConfig(ratio=0.5, iterative_steps=2),
        RecoverConfig(steps=4, lr=1e-3, batch_size=8),
        inputs,
        scenes,
        preprocessor,
        progress=lambda stage, done, total: progress.append((stage, done, total)),
    )

    assert len(result.recoveries) == 2
    assert ("prune", 1, 2) in progress
    assert ("prune", 2, 2) in progress
    assert ("recover", 4, 4) in progress
    assert result.prune.parts["text_tower"].param_reduction > 0.4
    assert result.prune.parts["image_tower"].param_reduction > 0.4
    assert result.prune.warnings == []
    for recovery in result.recoveries:
        assert recovery.after["distillation"] < recovery.before["distillation"]
    config = model_config(result.model)
    assert config["text_tower"]["hidden_size"] == 32
    assert config["head"]["num_heads"] == [2]
    with torch.no_grad():
        assert result.model(**inputs).shape == (4, 2)
    # The teacher is left unpruned.
    assert teacher.text_tower.config.hidden_size == 64


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"alpha": 1.5}, "alpha=1.5"),
        ({"batch_size": 1}, "batch_size=1"),
        ({"lr": 0}, "lr=0"),
        ({"steps": 0}, "steps=0"),
        ({"temperature": -1.0}, "temperature=-1.0"),
    ],
)
def test_recover_config_rejects(options, field):
    with pytest.raises(ConfigError, match=field):
        RecoverConfig(**options)


def test_calibration_batches_taylor(scenes):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)
    batches = calibration_batches(teacher, scenes, preprocessor, count=3, batch_size=8)

    assert len(batches) == 3
    assert set(batches[0]) == {"input_ids", "attention_mask", "pixel_values", "labels"}
    labels = torch.cat([batch["labels"] for batch in batches])
    assert set(labels.tolist()) == {0, 1}

    config = PruneConfig(ratio=0.5, importance="taylor", taylor_batches=3)
    result = prune_model(teacher, config, example_inputs(preprocessor, scenes), calibration_batches=batches)
    assert result.parts["text_tower"].param_reduction > 0.4
    magnitude = prune_model(teacher, PruneConfig(ratio=0.5), example_inputs(preprocessor, scenes))
    # Taylor and magnitude importance rank channels differently, so they keep different weights.
    taylor_weight = result.model.classifier.fc1.weight
    magnitude_weight = magnitude.model.classifier.fc1.weight
    assert taylor_weight.shape == magnitude_weight.shape
    assert not torch.equal(taylor_weight, magnitude_weight)


def test_calibration_batches_dual_encoder(scenes):
    model = create_model("dual_encoder", pretrained=False).eval()
    batches = calibration_batches(model, scenes, small_preprocessor(model), count=2, batch_size=4)
    assert len(batches) == 2
    assert "labels" not in batches[0]
    assert batches[0]["pixel_values"].shape == (4, 3, 32, 32)


def test_recover_config_from_recipe():
    config = RecoverConfig.from_recipe({"enabled": True, "epochs": 3, "lr": 3e-4, "alpha": 0.7})
    assert config.epochs == 3
    assert config.alpha == 0.7


def test_recover_config_unknown_key():
    with pytest.raises(ConfigError, match="Unknown recover options"):
        RecoverConfig.from_dict({"steps": 3, "learning_rate": 1e-3})


def test_recover_rejects_too_few_records(scenes):
    teacher = create_model("dual_encoder", pretrained=False).eval()
    preprocessor = small_preprocessor(teacher)
    with pytest.raises(DataError, match="at least 2"):
        recover(copy.deepcopy(teacher), teacher, scenes[:1], preprocessor, RecoverConfig(steps=1))
    with pytest.raises(DataError, match="No records"):
        recover(copy.deepcopy(teacher), teacher, [], preprocessor, RecoverConfig(steps=1))


DDP_SCRIPT = """
import hashlib, json, os, sys
from dataclasses import replace
import torch
torch.set_num_threads(1)
from edgemm.compression.prune import PruneConfig
from edgemm.compression.recover import RecoverConfig, prune_and_recover
from edgemm.data.records import load_dataset
from edgemm.models import create_model
from edgemm.models.registry import default_input_spec, default_vocab_path
from edgemm.runtime.preprocess import Preprocessor

dataset, out = sys.argv[1], sys.argv[2]
records = load_dataset(dataset)
torch.manual_seed(0)
teacher = create_model("concat_fusion", pretrained=False).eval()
spec = default_input_spec(teacher)
spec = replace(spec, image=replace(spec.image, resize=36, crop=32))
preprocessor = Preprocessor(spec, default_vocab_path(teacher))
arrays = preprocessor([r.text for r in records[:4]], [r.image for r in records[:4]])
inputs = {name: torch.from_numpy(array) for name, array in arrays.items()}
prune_config = PruneConfig(ratio=0.5, iterative_steps=2)
students = []
# Keep a handle on the student every rank trains, because only rank 0 gets a result back.
import edgemm.compression.recover as recovery
original_recover = recovery.recover
def recording_recover(student, *args, **kwargs):
    students.append(student)
    return original_recover(student, *args, **kwargs)
recovery.recover = recording_recover
result = prune_and_recover(teacher, prune_config, RecoverConfig(steps=3, batch_size=8), inputs, records, preprocessor)
rank = int(os.environ["RANK"])
student = students[-1]
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in student.state_dict().values())).hexdigest()
with open(os.path.join(out, f"rank{rank}.json"), "w") as handle:
    json.dump({
        "returned": result is not None,
        "steps": [r.steps for r in result.recoveries] if result else None,
        "recoveries": len(students),
        "digest": digest,
    }, handle)
"""


def test_prune_and_recover_torchrun(scenes, tmp_path):
    script = tmp_path / "ddp_recover.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT))
    dataset = scenes[0].image.parent.parent
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(script), str(dataset), str(tmp_path),
    ]
    environment = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    completed = subprocess.run(command, capture_output=True, text=True, timeout=240, env=environment)
    assert completed.returncode == 0, completed.stderr[-3000:]

    rank0 = json.loads((tmp_path / "rank0.json").read_text())
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank0["returned"] is True
    assert rank0["steps"] == [3, 3]
    assert rank1["returned"] is False
    assert rank1["recoveries"] == 2
    # DDP averages gradients, so both ranks end with the same weights.
    assert rank0["digest"] == rank1["digest"]


def test_recover_keeps_frozen_part(scenes):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)
    pruned = prune_model(teacher, PruneConfig(text_ratio=0.5), example_inputs(preprocessor, scenes)).model
    image_state = {name: value.clone() for name, value in pruned.image_tower.state_dict().items()}
    text_state = {name: value.clone() for name, value in pruned.text_tower.state_dict().items()}

    config = RecoverConfig(steps=5, lr=1e-3, batch_size=8, frozen_parts=("image_tower",), freeze_batchnorm=False)
    recover(pruned, teacher, scenes, preprocessor, config)

    for name, value in pruned.image_tower.state_dict().items():
        assert torch.equal(value, image_state[name]), name
    assert any(not torch.equal(value, text_state[name]) for name, value in pruned.text_tower.state_dict().items())


def test_recover_rejects_unknown_frozen_part(scenes):
    teacher = confident_fusion_teacher("concat_fusion")
    preprocessor = small_preprocessor(teacher)

    with pytest.raises(ConfigError, match="frozen_parts"):
        recover(copy.deepcopy(teacher), teacher, scenes, preprocessor, RecoverConfig(steps=1, frozen_parts=("vision",)))


@pytest.mark.parametrize("architecture", ("concat_fusion", "cross_attention"))
@pytest.mark.parametrize("teacher_size", (None, 40))
def test_cached_image_features_match_uncached(scenes, monkeypatch, architecture, teacher_size):
    """Features of a frozen image tower are computed once, and training must not change."""
    from edgemm.compression import recover as recovery

    teacher = confident_fusion_teacher(architecture)
    preprocessor = small_preprocessor(teacher)
    teacher_preprocessor = None
    if teacher_size is not None:
        spec = preprocessor.spec
        teacher_preprocessor = Preprocessor(replace(spec, image=replace(spec.image, resize=45, crop=teacher_size)), default_vocab_path(teacher))
    pruned = prune_model(teacher, PruneConfig(text_ratio=0.5), example_inputs(preprocessor, scenes)).model
    config = RecoverConfig(steps=6, lr=1e-3, batch_size=8, frozen_parts=("image_tower",), pairing="matrix")
    calls = []
    original = recovery._cache_frozen_image_features
    monkeypatch.setattr(recovery, "_cache_frozen_image_features", lambda *args: calls.append(original(*args)) or calls[-1])

    cached = copy.deepcopy(pruned)
    cached_result = recover(cached, teacher, scenes, preprocessor, config, teacher_preprocessor=teacher_preprocessor)
    assert calls == [True]
    # Without the in-memory item cache, every step runs both image towers again.
    monkeypatch.setattr(recovery, "CACHE_LIMIT_BYTES", 0)
    plain = copy.deepcopy(pruned)
    plain_result = recover(plain, teacher, scenes, preprocessor, config, teacher_preprocessor=teacher_preprocessor)
    assert calls == [True]

    losses = [entry["loss"] for entry in cached_result.history]
    assert losses == pytest.approx([entry["loss"] for entry in plain_result.history], rel=1e-4)
    for (name, value), other in zip(cached.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(value, other, atol=1e-5), name


def test_dual_matrix_pairing_one_caption():
    from edgemm.compression.recover import _prepare_records
    from edgemm.data.records import Record

    records = [Record(image=f"img{index % 3}.png", text=f"caption {index}", split="train") for index in range(9)]
    dual = create_model("dual_encoder", pretrained=False)

    chosen = _prepare_records(dual, records, RecoverConfig(pairing="matrix"))
    assert sorted(record.image for record in chosen) == ["img0.png", "img1.png", "img2.png"]
    assert len(_prepare_records(dual, records, RecoverConfig(pairing="pairs"))) == 9
