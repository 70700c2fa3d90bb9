"""Tests of the model package manifest: build, write, read and every rejection path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgemm.errors import PackageError
from edgemm.runtime.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    build_manifest,
    file_sha256,
    read_manifest,
    validate_manifest,
    write_manifest,
)
from edgemm.runtime.spec import InputSpec


def _make_package(folder: Path, kind: str = "fusion_classifier") -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\nhello\n", encoding="utf-8")
    if kind == "fusion_classifier":
        (folder / "model.onnx").write_bytes(b"graph bytes")
        graphs = {"model": "model.onnx"}
        return build_manifest(
            folder,
            kind=kind,
            architecture="concat_fusion",
            graphs=graphs,
            input_spec=InputSpec(),
            opset=18,
            labels=["mismatch", "match"],
        )
    (folder / "text_encoder.onnx").write_bytes(b"text graph")
    (folder / "image_encoder.onnx").write_bytes(b"image graph")
    return build_manifest(
        folder,
        kind=kind,
        architecture="dual_encoder",
        graphs={"text_encoder": "text_encoder.onnx", "image_encoder": "image_encoder.onnx"},
        input_spec=InputSpec().to_dict(),
        opset=17,
        logit_scale=20.0,
    )


def test_build_write_read_round_trip(tmp_path):
    data = _make_package(tmp_path)
    path = write_manifest(tmp_path, data)

    assert path == tmp_path / MANIFEST_NAME
    manifest = read_manifest(tmp_path)
    assert manifest.kind == "fusion_classifier"
    assert manifest.decision_threshold == 0.5
    assert manifest.is_matching
    assert manifest.input_spec == InputSpec()
    assert manifest.files["model.onnx"].sha256 == file_sha256(tmp_path / "model.onnx")
    assert manifest.files["vocab.txt"].bytes == (tmp_path / "vocab.txt").stat().st_size
    assert manifest.graph_path("model") == (tmp_path / "model.onnx").resolve()
    assert set(manifest.outputs) == {"logits"}


def test_sample_images_are_checksummed(tmp_path):
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "0.jpg").write_bytes(b"jpeg bytes")
    data = _make_package(tmp_path)
    data = build_manifest(
        tmp_path,
        kind="fusion_classifier",
        architecture="concat_fusion",
        graphs=data["graphs"],
        input_spec=data["inputs"],
        opset=18,
        labels=["mismatch", "match"],
        samples={"texts": ["a dog"], "images": ["samples/0.jpg"]},
    )
    write_manifest(tmp_path, data)

    assert read_manifest(tmp_path).samples["images"] == ["samples/0.jpg"]
    (tmp_path / "samples" / "0.jpg").write_bytes(b"JPEG bytes")
    with pytest.raises(PackageError, match="Checksum mismatch .*0.jpg"):
        read_manifest(tmp_path)


def test_dual_encoder_manifest(tmp_path):
    data = _make_package(tmp_path, kind="dual_encoder")
    manifest = validate_manifest(data, tmp_path)

    assert manifest.kind == "dual_encoder"
    assert manifest.logit_scale == 20.0
    assert manifest.decision_threshold is None
    assert set(manifest.outputs) == {"text_embeds", "image_embeds"}


def test_manifest_written_as_json_without_temp_files(tmp_path):
    write_manifest(tmp_path, _make_package(tmp_path))

    assert json.loads((tmp_path / MANIFEST_NAME).read_text())["format_version"] == FORMAT_VERSION
    assert not list(tmp_path.glob(".*.tmp"))


def test_build_rejects_missing_graph(tmp_path):
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    with pytest.raises(PackageError, match="model.onnx is missing"):
        build_manifest(
            tmp_path,
            kind="fusion_classifier",
            architecture="concat_fusion",
            graphs={"model": "model.onnx"},
            input_spec=InputSpec(),
            opset=18,
            labels=["a", "b"],
        )


def test_future_format_version_asks_to_upgrade(tmp_path):
    data = _make_package(tmp_path)
    data["format_version"] = FORMAT_VERSION + 1

    with pytest.raises(PackageError, match="Upgrade edgemm") as caught:
        validate_manifest(data, tmp_path)
    assert f"format version {FORMAT_VERSION + 1}" in str(caught.value)


# Each case edits one field of a valid manifest; the error must name that field.
INVALID_CASES = [
    ("missing kind", lambda d: d.pop("kind"), "'kind' is missing"),
    ("unknown kind", lambda d: d.update(kind="detector"), "'kind' is 'detector'"),
    ("wrong format", lambda d: d.update(format="zip"), "'format' is 'zip'"),
    ("version as text", lambda d: d.update(format_version="1"), "'format_version' must be an integer"),
    ("version zero", lambda d: d.update(format_version=0), "'format_version' is 0"),
    ("bool opset", lambda d: d.update(opset=True), "'opset' must be an integer"),
    ("old opset", lambda d: d.update(opset=3), "opset 3"),
    ("kind and architecture", lambda d: d.update(architecture="dual_encoder"), "does not fit"),
    ("precision", lambda d: d.update(precision="int4"), "'precision' is 'int4'"),
    ("missing graph", lambda d: d.update(graphs={}), "'graphs.model'"),
    ("unknown graph", lambda d: d["graphs"].update(extra="x.onnx"), "unknown entry 'extra'"),
    ("inputs", lambda d: d.update(inputs={"text": {}}), "'inputs' is not a valid input spec"),
    ("missing output", lambda d: d.update(outputs={}), "'outputs.logits'"),
    ("output shape", lambda d: d["outputs"]["logits"].update(shape="batch"), "'outputs.logits.shape' must be a list"),
    ("one label", lambda d: d.update(labels=["match"]), "at least 2 'labels'"),
    ("duplicate labels", lambda d: d.update(labels=["a", "a"]), "duplicates"),
    ("threshold range", lambda d: d.update(decision_threshold=1.5), "'decision_threshold' is 1.5"),
    ("threshold type", lambda d: d.update(decision_threshold="high"), "'decision_threshold' must be a finite number"),
    ("file not listed", lambda d: d["files"].pop("vocab.txt"), "no entry for vocab.txt"),
    ("bad digest", lambda d: d["files"]["model.onnx"].update(sha256="abc"), "64 lower-case hex digits"),
    ("negative size", lambda d: d["files"]["model.onnx"].update(bytes=-1), "'files.model.onnx.bytes' is -1"),
    ("not an object", lambda d: d.clear() or d.update(files=[]), "'format' is missing"),
    ("sample not listed", lambda d: d.update(samples={"images": ["samples/0.jpg"]}), "sample image samples/0.jpg"),
    ("sample texts type", lambda d: d.update(samples={"texts": "a dog"}), "'samples.texts' must be a list"),
]


@pytest.mark.parametrize("edit, expected", [case[1:] for case in INVALID_CASES], ids=[c[0] for c in INVALID_CASES])
def test_invalid_field_rejected(tmp_path, edit, expected):
    data = _make_package(tmp_path)
    edit(data)

    with pytest.raises(PackageError) as caught:
        validate_manifest(data, tmp_path)
    assert expected in str(caught.value)
    assert "manifest" in str(caught.value)


def test_manifest_must_be_object(tmp_path):
    with pytest.raises(PackageError, match="the manifest must be an object"):
        validate_manifest([1, 2], tmp_path)


def test_path_escaping_package_rejected(tmp_path):
    package = tmp_path / "pkg"
    data = _make_package(package)
    (tmp_path / "outside.txt").write_text("secret")
    data["files"]["../outside.txt"] = {"sha256": file_sha256(tmp_path / "outside.txt"), "bytes": 6}

    with pytest.raises(PackageError, match="outside"):
        validate_manifest(data, package)


def test_missing_package_file(tmp_path):
    write_manifest(tmp_path, _make_package(tmp_path))
    (tmp_path / "vocab.txt").unlink()

    with pytest.raises(PackageError, match="vocab.txt is listed in the manifest but missing"):
        read_manifest(tmp_path)


def test_checksum_mismatch(tmp_path):
    write_manifest(tmp_path, _make_package(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"graph BYTES")  # same size, other content

    with pytest.raises(PackageError, match="Checksum mismatch for package file .*model.onnx"):
        read_manifest(tmp_path)
    read_manifest(tmp_path, verify_checksums=False)


def test_size_mismatch(tmp_path):
    write_manifest(tmp_path, _make_package(tmp_path))
    (tmp_path / "model.onnx").write_bytes(b"graph")

    with pytest.raises(PackageError, match="has 5 bytes, but the manifest records 11"):
        read_manifest(tmp_path)


def test_read_rejects_missing_and_broken_manifest(tmp_path):
    with pytest.raises(PackageError, match="not found or not a folder"):
        read_manifest(tmp_path / "absent")
    with pytest.raises(PackageError, match="is not a model package"):
        read_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(PackageError, match="is not valid JSON"):
        read_manifest(tmp_path)
