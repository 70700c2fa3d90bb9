"""Tests of the synthetic shape scenes: captions, hard negatives, pixels and determinism."""

from __future__ import annotations

import collections
import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image

from edgemm.data.augment import Augmenter
from edgemm.data.matching import make_matching_pairs
from edgemm.data.records import load_dataset
from edgemm.data.synthetic import (
    COLORS,
    Caption,
    caption_words,
    generate_scenes,
    is_false_for,
    is_true,
    make_scene,
    parse_caption,
    split_names,
)
from edgemm.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scenes_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "scenes"
    generate_scenes(out, 200, seed=0, image_size=96)
    return out


def _attribute_differences(truth: Caption, negative: Caption) -> list[str]:
    differences = []
    if truth.relation != negative.relation:
        differences.append("relation")
    for role in ("subject", "other"):
        a, b = getattr(truth, role), getattr(negative, role)
        if a is None or b is None:
            assert a is b, "a negative must name as many shapes as the truth"
            continue
        differences += [f"{role}.{name}" for name in ("size", "color", "shape") if getattr(a, name) != getattr(b, name)]
    return differences


def test_dataset_layout_and_splits(scenes_dir: Path):
    records = load_dataset(scenes_dir, check_images=True)
    assert len(records) == 200
    assert collections.Counter(record.split for record in records) == {"train": 160, "dev": 40}
    assert all(2 <= len(record.negatives) <= 3 for record in records)
    assert len(list((scenes_dir / "images").iterdir())) == 200


def test_negatives_differ_in_one_attribute(scenes_dir: Path):
    kinds = collections.Counter()
    for record in load_dataset(scenes_dir):
        truth = parse_caption(record.text)
        assert len(set(record.negatives)) == len(record.negatives)
        for text in record.negatives:
            differences = _attribute_differences(truth, parse_caption(text))
            assert len(differences) == 1, (record.text, text)
            kinds[differences[0].split(".")[-1]] += 1
    assert set(kinds) == {"size", "color", "shape", "relation"}


def test_negatives_are_false_for_scene(scenes_dir: Path):
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        scene = make_scene(0, row["index"], 96)
        assert is_true(scene.caption, scene.shapes)
        for negative in scene.negatives:
            assert not is_true(negative, scene.shapes), negative.text
            assert is_false_for([scene.caption.text], negative.text)


def test_pixels_match_caption_colors(scenes_dir: Path):
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines()[:60]:
        row = json.loads(line)
        image = Image.open(scenes_dir / row["image"]).convert("RGB")
        assert image.size == (96, 96)
        for shape in row["shapes"]:
            x, y = shape["center"]
            assert image.getpixel((round(x), round(y))) == COLORS[shape["color"]], (row["image"], shape)
            assert shape["color"] in row["caption"]
            assert shape["shape"] in row["caption"]


def test_spatial_relation_matches_pixels(scenes_dir: Path):
    checked = 0
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        caption = parse_caption(row["caption"])
        if caption.relation is None:
            continue
        image = Image.open(scenes_dir / row["image"]).convert("RGB")
        subject = next(s for s in row["shapes"] if (s["size"], s["color"], s["shape"]) == (
            caption.subject.size, caption.subject.color, caption.subject.shape))
        # Find the subject's colour in the half of the image that the relation names.
        half = {"left of": (0, 0, 48, 96), "right of": (48, 0, 96, 96), "above": (0, 0, 96, 48), "below": (0, 48, 96, 96)}
        region = image.crop(half[caption.relation])
        assert COLORS[subject["color"]] in {color for _, color in region.getcolors(96 * 96)}
        checked += 1
    assert checked > 50


def test_size_words_match_radii(scenes_dir: Path):
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines()[:80]:
        row = json.loads(line)
        for shape in row["shapes"]:
            fraction = shape["radius"] / 96
            assert (fraction < 0.12) == (shape["size"] == "small")
            assert (fraction > 0.16) == (shape["size"] == "large")


def test_same_seed_same_pixels(tmp_path: Path):
    def digest(folder: Path) -> str:
        records = load_dataset(folder)
        hasher = hashlib.sha256()
        for record in records:
            hasher.update(record.text.encode())
            hasher.update(Image.open(record.image).tobytes())
        return hasher.hexdigest()

    generate_scenes(tmp_path / "a", 20, seed=5, image_size=64)
    generate_scenes(tmp_path / "b", 20, seed=5, image_size=64)
    generate_scenes(tmp_path / "c", 20, seed=6, image_size=64)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")
    # Scene i does not depend on how many scenes are generated.
    assert make_scene(5, 3, 64) == make_scene(5, 3, 64)
    assert load_dataset(tmp_path / "a")[3].text == make_scene(5, 3, 64).caption.text


def test_jpeg_format(tmp_path: Path):
    records = generate_scenes(tmp_path / "jpg", 5, image_format="jpg", image_size=64)
    assert all(record.image.suffix == ".jpg" for record in records)
    assert Image.open(records[0].image).format == "JPEG"


def test_invalid_options(tmp_path: Path):
    with pytest.raises(ConfigError, match="n_images"):
        generate_scenes(tmp_path / "x", 0)
    with pytest.raises(ConfigError, match="image_size"):
        generate_scenes(tmp_path / "x", 3, image_size=8)
    with pytest.raises(ConfigError, match="sum to 1"):
        generate_scenes(tmp_path / "x", 3, splits=(("train", 0.5), ("dev", 0.2)))
    assert not (tmp_path / "x").exists()
    assert split_names(5, (("train", 0.8), ("dev", 0.2))) == ["train"] * 4 + ["dev"]


def test_easy_negatives_are_false(scenes_dir: Path):
    records = load_dataset(scenes_dir)
    truth = {record.image: record.text for record in records}
    pairs = make_matching_pairs(records, seed=0, hard_negative_fraction=0.0)
    for pair in pairs:
        if pair.label == 0:
            assert is_false_for([truth[pair.image]], pair.text), (truth[pair.image], pair.text)
    # A single-shape caption that names one shape of a two-shape scene is true for it.
    assert not is_false_for(["a small red star left of a large blue circle"], "a small red star")
    assert not is_false_for(["a small red star left of a large blue circle"], "a large blue circle right of a small red star")


def test_caption_words_in_tiny_vocab():
    vocab_path = REPO_ROOT / "edgemm" / "models" / "assets" / "tiny_vocab.txt"
    if not vocab_path.exists():
        pytest.skip(f"{vocab_path} is not in this checkout yet")
    vocab = set(vocab_path.read_text(encoding="utf-8").split())
    missing = [word for word in caption_words() if word not in vocab]
    assert not missing


def test_shapes_reach_central_third(scenes_dir: Path):
    low, high = 96 / 3, 2 * 96 / 3
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines():
        for shape in json.loads(line)["shapes"]:
            # Centres and radii are stored rounded to 0.01 pixel.
            reach = 0.3 * shape["radius"] + 0.01
            for coordinate in shape["center"]:
                assert low - reach <= coordinate <= high + reach, shape


def test_augmented_scenes_keep_caption_colors(scenes_dir: Path):
    # No rotation or colour jitter, so solid shape interiors keep their exact colour.
    augmenter = Augmenter(seed=0, max_rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    for line in (scenes_dir / "scenes.jsonl").read_text().splitlines()[:60]:
        row = json.loads(line)
        image = Image.open(scenes_dir / row["image"]).convert("RGB")
        for _ in range(3):
            augmented, text = augmenter(image, row["caption"])
            colors = {color for _, color in augmented.getcolors(96 * 96)}
            for shape in row["shapes"]:
                assert COLORS[shape["color"]] in colors, (row["image"], shape, text)
