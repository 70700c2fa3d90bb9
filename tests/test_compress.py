"""End-to-end tests of `edgemm compress` on tiny models and generated scenes.

Every stage is real: torch-pruning, distillation, ONNX export, ONNX Runtime quantization and
validation through edgemm.runtime. The TorchScript exporter keeps the runs short; the dynamo
exporter has its own tests in test_export.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgemm.cli.main import app
from edgemm.compression.pipeline import CompressSettings, compress
from edgemm.compression.recipe import load_recipe
from edgemm.data.synthetic import generate_scenes
from edgemm.errors import AccuracyError, ConfigError, DataError
from edgemm.models.testing import make_tiny_checkpoint

ARCHITECTURES = ("concat_fusion", "cross_attention", "dual_encoder")
MODES = ("int8-static", "int8-dynamic", "fp16")

# Settings that keep one compress run to a few seconds on tiny models. The accuracy limits are
# wide because untrained tiny models score near chance; test_accuracy_drop_fails checks the limit.
FAST = {
    "recover.steps": 2,
    "recover.batch_size": 8,
    "export.exporter": "torchscript",
    "validate.max_accuracy_drop": 100.0,
    "validate.max_auc_drop": 1.0,
    "validate.max_recall_drop": 100.0,
    "validate.max_pairs": 32,
}


# The recipe these tests start from: every tower pruned, so each test exercises the whole
# pruning path on tiny models (the built-in default prunes only the text tower).
BASE_RECIPE = """
[prune]
ratio = 0.5
round_to = 16
[recover]
epochs = 1
pairing = "pairs"
[quantize]
mode = "int8-dynamic"
[validate]
split = "dev"
"""


@pytest.fixture(scope="module")
def base_recipe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipes") / "base.toml"
    path.write_text(BASE_RECIPE)
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes") / "data"
    generate_scenes(folder, 40, seed=0, image_size=72)
    return folder


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {arch: make_tiny_checkpoint(root / arch, arch) for arch in ARCHITECTURES}


def run(base_recipe: Path, checkpoint: Path, out: Path, dataset: Path, **overrides):
    recipe = load_recipe(base_recipe, {**FAST, **overrides})
    settings = CompressSettings(checkpoint=checkpoint, out=out, recipe=recipe, dataset=dataset, latency_runs=3)
    return compress(settings)


def calibration_toml(folder: Path, dataset: Path) -> Path:
    path = folder / "calibration.toml"
    path.write_text(f'[calibration]\nsource = "dataset"\npath = "{dataset}"\nsplit = "train"\nsize = 8\nbatch_size = 4\n')
    return path


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("ratio", (0.3, 0.5))
def test_compress_every_mode(architecture, ratio, base_recipe, scenes, checkpoints, tmp_path):
    for mode in MODES:
        out = tmp_path / f"pkg-{mode}"
        recipe = load_recipe(base_recipe, {**FAST, "prune.ratio": ratio, "quantize.mode": mode})
        settings = CompressSettings(
            checkpoint=checkpoints[architecture],
            out=out,
            recipe=recipe,
            dataset=scenes,
            calibration=calibration_toml(tmp_path, scenes) if mode == "int8-static" else None,
            latency_runs=3,
        )
        result = compress(settings)

        manifest = json.loads((out / "manifest.json").read_text())
        compression = manifest["compression"]
        assert result.package == out
        assert compression["prune"]["enabled"] is True
        assert compression["prune"]["config"]["ratio"] == ratio
        total = compression["size"]["total"]
        assert total["params_after"] < total["params_before"], mode
        assert total["macs_after"] < total["macs_before"], mode
        assert compression["quantization"]["mode"] == mode
        assert manifest["validation"]["passed"] is True
        if mode == "int8-static":
            assert compression["calibration"]["size"] == 8
        graphs = {"model.onnx"} | ({"text_encoder.onnx", "image_encoder.onnx"} if architecture == "dual_encoder" else set())
        assert graphs <= set(manifest["files"])


def test_manifest_records_what_was_done(base_recipe, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    run(base_recipe, checkpoints["concat_fusion"], out, scenes, **{"prune.ratio": 0.5, "quantize.mode": "int8-dynamic"})

    manifest = json.loads((out / "manifest.json").read_text())
    compression = manifest["compression"]
    validation = manifest["validation"]
    assert compression["recipe"]["prune"]["ratio"] == 0.5
    parts = compression["prune"]["parts"]
    for part in ("text_tower", "image_tower", "total"):
        assert parts[part]["params_after"] < parts[part]["params_before"], part
        assert parts[part]["macs_after"] < parts[part]["macs_before"], part
    assert compression["recover"]["enabled"] is True
    assert compression["quantization"]["op_types"] == ["MatMul"]
    assert compression["export"]["opset"] == manifest["opset"] == 18
    assert set(validation["before"]) == {"accuracy", "roc_auc"}
    assert set(validation["after"]) == {"accuracy", "roc_auc"}
    assert 0.0 <= validation["parity"]["decision_agreement"] <= 1.0
    assert validation["latency"]["p50_ms_before"] > 0
    assert 0 < validation["num_samples"] <= 32


def test_no_prune_keeps_widths(base_recipe, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    run(base_recipe, checkpoints["concat_fusion"], out, scenes, **{"prune.enabled": False, "quantize.mode": "int8-dynamic"})

    compression = json.loads((out / "manifest.json").read_text())["compression"]
    assert compression["prune"] == {"enabled": False}
    total = compression["size"]["total"]
    assert total["params_after"] == total["params_before"]


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny dual encoder trained on generated scenes, so that pruning costs recall.

    A dual encoder because it learns the scenes reliably with tiny random towers on cached
    features, which the concat head does not.
    """
    from edgemm.training.train import TrainConfig, train

    root = tmp_path_factory.mktemp("trained")
    data = root / "data"
    generate_scenes(data, 120, seed=1, image_size=72)
    config = TrainConfig(architecture="dual_encoder", text_tower="tiny", image_tower="tiny", epochs=15, batch_size=32, lr=3e-3)
    train(config, data, root / "ckpt")
    return root / "ckpt", data


def test_accuracy_drop_fails_and_writes_nothing(trained_checkpoint, base_recipe, tmp_path):
    checkpoint, data = trained_checkpoint
    out = tmp_path / "pkg"
    overrides = {
        **FAST,
        "prune.ratio": 0.75,
        "prune.round_to": 8,
        "recover.enabled": False,
        "quantize.mode": "int8-dynamic",
        "validate.max_recall_drop": 0.0,
    }
    with pytest.raises(AccuracyError) as caught:
        compress(CompressSettings(checkpoint=checkpoint, out=out, recipe=load_recipe(base_recipe, overrides), dataset=data, latency_runs=3))

    assert "fell by" in str(caught.value)
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_cli_accuracy_drop_exit_code(trained_checkpoint, tmp_path):
    checkpoint, data = trained_checkpoint
    recipe = tmp_path / "strict.toml"
    recipe.write_text(
        '[export]\nexporter = "torchscript"\n[prune]\nround_to = 8\n[recover]\nenabled = false\n'
    )
    out = tmp_path / "pkg"
    result = CliRunner().invoke(
        app,
        ["compress", str(checkpoint), "--recipe", str(recipe), "--dataset", str(data), "--prune-ratio", "0.75",
         "--max-recall-drop", "0", "--quantize", "int8-dynamic", "--out", str(out)],
    )

    assert result.exit_code == 3, result.output
    assert "error:" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


@pytest.mark.parametrize("ratio", ("0", "1", "1.5", "-0.2"))
def test_cli_rejects_prune_ratio(ratio, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    result = CliRunner().invoke(
        app, ["compress", str(checkpoints["concat_fusion"]), "--dataset", str(scenes), "--prune-ratio", ratio, "--out", str(out)]
    )

    assert result.exit_code != 0
    assert f"prune.ratio={float(ratio)}" in result.output
    assert "between 0 and 1" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_cli_rejects_unknown_recipe_key(scenes, checkpoints, tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[prune]\nratoi = 0.5\n")
    out = tmp_path / "pkg"
    result = CliRunner().invoke(
        app, ["compress", str(checkpoints["concat_fusion"]), "--recipe", str(recipe), "--dataset", str(scenes), "--out", str(out)]
    )

    assert result.exit_code != 0
    assert "prune.ratoi" in result.output
    assert "Valid keys in [prune]" in " ".join(result.output.split())
    assert not out.exists()


def test_recipe_rejects_unknown_section(tmp_path):
    recipe = tmp_path / "typo.toml"
    recipe.write_text("[quantise]\nmode = 'fp16'\n")
    with pytest.raises(ConfigError, match=r"Unknown recipe section \[quantise\]"):
        load_recipe(recipe)


def test_calibration_without_usable_samples(base_recipe, scenes, checkpoints, tmp_path):
    broken = tmp_path / "broken"
    (broken / "images").mkdir(parents=True)
    lines = []
    for index in range(4):
        (broken / "images" / f"{index}.png").write_bytes(b"not an image")
        lines.append(json.dumps({"image": f"images/{index}.png", "text": "a red circle", "split": "train"}))
    (broken / "records.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "pkg"

    with pytest.raises(DataError, match="No usable calibration samples"):
        compress(
            CompressSettings(
                checkpoint=checkpoints["concat_fusion"],
                out=out,
                recipe=load_recipe(base_recipe, {**FAST, "quantize.mode": "int8-static"}),
                dataset=scenes,
                calibration=calibration_toml(tmp_path, broken),
            )
        )
    assert not out.exists()


def test_unsupported_opset_fails_early(scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    result = CliRunner().invoke(
        app, ["compress", str(checkpoints["concat_fusion"]), "--dataset", str(scenes), "--opset", "7", "--out", str(out)]
    )

    assert result.exit_code != 0
    assert "opset" in result.output.lower()
    assert "7" in result.output
    assert not out.exists()


def test_existing_output_is_kept(base_recipe, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    with pytest.raises(Exception, match="already exists"):
        run(base_recipe, checkpoints["concat_fusion"], out, scenes, **{"prune.ratio": 0.3})
    assert (out / "keep.txt").read_text() == "mine"


def test_checkpoint_is_not_modified(base_recipe, scenes, checkpoints, tmp_path):
    checkpoint = checkpoints["cross_attention"]
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    run(base_recipe, checkpoint, tmp_path / "pkg", scenes, **{"prune.ratio": 0.3, "quantize.mode": "int8-dynamic"})
    after = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    assert before == after


def test_default_recipe_prunes_text_inner_widths(scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    recipe = load_recipe(None, {**FAST, "prune.round_to": 8})
    compress(CompressSettings(checkpoint=checkpoints["concat_fusion"], out=out, recipe=recipe, dataset=scenes, latency_runs=3))

    compression = json.loads((out / "manifest.json").read_text())["compression"]
    parts = compression["prune"]["parts"]
    assert parts["text_tower"]["params_after"] < parts["text_tower"]["params_before"]
    assert parts["image_tower"]["params_after"] == parts["image_tower"]["params_before"]
    assert compression["recover"]["config"]["frozen_parts"] == ["image_tower"]
    assert sorted(compression["quantization"]["op_types"]) == ["Gather", "MatMul"]
    ignored = compression["prune"]["config"]["ignored_layers"]
    assert "text_tower.embeddings.word_embeddings" in ignored
    assert all(not name.endswith("intermediate.dense") for name in ignored)


def test_keep_work_saves_pruned_checkpoint(base_recipe, scenes, checkpoints, tmp_path):
    from edgemm.compression.profile import count_params
    from edgemm.models.checkpoint import load_checkpoint

    work = tmp_path / "work"
    recipe = load_recipe(base_recipe, {**FAST, "prune.ratio": 0.5})
    compress(
        CompressSettings(
            checkpoint=checkpoints["cross_attention"], out=tmp_path / "pkg", recipe=recipe, dataset=scenes, keep_work=work, latency_runs=3
        )
    )

    pruned = load_checkpoint(work / "pruned-checkpoint")
    original = load_checkpoint(checkpoints["cross_attention"])
    manifest = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert count_params(pruned.model) < count_params(original.model)
    assert count_params(pruned.model) == manifest["compression"]["size"]["total"]["params_after"]
    assert pruned.extra["compression"]["prune"]["enabled"] is True
    assert (work / "student" / "model.onnx").is_file()


def test_image_size_served_and_recorded(base_recipe, scenes, checkpoints, tmp_path):
    from edgemm.runtime import load

    out = tmp_path / "pkg"
    overrides = {"prune.enabled": False, "input.image_size": 48, "recover.pairing": "matrix"}
    run(base_recipe, checkpoints["concat_fusion"], out, scenes, **overrides)

    manifest = json.loads((out / "manifest.json").read_text())
    compression = manifest["compression"]
    assert manifest["inputs"]["image"]["crop"] == 48
    assert manifest["inputs"]["image"]["resize"] == 54  # 48 * 72 / 64: the same share of each photo
    assert compression["input"] == {"image_size_before": 64, "image_size_after": 48, "resize_before": 72, "resize_after": 54}
    assert compression["recover"]["enabled"] is True
    assert compression["recover"]["config"]["frozen_parts"] == ["text_tower", "image_tower"]
    total = compression["size"]["total"]
    assert total["params_after"] == total["params_before"]
    assert total["macs_after"] < total["macs_before"]

    model = load(out)
    image = next((scenes / "images").glob("*.png"))
    result = model.predict(["a red circle"], [image])
    assert result.scores.shape == (1, 2)

    inspected = CliRunner().invoke(app, ["inspect", str(out)])
    assert inspected.exit_code == 0, inspected.output
    lines = inspected.output.splitlines()
    assert any("image size after" in line and "48" in line for line in lines)
    assert any("quantization per tower" in line and "int8-dynamic" in line for line in lines)


def test_image_size_with_pruning(base_recipe, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    run(base_recipe, checkpoints["dual_encoder"], out, scenes, **{"prune.ratio": 0.3, "input.image_size": 40})

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["image"]["crop"] == 40
    assert manifest["compression"]["input"]["image_size_after"] == 40
    assert manifest["validation"]["passed"] is True


def test_image_size_above_model_kept(base_recipe, scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    run(base_recipe, checkpoints["concat_fusion"], out, scenes, **{"prune.enabled": False, "input.image_size": 192})

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["image"]["crop"] == 64
    assert "input" not in manifest["compression"]


def test_image_size_below_minimum():
    with pytest.raises(ConfigError, match="Invalid image size 16"):
        load_recipe(None, {"input.image_size": 16})


def test_recipe_quantization_types():
    recipe = load_recipe(None, {"quantize.activation_type": "uint8", "quantize.weight_type": "int8"})
    assert recipe.get("quantize", "activation_type") == "uint8"
    with pytest.raises(ConfigError, match="quantize.activation_type='int4'"):
        load_recipe(None, {"quantize.activation_type": "int4"})


def test_cli_image_size_option(scenes, checkpoints, tmp_path):
    out = tmp_path / "pkg"
    args = ["compress", str(checkpoints["concat_fusion"]), "--dataset", str(scenes), "--no-prune", "--quantize", "none"]
    result = CliRunner().invoke(app, [*args, "--image-size", "48", "--max-accuracy-drop", "100", "--out", str(out)])

    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"]["image"]["crop"] == 48
    # --no-prune skips recovery as well, even when the image size changes.
    assert manifest["compression"]["recover"] == {"enabled": False}

    too_small = CliRunner().invoke(app, [*args, "--image-size", "16", "--out", str(tmp_path / "other")])
    assert too_small.exit_code != 0
    assert "Invalid image size 16 (--image-size" in too_small.output
    assert "Traceback" not in too_small.output
    assert not (tmp_path / "other").exists()


def test_recovery_cache_reuse(base_recipe, scenes, checkpoints, tmp_path):
    cache = tmp_path / "recovered"
    settings = {"prune.ratio": 0.3, "recover.steps": 3}

    def originals() -> list[Path]:
        return sorted(path for path in cache.iterdir() if path.name.startswith("original-"))

    def recovered_models() -> list[Path]:
        return sorted(path for path in cache.iterdir() if not path.name.startswith("original-"))

    first = run_cached(base_recipe, checkpoints["concat_fusion"], tmp_path / "a", scenes, cache, **settings, **{"quantize.mode": "int8-dynamic"})
    assert len(originals()) == 1
    assert len(recovered_models()) == 1
    assert "reused_from" not in first.manifest["compression"]["recover"]

    # Another quantization mode needs no new recovery, export of the original or reference run.
    stages = []
    recipe = load_recipe(base_recipe, {**FAST, **settings, "quantize.mode": "fp16"})
    second = compress(
        CompressSettings(checkpoint=checkpoints["concat_fusion"], out=tmp_path / "b", recipe=recipe, dataset=scenes, latency_runs=3, recovery_cache=cache),
        on_stage=stages.append,
    )
    assert second.manifest["compression"]["recover"]["reused_from"] == str(recovered_models()[0])
    assert second.manifest["compression"]["size"] == first.manifest["compression"]["size"]
    assert second.validation["before"] == first.validation["before"]
    assert not any(stage.startswith(("measure the original", "export the original", "prune")) for stage in stages), stages

    # Another prune ratio needs a new recovery, but not a new export of the original.
    run_cached(base_recipe, checkpoints["concat_fusion"], tmp_path / "c", scenes, cache, **{**settings, "prune.ratio": 0.5})
    assert len(originals()) == 1
    assert len(recovered_models()) == 2
    # Another opset needs a new export of the original.
    run_cached(base_recipe, checkpoints["concat_fusion"], tmp_path / "d", scenes, cache, **{**settings, "export.opset": 17})
    assert len(originals()) == 2


def run_cached(base_recipe: Path, checkpoint: Path, out: Path, dataset: Path, cache: Path, **overrides):
    recipe = load_recipe(base_recipe, {**FAST, **overrides})
    return compress(CompressSettings(checkpoint=checkpoint, out=out, recipe=recipe, dataset=dataset, latency_runs=3, recovery_cache=cache))



def fallback_settings(trained_checkpoint, base_recipe, tmp_path, max_drop: float) -> CompressSettings:
    """Static per-tensor INT8 of the tiny trained dual encoder, with the accuracy fallback on."""
    checkpoint, data = trained_checkpoint
    overrides = {
        **FAST,
        "prune.enabled": False,
        "quantize.mode": "int8-static",
        "quantize.per_channel": False,
        "quantize.accuracy_fallback": True,
        "validate.max_recall_drop": max_drop,
        "validate.max_pairs": 64,
    }
    return CompressSettings(
        checkpoint=checkpoint, out=tmp_path / "pkg", recipe=load_recipe(base_recipe, overrides), dataset=data,
        calibration=calibration_toml(tmp_path, data), latency_runs=3,
    )


def test_accuracy_fallback_keeps_nodes_float(trained_checkpoint, base_recipe, tmp_path):
    # 64 pairs of 24 images: one image ranked out of the top 5 costs 4.17 points of recall@5.
    settings = fallback_settings(trained_checkpoint, base_recipe, tmp_path, max_drop=4.5)
    compress(settings)

    manifest = json.loads((settings.out / "manifest.json").read_text())
    quantization = manifest["compression"]["quantization"]
    record = quantization["accuracy_fallback"]
    assert record["metric"] == "text_to_image_recall@5"
    assert record["baseline"] == pytest.approx(manifest["validation"]["before"]["text_to_image_recall@5"])
    assert record["nodes_kept_float"], "the per-tensor image encoder should need nodes kept in float"
    for graph in ("text_encoder", "image_encoder"):
        attempts = quantization["graphs"][graph]["fallback"]["attempts"]
        assert attempts[-1]["drop"] <= 4.5
        assert set(attempts[-1]["nodes_kept_float"]) <= set(record["nodes_kept_float"])
    assert len(quantization["graphs"]["image_encoder"]["fallback"]["attempts"]) > 1
    # The runtime does not run a dual encoder's model.onnx, so it gets no fallback.
    assert quantization["graphs"]["model"]["fallback"] is None
    assert set(record["nodes_kept_float"]) <= set(quantization["graphs"]["image_encoder"]["nodes_excluded"]) | set(
        quantization["graphs"]["text_encoder"]["nodes_excluded"]
    )


def test_accuracy_fallback_unreachable_limit(trained_checkpoint, base_recipe, tmp_path):
    settings = fallback_settings(trained_checkpoint, base_recipe, tmp_path, max_drop=0.0)
    with pytest.raises(AccuracyError, match="kept in float"):
        compress(settings)
    assert not settings.out.exists()
