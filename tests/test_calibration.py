"""Calibration set definitions, record selection and the streaming calibration reader."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_static

from edgemm.compression.calibration import CalibrationSet, EdgemmCalibrationReader
from edgemm.data.records import Record
from edgemm.data.synthetic import generate_scenes
from edgemm.errors import ConfigError, DataError
from edgemm.runtime.image import ImageTransform
from edgemm.runtime.spec import ImageSpec, InputSpec, TextSpec
from edgemm.runtime.tokenizer import WordPieceTokenizer

REPO = Path(__file__).resolve().parents[1]
VOCAB = REPO / "edgemm" / "models" / "assets" / "tiny_vocab.txt"
MAX_LENGTH = 16


def write_toml(path: Path, body: str) -> Path:
    path.write_text("[calibration]\n" + body, encoding="utf-8")
    return path


def tokenizer() -> WordPieceTokenizer:
    return WordPieceTokenizer.from_spec(TextSpec(max_length=MAX_LENGTH), VOCAB)


def text_records(texts: list[str], labels: list[int | None] | None = None) -> list[Record]:
    labels = labels or [None] * len(texts)
    return [Record(image=Path(f"/unused/{i}.png"), text=text, label=label) for i, (text, label) in enumerate(zip(texts, labels))]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("scenes") / "data"
    generate_scenes(folder, 12, seed=5, image_size=48, splits=(("train", 0.75), ("dev", 0.25)))
    return folder


def test_toml_unknown_key_named(tmp_path):
    path = write_toml(tmp_path / "set.toml", 'source = "builtin"\nsamples = 10\n')
    with pytest.raises(ConfigError) as caught:
        CalibrationSet.from_toml(path)
    message = str(caught.value)
    assert "'samples'" in message
    assert "size" in message
    assert "text_padding" in message


def test_toml_invalid_selection(tmp_path):
    path = write_toml(tmp_path / "set.toml", 'source = "builtin"\nselection = "best"\n')
    with pytest.raises(ConfigError, match="stratified"):
        CalibrationSet.from_toml(path)


def test_toml_dataset_without_path(tmp_path):
    path = write_toml(tmp_path / "set.toml", 'source = "dataset"\n')
    with pytest.raises(ConfigError, match="path"):
        CalibrationSet.from_toml(path)


def test_toml_relative_path_resolves(tmp_path):
    path = write_toml(tmp_path / "set.toml", 'path = "data"\nsize = 4\n')
    assert CalibrationSet.from_toml(path).path == tmp_path / "data"


@pytest.mark.parametrize("name", ["builtin.toml", "flickr8k.toml"])
def test_repository_definitions_load(name):
    calibration = CalibrationSet.from_toml(REPO / "calibration" / name)
    assert calibration.text_padding == "max_length"
    assert calibration.size in (128, 256)


def test_flickr_definition_selects_train(flickr_dir):
    calibration = CalibrationSet.from_toml(REPO / "calibration" / "flickr8k.toml")
    assert calibration.path.resolve() == flickr_dir.resolve()
    records = calibration.select_records()
    assert len(records) == 256
    assert {record.split for record in records} == {"train"}
    assert calibration.select_records() == records  # the seed makes the choice reproducible


def test_all_images_broken_raises(tmp_path):
    (tmp_path / "images").mkdir()
    lines = []
    for index in range(3):
        (tmp_path / "images" / f"{index}.jpg").write_bytes(b"not a jpeg")
        lines.append(json.dumps({"image": f"images/{index}.jpg", "text": "a red square"}))
    (tmp_path / "records.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")

    calibration = CalibrationSet(path=tmp_path, size=2, split=None)
    with pytest.raises(DataError) as caught:
        calibration.select_records()
    assert "all 3 records were skipped" in str(caught.value)
    assert "cannot be decoded" in str(caught.value)


def test_broken_images_skipped(scenes, tmp_path):
    records = CalibrationSet(path=scenes, split=None).select_records()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG truncated")
    mixed = [Record(image=broken, text="a broken image")] + records

    chosen = CalibrationSet(path=scenes, size=4, selection="first", split=None).select_records(mixed)
    assert len(chosen) == 4
    assert broken not in {record.image for record in chosen}


def test_split_not_found(scenes):
    with pytest.raises(DataError, match="dev"):
        CalibrationSet(path=scenes, split="test").select_records()


def test_selection_first_and_random():
    records = text_records([f"caption {i}" for i in range(20)])
    first = CalibrationSet(path=Path("."), size=5, selection="first", split=None).select_records(records, check_images=False)
    assert [r.text for r in first] == [f"caption {i}" for i in range(5)]

    random_a = CalibrationSet(path=Path("."), size=5, seed=1, split=None).select_records(records, check_images=False)
    random_b = CalibrationSet(path=Path("."), size=5, seed=1, split=None).select_records(records, check_images=False)
    random_c = CalibrationSet(path=Path("."), size=5, seed=2, split=None).select_records(records, check_images=False)
    assert random_a == random_b
    assert random_a != random_c


def test_selection_stratified_keeps_shares():
    labels = [1] * 30 + [0] * 10
    records = text_records([f"caption {i}" for i in range(40)], labels)
    calibration = CalibrationSet(path=Path("."), size=8, selection="stratified", split=None)
    chosen = calibration.select_records(records, check_images=False)
    assert Counter(record.label for record in chosen) == {1: 6, 0: 2}


def test_reader_pads_to_fixed_length():
    records = text_records(["a cat", "a large red square to the left of a small blue circle", "dog", "a b c"])
    reader = EdgemmCalibrationReader(
        records, ["input_ids", "attention_mask"], encode_text=tokenizer(), batch_size=3, max_length=MAX_LENGTH
    )
    batches = []
    while (feeds := reader.get_next()) is not None:
        batches.append(feeds)

    assert len(batches) == 2
    assert [b["input_ids"].shape for b in batches] == [(3, MAX_LENGTH), (1, MAX_LENGTH)]
    assert all(b["attention_mask"].dtype == np.int64 for b in batches)
    assert batches[0]["attention_mask"][0].sum() < batches[0]["attention_mask"][1].sum()


def test_reader_longest_padding_varies():
    records = text_records(["a cat", "a large red square to the left of a small blue circle"])
    reader = EdgemmCalibrationReader(records, ["input_ids", "attention_mask"], encode_text=tokenizer(), batch_size=1, text_padding="longest")
    lengths = [reader.get_next()["input_ids"].shape[1] for _ in range(2)]
    assert lengths[0] != lengths[1]


def test_reader_rewind_and_range():
    records = text_records([f"caption {i}" for i in range(10)])
    reader = EdgemmCalibrationReader(records, ["input_ids", "attention_mask"], encode_text=tokenizer(), batch_size=4)
    assert len(reader) == 3
    first = reader.get_next()["input_ids"]
    reader.get_next()
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["input_ids"], first)

    reader.set_range(2, 3)
    assert reader.get_next()["input_ids"].shape[0] == 2
    assert reader.get_next() is None


def test_reader_builds_only_graph_inputs(scenes):
    spec = InputSpec(text=TextSpec(max_length=MAX_LENGTH), image=ImageSpec(resize=36, crop=32))
    calibration = CalibrationSet(path=scenes, size=4, batch_size=2)
    reader = EdgemmCalibrationReader.from_spec(calibration, ["pixel_values"], spec, None)
    feeds = reader.get_next()
    assert set(feeds) == {"pixel_values"}
    assert feeds["pixel_values"].shape == (2, 3, 32, 32)
    np.testing.assert_array_equal(feeds["pixel_values"], ImageTransform(spec.image)([r.image for r in reader.records[:2]]))


def test_reader_unknown_graph_input():
    with pytest.raises(ConfigError, match="token_type_ids"):
        EdgemmCalibrationReader(text_records(["a"]), ["input_ids", "token_type_ids"], encode_text=tokenizer())


class MeanPooledText(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.embeddings = nn.Embedding(vocab_size, 16)
        self.proj = nn.Linear(16, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask):
        hidden = torch.relu(self.proj(self.embeddings(input_ids)))
        mask = attention_mask[..., None].float()
        return self.head((hidden * mask).sum(1) / mask.sum(1))


@pytest.fixture(scope="module")
def text_onnx(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    vocab_size = len(VOCAB.read_text(encoding="utf-8").splitlines())
    model = MeanPooledText(vocab_size).eval()
    sequence = torch.export.Dim("sequence")
    batch = torch.export.Dim("batch")
    path = tmp_path_factory.mktemp("text") / "text.onnx"
    torch.onnx.export(
        model,
        (torch.randint(5, vocab_size, (2, 8)), torch.ones(2, 8, dtype=torch.int64)),
        str(path),
        input_names=["input_ids", "attention_mask"],
        output_names=["logits"],
        dynamic_shapes={"input_ids": {0: batch, 1: sequence}, "attention_mask": {0: batch, 1: sequence}},
        dynamo=True,
    )
    return path


@pytest.mark.parametrize("method", [CalibrationMethod.Entropy, CalibrationMethod.Percentile])
def test_histogram_calibration_needs_fixed_length(text_onnx, tmp_path, method):
    texts = ["a cat", "a large red square to the left of a small blue circle", "a dog runs", "two small green stars"]
    records = text_records(texts)

    def reader(padding: str) -> EdgemmCalibrationReader:
        return EdgemmCalibrationReader(records, ["input_ids", "attention_mask"], encode_text=tokenizer(), batch_size=1, text_padding=padding)

    # onnxruntime 1.32 stacks the activations of all batches: uneven lengths cannot stack.
    with pytest.raises(ValueError, match="inhomogeneous"):
        quantize_static(str(text_onnx), str(tmp_path / "longest.onnx"), reader("longest"), quant_format=QuantFormat.QDQ, calibrate_method=method)

    quantize_static(str(text_onnx), str(tmp_path / "fixed.onnx"), reader("max_length"), quant_format=QuantFormat.QDQ, calibrate_method=method)
    assert (tmp_path / "fixed.onnx").is_file()


def test_builtin_source_generates_scenes(tmp_path):
    calibration = CalibrationSet(source="builtin", path=tmp_path / "scenes", size=4, seed=2)
    records = calibration.select_records()
    assert len(records) == 4
    assert (tmp_path / "scenes" / "records.jsonl").is_file()
    assert calibration.select_records() == records
