"""Tests of `edgemm.runtime.load` and the `edgemm run` / `edgemm inspect` commands.

The packages are real: tiny torch models that follow the package's ONNX input and output
names are exported with `torch.onnx.export`, then packaged with `build_manifest`.
`build_fusion_package` and `build_dual_package` are also used by test_runtime_no_torch.py.
"""

from __future__ import annotations

import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemm.errors import ConfigError, InputError, PackageError
from edgemm.runtime.manifest import MANIFEST_NAME, build_manifest, write_manifest
from edgemm.runtime.spec import ImageSpec, InputSpec, TextSpec

torch = pytest.importorskip("torch", reason="building test packages needs torch (the host extra)")
nn = torch.nn

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:Constant folding:UserWarning"),
]

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog", "cat", "runs", "on", "the", "beach", "red", "ball", "##s", ".", "word"]
SPEC = InputSpec(text=TextSpec(max_length=16), image=ImageSpec(resize=40, crop=32))
OPSET = 17


class TinyFusion(nn.Module):
    """Masked-mean word embeddings and a strided convolution, concatenated into a linear head."""

    def __init__(self, num_labels: int = 2):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
        self.head = nn.Linear(16, num_labels)

    def forward(self, input_ids, attention_mask, pixel_values):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        text = (self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        image = self.conv(pixel_values).mean(dim=(2, 3))
        return self.head(torch.cat([text, image], dim=1))


class TinyTextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(len(VOCAB), 8)
        self.proj = nn.Linear(8, 6)

    def forward(self, input_ids, attention_mask):
        mask = attention_mask.unsqueeze(-1).to(torch.float32)
        pooled = (self.embed(input_ids) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return nn.functional.normalize(self.proj(pooled), dim=-1)


class TinyImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, kernel_size=3, stride=2)
        self.proj = nn.Linear(8, 6)

    def forward(self, pixel_values):
        return nn.functional.normalize(self.proj(self.conv(pixel_values).mean(dim=(2, 3))), dim=-1)


def _export(module: nn.Module, path: Path, inputs: dict, outputs: list[str], dynamic: bool = True) -> None:
    axes = None
    if dynamic:
        axes = {name: {0: "batch", 1: "sequence"} for name in ("input_ids", "attention_mask") if name in inputs}
        if "pixel_values" in inputs:
            axes["pixel_values"] = {0: "batch"}
        axes.update({name: {0: "batch"} for name in outputs})
    module.eval()
    torch.onnx.export(
        module,
        tuple(inputs.values()),
        str(path),
        input_names=list(inputs),
        output_names=outputs,
        dynamic_axes=axes,
        opset_version=OPSET,
        dynamo=False,
    )


def _example_inputs(batch: int = 2) -> dict:
    return {
        "input_ids": torch.randint(5, len(VOCAB), (batch, SPEC.text.max_length)),
        "attention_mask": torch.ones(batch, SPEC.text.max_length, dtype=torch.int64),
        "pixel_values": torch.randn(batch, 3, SPEC.image.crop, SPEC.image.crop),
    }


def _write_vocab(folder: Path) -> None:
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")


def build_fusion_package(folder: Path, dynamic: bool = True, seed: int = 0) -> tuple[Path, nn.Module]:
    """Export a tiny fusion classifier and package it in `folder`; return the folder and the module."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    model = TinyFusion()
    _export(model, folder / "model.onnx", _example_inputs(), ["logits"], dynamic=dynamic)
    _write_vocab(folder)
    (folder / "samples").mkdir()
    rng = np.random.default_rng(seed)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8)).save(folder / "samples" / f"{index}.png")
    data = build_manifest(
        folder,
        kind="fusion_classifier",
        architecture="concat_fusion",
        graphs={"model": "model.onnx"},
        input_spec=SPEC,
        opset=OPSET,
        labels=["mismatch", "match"],
        compression={
            "prune": {"ratio": 0.5, "params_before": 1000, "params_after": 500, "macs_before": 9000, "macs_after": 4000},
            "quantization": {"scheme": "int8-static", "per_channel": True},
            "calibration": {"method": "minmax", "size": 64},
        },
        validation={"parity": {"max_abs_diff": 0.001}, "accuracy": {"before": 0.81, "after": 0.80}},
        samples={"texts": ["a dog runs on the beach", "the red ball"], "images": ["samples/0.png", "samples/1.png"]},
    )
    write_manifest(folder, data)
    return folder, model


def build_dual_package(folder: Path, seed: int = 0) -> tuple[Path, nn.Module, nn.Module]:
    """Export tiny text and image encoders and package them as a dual encoder in `folder`."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True)
    text_encoder, image_encoder = TinyTextEncoder(), TinyImageEncoder()
    example = _example_inputs()
    _export(text_encoder, folder / "text_encoder.onnx", {k: example[k] for k in ("input_ids", "attention_mask")}, ["text_embeds"])
    _export(image_encoder, folder / "image_encoder.onnx", {"pixel_values": example["pixel_values"]}, ["image_embeds"])
    _write_vocab(folder)
    data = build_manifest(
        folder,
        kind="dual_encoder",
        architecture="dual_encoder",
        graphs={"text_encoder": "text_encoder.onnx", "image_encoder": "image_encoder.onnx"},
        input_spec=SPEC,
        opset=OPSET,
        logit_scale=14.3,
    )
    write_manifest(folder, data)
    return folder, text_encoder, image_encoder


@pytest.fixture(scope="module")
def fusion(tmp_path_factory):
    return build_fusion_package(tmp_path_factory.mktemp("fusion") / "pkg")


@pytest.fixture(scope="module")
def dual(tmp_path_factory):
    return build_dual_package(tmp_path_factory.mktemp("dual") / "pkg")


@pytest.fixture(scope="module")
def fusion_model(fusion):
    import edgemm.runtime

    return edgemm.runtime.load(fusion[0], threads=1)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(3)
    paths = []
    for index, size in enumerate([(60, 45), (45, 80), (50, 50), (120, 40), (33, 33)]):
        path = folder / f"photo{index}.png"
        Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


TEXTS = ["a dog runs on the beach", "the red ball", "a cat", "dogs . cats", "the beach"]


def _torch_logits(module: nn.Module, model, texts, images) -> np.ndarray:
    feed = model.preprocessor.texts(texts)
    feed.update(model.preprocessor.images(images))
    with torch.no_grad():
        logits = module(*(torch.from_numpy(feed[name]) for name in ("input_ids", "attention_mask", "pixel_values")))
    return logits.numpy()


# Loading and predicting


def test_load_fusion_package(fusion_model):
    assert fusion_model.kind == "fusion_classifier"
    assert fusion_model.labels == ["mismatch", "match"]
    assert fusion_model.manifest.precision == "fp32"


def test_predict_matches_torch(fusion, fusion_model, photos):
    prediction = fusion_model.predict(TEXTS, photos)

    np.testing.assert_allclose(prediction.logits, _torch_logits(fusion[1], fusion_model, TEXTS, photos), atol=1e-5)
    assert prediction.scores.shape == (5, 2)
    np.testing.assert_allclose(prediction.scores.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(prediction.match_score, prediction.scores[:, 1])
    assert prediction.threshold == 0.5
    assert prediction.labels == ["match" if score >= 0.5 else "mismatch" for score in prediction.match_score]


def test_predict_single_pair(fusion_model, photos):
    single = fusion_model.predict(TEXTS[0], photos[0])
    batch = fusion_model.predict(TEXTS, photos)

    assert single.scores.shape == (1, 2)
    np.testing.assert_allclose(single.scores[0], batch.scores[0], atol=1e-6)


def test_batch_size_does_not_change_results(fusion_model, photos):
    whole = fusion_model.predict(TEXTS, photos, batch_size=32)
    split = fusion_model.predict(TEXTS, photos, batch_size=2)

    np.testing.assert_allclose(split.scores, whole.scores, atol=1e-6)


def test_predict_accepts_bytes_pil_and_arrays(fusion_model, photos):
    sources = [photos[0].read_bytes(), Image.open(photos[1]), np.asarray(Image.open(photos[2]))]
    from_paths = fusion_model.predict(TEXTS[:3], photos[:3])
    from_objects = fusion_model.predict(TEXTS[:3], sources)

    np.testing.assert_allclose(from_objects.scores, from_paths.scores, atol=1e-6)


def test_decision_threshold_from_manifest(tmp_path, photos):
    import edgemm.runtime

    folder, _ = build_fusion_package(tmp_path / "pkg")
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data["decision_threshold"] = 0.0
    write_manifest(folder, data)
    prediction = edgemm.runtime.load(folder).predict(TEXTS, photos)

    assert prediction.threshold == 0.0
    assert prediction.labels == ["match"] * 5


def test_prediction_to_dict(fusion_model, photos):
    data = fusion_model.predict(TEXTS[:2], photos[:2]).to_dict()

    assert data["threshold"] == 0.5
    assert len(data["predictions"]) == 2
    assert set(data["predictions"][0]["scores"]) == {"mismatch", "match"}
    json.dumps(data)


def test_long_text_truncated_not_rejected(fusion_model, photos):
    prediction = fusion_model.predict(" ".join(["word"] * 10_000), photos[0])

    assert prediction.scores.shape == (1, 2)


def test_fixed_shape_graph_padded(tmp_path, photos):
    import edgemm.runtime

    folder, module = build_fusion_package(tmp_path / "pkg", dynamic=False)
    model = edgemm.runtime.load(folder)
    prediction = model.predict(TEXTS[:3], photos[:3], batch_size=8)

    assert model._text_padding("model") == "max_length"
    assert model._batch_limit("model", 8) == 2
    feed_texts = model.preprocessor.texts(TEXTS[:3], padding="max_length")
    feed_images = model.preprocessor.images(photos[:3])
    with torch.no_grad():
        expected = module(
            torch.from_numpy(feed_texts["input_ids"]),
            torch.from_numpy(feed_texts["attention_mask"]),
            torch.from_numpy(feed_images["pixel_values"]),
        ).numpy()
    np.testing.assert_allclose(prediction.logits, expected, atol=1e-5)


def _write_mean_graph(path: Path, half: bool = False, baked_batch: int | None = None) -> None:
    """Write a graph whose logits are [mean of attention_mask, mean of pixel_values] per pair.

    With `half`, the text inputs are int32 and pixels and logits float16. With `baked_batch`,
    a Reshape hard-codes that batch size while the inputs still declare a dynamic batch.
    """
    onnx = pytest.importorskip("onnx", reason="writing the graph needs onnx (the host extra)")
    helper, TensorProto = onnx.helper, onnx.TensorProto
    float_type = TensorProto.FLOAT16 if half else TensorProto.FLOAT
    int_type = TensorProto.INT32 if half else TensorProto.INT64
    concat_output = "logits" if baked_batch is None else "means"
    nodes = [
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=float_type),
        helper.make_node("ReduceMean", ["mask_float"], ["mask_mean"], axes=[1], keepdims=1),
        helper.make_node("ReduceMean", ["pixel_values"], ["pixel_mean_4d"], axes=[1, 2, 3], keepdims=1),
        helper.make_node("Squeeze", ["pixel_mean_4d", "spatial_axes"], ["pixel_mean"]),
        helper.make_node("Cast", ["input_ids"], ["ids_unused"], to=float_type),
        helper.make_node("Concat", ["mask_mean", "pixel_mean"], [concat_output], axis=1),
    ]
    initializers = [helper.make_tensor("spatial_axes", TensorProto.INT64, [2], [2, 3])]
    if baked_batch is not None:
        nodes.append(helper.make_node("Reshape", ["means", "baked_shape"], ["logits"]))
        initializers.append(helper.make_tensor("baked_shape", TensorProto.INT64, [2], [baked_batch, 2]))
    graph = helper.make_graph(
        nodes,
        "means",
        [
            helper.make_tensor_value_info("input_ids", int_type, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", int_type, ["batch", "sequence"]),
            helper.make_tensor_value_info("pixel_values", float_type, ["batch", 3, SPEC.image.crop, SPEC.image.crop]),
        ],
        [helper.make_tensor_value_info("logits", float_type, ["batch", 2])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = 8
    onnx.save(model, str(path))


def _package_graph(folder: Path, precision: str = "fp32") -> Path:
    _write_vocab(folder)
    write_manifest(
        folder,
        build_manifest(
            folder,
            kind="fusion_classifier",
            architecture="concat_fusion",
            graphs={"model": "model.onnx"},
            input_spec=SPEC,
            opset=OPSET,
            labels=["mismatch", "match"],
            precision=precision,
        ),
    )
    return folder


def test_half_precision_and_int32_inputs(tmp_path, photos):
    import edgemm.runtime

    folder = tmp_path / "fp16"
    folder.mkdir()
    _write_mean_graph(folder / "model.onnx", half=True)
    model = edgemm.runtime.load(_package_graph(folder, precision="fp16"))
    prediction = model.predict(["a dog", "the red ball on the beach"], photos[:2])

    mask = model.preprocessor.texts(["a dog", "the red ball on the beach"])["attention_mask"]
    pixels = model.preprocessor.images(photos[:2])["pixel_values"]
    assert prediction.logits.dtype == np.float32
    np.testing.assert_allclose(prediction.logits[:, 0], mask.mean(axis=1), atol=1e-3)
    np.testing.assert_allclose(prediction.logits[:, 1], pixels.mean(axis=(1, 2, 3)), atol=2e-3)


def test_graph_failing_at_run_time(tmp_path, photos):
    import edgemm.runtime

    folder = tmp_path / "baked"
    folder.mkdir()
    _write_mean_graph(folder / "model.onnx", baked_batch=2)
    model = edgemm.runtime.load(_package_graph(folder))

    assert model.predict(TEXTS[:2], photos[:2]).scores.shape == (2, 2)
    with pytest.raises(PackageError, match="onnxruntime failed to run .*model.onnx on inputs of shapes") as caught:
        model.predict(TEXTS[:3], photos[:3])
    assert "export the package again with dynamic axes" in str(caught.value)


def test_package_from_edgemm_exporter(tmp_path, photos):
    """A package built with edgemm's own exporter and model code runs and matches PyTorch."""
    export = pytest.importorskip("edgemm.compression.export_onnx", reason="needs edgemm.compression.export_onnx")
    from edgemm.models.checkpoint import load_checkpoint
    from edgemm.models.testing import make_tiny_checkpoint
    from edgemm.runtime.preprocess import Preprocessor

    import edgemm.runtime

    checkpoint = load_checkpoint(make_tiny_checkpoint(tmp_path / "checkpoint", "concat_fusion"))
    preprocessor = Preprocessor(checkpoint.input_spec, checkpoint.vocab_path)
    feed = {**preprocessor.texts(TEXTS[:2]), **preprocessor.images(photos[:2])}
    examples = {name: torch.from_numpy(array) for name, array in feed.items()}
    folder = tmp_path / "package"
    folder.mkdir()
    # The TorchScript exporter is several times faster than the default dynamo exporter on
    # this model, and the runtime reads both graphs the same way.
    export.export_onnx(checkpoint.model, folder / "model.onnx", example_inputs=examples, opset=18, exporter="torchscript", fallback=False)
    shutil.copyfile(checkpoint.vocab_path, folder / "vocab.txt")
    write_manifest(
        folder,
        build_manifest(
            folder,
            kind="fusion_classifier",
            architecture="concat_fusion",
            graphs={"model": "model.onnx"},
            input_spec=checkpoint.input_spec,
            opset=18,
            labels=checkpoint.labels,
        ),
    )
    prediction = edgemm.runtime.load(folder).predict(TEXTS, photos)

    all_feed = {**preprocessor.texts(TEXTS), **preprocessor.images(photos)}
    with torch.no_grad():
        expected = checkpoint.model(*(torch.from_numpy(all_feed[name]) for name in ("input_ids", "attention_mask", "pixel_values")))
    np.testing.assert_allclose(prediction.logits, expected.numpy(), atol=1e-4)


# Bad inputs


def test_lists_of_different_lengths(fusion_model, photos):
    with pytest.raises(InputError, match="Got 3 texts but 2 images"):
        fusion_model.predict(TEXTS[:3], photos[:2])


def test_empty_text_rejected(fusion_model, photos):
    with pytest.raises(InputError, match="position 1 of the batch is empty"):
        fusion_model.predict(["a dog", "  "], photos[:2])


def test_error_position_counts_whole_batch(fusion_model, photos, tmp_path):
    texts = TEXTS + ["a dog", ""]
    images = photos + [photos[0], photos[1]]
    with pytest.raises(InputError, match="position 6 of the batch is empty"):
        fusion_model.predict(texts, images, batch_size=4)

    images[5] = np.zeros((4, 4), dtype=np.float64)
    texts[6] = "fine"
    with pytest.raises(InputError, match="Image at position 5 of the batch: Image arrays must be uint8"):
        fusion_model.predict(texts, images, batch_size=4)


def test_bad_images_rejected(fusion_model, tmp_path):
    text_file = tmp_path / "notes.jpg"
    text_file.write_text("not an image")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    huge = tmp_path / "huge.png"
    Image.new("1", (20_000, 20_000)).save(huge, optimize=True)
    assert huge.stat().st_size < 200_000

    with pytest.raises(InputError, match="notes.jpg is not an image file"):
        fusion_model.predict("a dog", text_file)
    with pytest.raises(InputError, match=r"empty.jpg is empty \(0 bytes\)"):
        fusion_model.predict("a dog", empty)
    with pytest.raises(InputError, match="huge.png is too large.*400000000 pixels"):
        fusion_model.predict("a dog", huge)


def test_invalid_options(fusion):
    import edgemm.runtime

    with pytest.raises(ConfigError, match="threads=0"):
        edgemm.runtime.load(fusion[0], threads=0)
    with pytest.raises(ConfigError, match="NoSuchExecutionProvider"):
        edgemm.runtime.load(fusion[0], providers=["NoSuchExecutionProvider"])


def test_invalid_batch_size(fusion_model, photos):
    with pytest.raises(ConfigError, match="batch_size=0"):
        fusion_model.predict(TEXTS, photos, batch_size=0)


# Bad packages: each raises one PackageError naming the file and the fix.


@pytest.fixture
def package_copy(fusion, tmp_path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(fusion[0], target)
    return target


def _load_error(folder: Path) -> str:
    import edgemm.runtime

    with pytest.raises(PackageError) as caught:
        edgemm.runtime.load(folder)
    return str(caught.value)


def test_missing_file_in_package(package_copy):
    (package_copy / "vocab.txt").unlink()

    message = _load_error(package_copy)
    assert "vocab.txt is listed in the manifest but missing" in message
    assert "copy the whole package folder again" in message


def test_checksum_mismatch(package_copy):
    data = bytearray((package_copy / "model.onnx").read_bytes())
    data[-1] ^= 0xFF
    (package_copy / "model.onnx").write_bytes(bytes(data))

    message = _load_error(package_copy)
    assert "Checksum mismatch for package file" in message
    assert "model.onnx" in message


def test_unknown_format_version(package_copy):
    manifest_path = package_copy / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["format_version"] = 2
    manifest_path.write_text(json.dumps(data))

    message = _load_error(package_copy)
    assert "format version 2" in message
    assert "Upgrade edgemm" in message


def _rebuild_manifest(folder: Path, **changes) -> None:
    """Recompute checksums after a deliberate edit, so the check under test is the one that fires."""
    data = json.loads((folder / MANIFEST_NAME).read_text())
    data.update(changes)
    fields = {key: data[key] for key in ("kind", "architecture", "graphs", "opset", "labels", "compression", "validation", "samples")}
    write_manifest(folder, build_manifest(folder, input_spec=data["inputs"], **fields))


def test_truncated_model_size_mismatch(package_copy):
    model = package_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:500])

    message = _load_error(package_copy)
    assert "has 500 bytes, but the manifest records" in message
    assert "truncated" in message


def test_truncated_model_with_matching_manifest(package_copy):
    model = package_copy / "model.onnx"
    model.write_bytes(model.read_bytes()[:500])
    _rebuild_manifest(package_copy)

    message = _load_error(package_copy)
    assert "model.onnx is not a valid ONNX model" in message
    assert "export the package again" in message


def test_non_onnx_model_file(package_copy):
    (package_copy / "model.onnx").write_bytes(b"\x00" * 64)
    _rebuild_manifest(package_copy)

    assert "is not a valid ONNX model" in _load_error(package_copy)


def test_opset_newer_than_onnxruntime(package_copy):
    onnx = pytest.importorskip("onnx", reason="editing the opset needs onnx (the host extra)")
    model_path = package_copy / "model.onnx"
    proto = onnx.load(str(model_path))
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(proto, str(model_path))
    _rebuild_manifest(package_copy, opset=99)

    message = _load_error(package_copy)
    assert "uses opset 99, but onnxruntime" in message
    assert "supports opsets up to" in message
    assert "Upgrade onnxruntime" in message


def test_manifest_opset_differs_from_graph(package_copy):
    _rebuild_manifest(package_copy, opset=OPSET + 1)

    message = _load_error(package_copy)
    assert f"uses opset {OPSET}, but the manifest records opset {OPSET + 1}" in message


def test_graph_inputs_differ_from_manifest(package_copy, dual):
    shutil.copyfile(dual[0] / "text_encoder.onnx", package_copy / "model.onnx")
    _rebuild_manifest(package_copy)

    message = _load_error(package_copy)
    assert "has inputs ['attention_mask', 'input_ids']" in message
    assert "does not belong to this manifest" in message


def test_path_outside_package(package_copy):
    (package_copy.parent / "elsewhere.onnx").write_bytes((package_copy / "model.onnx").read_bytes())
    manifest_path = package_copy / MANIFEST_NAME
    data = json.loads(manifest_path.read_text())
    data["graphs"]["model"] = "../elsewhere.onnx"
    data["files"]["../elsewhere.onnx"] = data["files"].pop("model.onnx")
    manifest_path.write_text(json.dumps(data))

    assert "points outside" in _load_error(package_copy)


def test_not_a_package(tmp_path):
    assert "is not a model package" in _load_error(tmp_path)


# Dual encoder


def test_dual_encoder_embeddings(dual):
    import edgemm.runtime

    folder, text_encoder, _ = dual
    model = edgemm.runtime.load(folder)
    embeds = model.encode_text(TEXTS)

    assert model.kind == "dual_encoder"
    assert embeds.shape == (5, 6)
    assert embeds.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeds, axis=1), 1.0, rtol=1e-5)
    feed = model.preprocessor.texts(TEXTS)
    with torch.no_grad():
        expected = text_encoder(torch.from_numpy(feed["input_ids"]), torch.from_numpy(feed["attention_mask"])).numpy()
    np.testing.assert_allclose(embeds, expected, atol=1e-5)


def test_dual_encoder_similarity(dual, photos):
    import edgemm.runtime

    model = edgemm.runtime.load(dual[0])
    text_embeds = model.encode_text(TEXTS[:3])
    image_embeds = model.encode_image(photos, batch_size=2)
    matrix = model.similarity(TEXTS[:3], photos)

    assert image_embeds.shape == (5, 6)
    assert matrix.shape == (3, 5)
    np.testing.assert_allclose(matrix, text_embeds @ image_embeds.T, atol=1e-5)
    np.testing.assert_allclose(model.similarity(text_embeds, image_embeds, scale=True), 14.3 * matrix, rtol=1e-5)
    assert np.all(np.abs(matrix) <= 1.0 + 1e-5)


# Thread safety


def test_one_model_many_threads(fusion_model, photos):
    expected = fusion_model.predict(TEXTS, photos).scores
    barrier = threading.Barrier(4)

    def predict(offset: int) -> np.ndarray:
        barrier.wait()
        order = [(index + offset) % 5 for index in range(5)]
        scores = fusion_model.predict([TEXTS[i] for i in order], [photos[i] for i in order], batch_size=2).scores
        return scores[np.argsort(order)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(predict, range(8)))
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


# CLI


def _cli(*args: str):
    from typer.testing import CliRunner

    from edgemm.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_run_json(fusion, photos):
    result = _cli("run", str(fusion[0]), "--text", "a dog", "--image", str(photos[0]), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["predictions"][0]["label"] in ("match", "mismatch")


def test_cli_run_table(fusion, photos):
    result = _cli("run", str(fusion[0]), "--text", "a dog", "--image", str(photos[0]), "--text", "a cat", "--image", str(photos[1]))

    assert result.exit_code == 0, result.output
    assert "match" in result.stdout
    assert "a cat" in result.stdout


def test_cli_run_dual_encoder(dual, photos):
    result = _cli("run", str(dual[0]), "--text", "a dog", "--text", "a cat", "--image", str(photos[0]), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["similarity"]) == 2
    assert len(data["similarity"][0]) == 1


def test_cli_run_errors(fusion, photos, tmp_path):
    missing = _cli("run", str(fusion[0]), "--text", "a dog", "--image", str(tmp_path / "absent.jpg"))
    assert missing.exit_code == 2
    assert "error:" in missing.stderr
    assert "absent.jpg not found" in missing.stderr
    assert "Traceback" not in missing.stderr

    not_package = _cli("run", str(tmp_path), "--text", "a dog", "--image", str(photos[0]))
    assert not_package.exit_code == 2
    assert "is not a model package" in not_package.stderr

    unpaired = _cli("run", str(fusion[0]), "--text", "a", "--text", "b", "--image", str(photos[0]))
    assert unpaired.exit_code == 2
    assert "Got 2 texts but 1 images" in unpaired.stderr


def test_cli_run_package_samples(fusion):
    result = _cli("run", str(fusion[0]), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [item["text"] for item in data["predictions"]] == ["a dog runs on the beach", "the red ball"]
    assert data["predictions"][1]["image"].endswith("1.png")


def test_cli_run_no_inputs_no_samples(dual):
    result = _cli("run", str(dual[0]))

    assert result.exit_code == 2
    assert "stores no sample inputs" in result.stderr


def test_cli_inspect(fusion):
    result = _cli("inspect", str(fusion[0]))

    assert result.exit_code == 0, result.output
    for expected in ("fusion_classifier", "[mismatch, match]", "wordpiece", "model.onnx", "opset", "17", "0.5", "int8-static", "minmax"):
        assert expected in result.stdout
    assert "params before" in result.stdout
    assert "calibration samples" in result.stdout
    assert "prune.macs_after" not in result.stdout


def test_cli_inspect_full(fusion):
    result = _cli("inspect", str(fusion[0]), "--full")

    assert result.exit_code == 0, result.output
    assert "prune.macs_after" in result.stdout
    assert "accuracy.before" in result.stdout


def test_cli_inspect_json(dual):
    result = _cli("inspect", str(dual[0]), "--json")

    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["kind"] == "dual_encoder"
    assert data["files"]["text_encoder.onnx"]["bytes"] > 0
    assert data["graphs"]["text_encoder"]["inputs"]["input_ids"]["shape"] == ["batch", "sequence"]
    assert data["graphs"]["image_encoder"]["opsets"][""] == OPSET


def test_cli_inspect_damaged_package(package_copy):
    (package_copy / "vocab.txt").write_text("changed")

    result = _cli("inspect", str(package_copy))
    assert result.exit_code == 2
    assert "vocab.txt" in result.stderr
