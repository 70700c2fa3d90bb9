"""Model packages written by `export_checkpoint` and `write_package`, and their round trip."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

import edgemm.runtime
from edgemm.cli.main import app
from edgemm.compression.package import Sample, export_checkpoint, write_package
from edgemm.data.matching import make_matching_pairs
from edgemm.data.records import load_dataset
from edgemm.data.synthetic import generate_scenes
from edgemm.errors import DataError, EdgemmError, PackageError
from edgemm.models.checkpoint import load_checkpoint
from edgemm.models.testing import make_tiny_checkpoint
from edgemm.runtime.manifest import read_manifest
from edgemm.runtime.preprocess import Preprocessor


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def graph_dims(path: Path) -> dict[str, list]:
    proto = onnx.load(str(path))
    values = list(proto.graph.input) + list(proto.graph.output)
    return {value.name: [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim] for value in values}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("package")


@pytest.fixture(scope="module")
def scenes(workspace) -> Path:
    folder = workspace / "scenes"
    generate_scenes(folder, 12, seed=3, image_size=72, splits=(("train", 0.5), ("dev", 0.5)))
    return folder


@pytest.fixture(scope="module")
def concat_export(workspace, scenes):
    checkpoint = make_tiny_checkpoint(workspace / "concat-checkpoint", "concat_fusion")
    before = folder_hashes(checkpoint)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = export_checkpoint(checkpoint, workspace / "concat-package", dataset=scenes)
    return checkpoint, package, before


@pytest.fixture(scope="module")
def dual_export(workspace):
    checkpoint = make_tiny_checkpoint(workspace / "dual-checkpoint", "dual_encoder", seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = export_checkpoint(checkpoint, workspace / "dual-package")
    return checkpoint, package


def dev_pairs(scenes: Path):
    return make_matching_pairs(load_dataset(scenes, split="dev"), seed=0)


@pytest.mark.parametrize("fixture", ["concat_export", "dual_export"])
def test_package_files_match_checksums(request, fixture):
    package = request.getfixturevalue(fixture)[1]
    manifest = json.loads((package / "manifest.json").read_text())

    on_disk = {name for name in folder_hashes(package) if name != "manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, entry in manifest["files"].items():
        data = (package / name).read_bytes()
        assert entry["sha256"] == hashlib.sha256(data).hexdigest(), name
        assert entry["bytes"] == len(data), name
    assert read_manifest(package).precision == "fp32"


def test_dual_encoder_writes_three_graphs(dual_export):
    _, package = dual_export
    manifest = read_manifest(package)

    assert manifest.graphs == {
        "model": "model.onnx",
        "text_encoder": "text_encoder.onnx",
        "image_encoder": "image_encoder.onnx",
    }
    text = graph_dims(package / "text_encoder.onnx")
    assert text["input_ids"] == ["batch", "sequence"]
    assert text["attention_mask"] == ["batch", "sequence"]
    assert text["text_embeds"][0] == "batch"
    image = graph_dims(package / "image_encoder.onnx")
    assert image["pixel_values"][0] == "batch"
    assert image["image_embeds"][0] == "batch"
    whole = graph_dims(package / "model.onnx")
    assert whole["text_embeds"][0] == "batch"
    assert whole["image_embeds"][0] == "batch"
    exports = manifest.compression["export"]
    assert sorted(exports) == ["image_encoder", "model", "text_encoder"]
    assert all(entry["exporter"] == "dynamo" for entry in exports.values())
    assert manifest.logit_scale is not None and manifest.logit_scale > 0


def test_concat_parity_within_limits(concat_export):
    _, package, _ = concat_export
    parity = read_manifest(package).validation["parity"]

    assert parity["passed"]
    assert parity["max_abs_logit_diff"] <= 1e-4
    assert parity["decision_agreement"] == 1.0
    assert "split 'dev'" in parity["inputs"]
    assert parity["num_samples"] == 12
    assert parity["random"]["passed"]


def test_dual_parity_within_limits(dual_export):
    _, package = dual_export
    parity = read_manifest(package).validation["parity"]

    assert parity["passed"]
    assert parity["min_embedding_cosine"] >= 0.9999
    assert parity["decision_agreement"] == 1.0
    assert "synthetic scenes" in parity["inputs"]


def test_concat_round_trip_same_decisions(concat_export, scenes):
    checkpoint_dir, package, _ = concat_export
    checkpoint = load_checkpoint(checkpoint_dir)
    pairs = dev_pairs(scenes)
    texts = [pair.text for pair in pairs]
    images = [str(pair.image) for pair in pairs]

    prediction = edgemm.runtime.load(package).predict(texts, images)

    feed = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)(texts, images)
    with torch.no_grad():
        logits = checkpoint.model(*(torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "pixel_values")))
    torch_match = torch.softmax(logits, dim=1)[:, 1].numpy() >= 0.5
    assert len(pairs) == 12
    assert {pair.label for pair in pairs} == {0, 1}
    assert prediction.labels == ["match" if match else "mismatch" for match in torch_match]
    assert np.abs(prediction.logits - logits.numpy()).max() < 1e-4


def test_dual_round_trip_same_ranking(dual_export):
    checkpoint_dir, package = dual_export
    checkpoint = load_checkpoint(checkpoint_dir)
    runtime_model = edgemm.runtime.load(package)
    samples = runtime_model.manifest.samples
    images = [str(package / name) for name in samples["images"]]

    text_embeds = runtime_model.encode_text(samples["texts"])
    image_embeds = runtime_model.encode_image(images)

    feed = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)(samples["texts"], images)
    with torch.no_grad():
        torch_text = checkpoint.model.encode_text(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"]))
        torch_image = checkpoint.model.encode_image(torch.from_numpy(feed["pixel_values"]))
    assert np.abs(text_embeds - torch_text.numpy()).max() < 1e-4
    assert np.abs(image_embeds - torch_image.numpy()).max() < 1e-4
    ranking = (text_embeds @ image_embeds.T).argmax(axis=1)
    assert list(ranking) == list((torch_text @ torch_image.T).argmax(dim=1).numpy())


def test_samples_come_from_validation_set(concat_export, scenes):
    _, package, _ = concat_export
    samples = read_manifest(package).samples
    dev_texts = {record.text for record in load_dataset(scenes, split="dev")}

    assert len(samples["images"]) == 3
    assert len(samples["texts"]) == 3
    assert set(samples["texts"]) <= dev_texts
    for name in samples["images"]:
        assert (package / name).is_file()


def test_export_leaves_checkpoint_unchanged(concat_export):
    checkpoint, _, before = concat_export

    assert folder_hashes(checkpoint) == before


def test_second_export_without_overwrite_fails(concat_export):
    checkpoint, package, _ = concat_export
    before = folder_hashes(package)

    with pytest.raises(EdgemmError, match="already exists"):
        export_checkpoint(checkpoint, package)

    assert folder_hashes(package) == before


def test_cli_existing_out_is_one_error(concat_export):
    checkpoint, package, _ = concat_export
    before = folder_hashes(package)

    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(package)])

    assert result.exit_code == 2
    assert "error:" in result.output
    assert "--overwrite" in result.output
    assert "Traceback" not in result.output
    assert folder_hashes(package) == before


@pytest.mark.parametrize("opset", ["7", "99"])
def test_cli_unsupported_opset_is_one_error(concat_export, workspace, opset):
    checkpoint, _, _ = concat_export
    out = workspace / f"opset-{opset}"

    result = CliRunner().invoke(app, ["export", str(checkpoint), "--out", str(out), "--opset", opset])

    assert result.exit_code == 2
    assert f"Unsupported ONNX opset {opset}" in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_failed_write_leaves_no_folder(concat_export, workspace):
    _, package, _ = concat_export
    out = workspace / "broken-package"

    # Duplicate labels pass the early file checks and fail in the manifest validation, after
    # the graphs were copied into the staging folder.
    with pytest.raises(PackageError, match="duplicates"):
        write_package(
            out,
            graphs={"model": package / "model.onnx"},
            architecture="concat_fusion",
            input_spec=read_manifest(package).input_spec,
            vocab_path=package / "vocab.txt",
            labels=["match", "match"],
            opset=18,
            samples=[Sample(image=package / "samples" / "0.png", text="a red circle")],
        )

    assert not out.exists()
    assert not [path.name for path in workspace.iterdir() if path.name.startswith(".broken-package")]


def test_dataset_without_validation_split_fails_early(concat_export, workspace):
    checkpoint, _, _ = concat_export
    train_only = workspace / "train-only"
    generate_scenes(train_only, 4, seed=5, image_size=72, splits=(("train", 1.0),))
    out = workspace / "never-written"

    with pytest.raises(DataError, match="no validation split"):
        export_checkpoint(checkpoint, out, dataset=train_only)

    assert not out.exists()
