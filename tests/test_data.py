"""Tests of dataset loading, captions import, matching pairs, augmentation and the `data` CLI."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import pytest
from PIL import Image

from edgemm.data.augment import Augmenter, mirror_caption
from edgemm.data.captions import import_captions, load_captions_csv
from edgemm.data.matching import group_by_image, make_matching_pairs, normalize_text
from edgemm.data.records import Record, load_dataset, write_dataset
from edgemm.errors import ConfigError, DataError, EdgemmError


def _write_image(path: Path, color=(200, 30, 30), size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture()
def jsonl_dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "ds"
    for name in ("a", "b", "c"):
        _write_image(folder / "images" / f"{name}.png")
    _write_jsonl(
        folder / "records.jsonl",
        [
            {"image": "images/a.png", "text": "a red box", "label": 1, "split": "train", "negatives": ["a blue box"]},
            {"image": "images/b.png", "text": "  another   red box ", "split": "train"},
            {"image": "images/c.png", "text": "a third red box", "split": "dev"},
        ],
    )
    return folder


@pytest.fixture()
def captions_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "captions"
    rows = ["image,caption,split"]
    for index in range(4):
        _write_image(folder / "images" / f"{index}.jpg", color=(index * 60, 100, 100))
        split = "train" if index < 3 else "dev"
        rows.append(f"{index}.jpg,photo {index} first caption,{split}")
        rows.append(f'{index}.jpg,"photo {index}, second caption",{split}')
    (folder / "captions.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


# Loading


def test_load_jsonl_fields(jsonl_dataset: Path):
    records = load_dataset(jsonl_dataset)
    assert len(records) == 3
    first = records[0]
    assert first.image == (jsonl_dataset / "images" / "a.png").resolve()
    assert first.image.is_absolute()
    assert first.label == 1
    assert first.split == "train"
    assert first.negatives == ("a blue box",)
    assert records[1].text == "another red box"
    assert records[1].label is None
    assert records[1].negatives == ()


def test_load_split_filter(jsonl_dataset: Path):
    dev = load_dataset(jsonl_dataset, split="dev")
    assert [record.text for record in dev] == ["a third red box"]


def test_load_unknown_split_lists_found(jsonl_dataset: Path):
    with pytest.raises(DataError) as info:
        load_dataset(jsonl_dataset, split="test")
    assert "'test'" in str(info.value)
    assert "dev, train" in str(info.value)


def test_load_csv_records(tmp_path: Path):
    folder = tmp_path / "csv"
    _write_image(folder / "x.png")
    _write_image(folder / "y.png")
    (folder / "records.csv").write_text(
        "image,text,label,split,negatives\nx.png,one,1,train,wrong one|other wrong\ny.png,two,0,,\n", encoding="utf-8"
    )
    records = load_dataset(folder)
    assert [record.label for record in records] == [1, 0]
    assert [record.split for record in records] == ["train", None]
    assert records[0].negatives == ("wrong one", "other wrong")
    assert records[1].negatives == ()


def test_load_captions_folder_directly(captions_folder: Path):
    records = load_dataset(captions_folder)
    assert len(records) == 8
    assert records[1].text == "photo 0, second caption"
    assert records[0].image == (captions_folder / "images" / "0.jpg").resolve()
    assert collections.Counter(record.split for record in records) == {"train": 6, "dev": 2}


def test_csv_missing_column_named(tmp_path: Path):
    folder = tmp_path / "bad"
    _write_image(folder / "x.png")
    (folder / "records.csv").write_text("image,caption\nx.png,hello\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    message = str(info.value)
    assert "'text'" in message
    assert "records.csv" in message
    assert "image, caption" in message


def test_captions_missing_column_named(tmp_path: Path):
    folder = tmp_path / "bad"
    _write_image(folder / "images" / "x.png")
    (folder / "captions.csv").write_text("image,split\nx.png,train\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    assert "'caption'" in str(info.value)
    assert "captions.csv" in str(info.value)


def test_jsonl_missing_field_named(tmp_path: Path):
    folder = tmp_path / "bad"
    _write_image(folder / "x.png")
    _write_jsonl(folder / "records.jsonl", [{"image": "x.png", "text": "ok"}, {"image": "x.png"}])
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    assert "'text'" in str(info.value)
    assert "line 2" in str(info.value)


def test_missing_image_named(jsonl_dataset: Path):
    (jsonl_dataset / "images" / "b.png").unlink()
    with pytest.raises(DataError) as info:
        load_dataset(jsonl_dataset)
    assert "b.png" in str(info.value)
    assert "not found" in str(info.value)


def test_missing_image_in_captions_named(captions_folder: Path):
    (captions_folder / "images" / "2.jpg").unlink()
    with pytest.raises(DataError) as info:
        load_captions_csv(captions_folder / "captions.csv")
    assert "2.jpg" in str(info.value)


def test_empty_caption_names_line(captions_folder: Path):
    path = captions_folder / "captions.csv"
    path.write_text(path.read_text() + "3.jpg,   ,dev\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        load_dataset(captions_folder)
    assert "line 10" in str(info.value)
    assert "empty" in str(info.value)


def test_empty_text_in_jsonl_names_line(jsonl_dataset: Path):
    path = jsonl_dataset / "records.jsonl"
    path.write_text(path.read_text() + json.dumps({"image": "images/a.png", "text": ""}) + "\n")
    with pytest.raises(DataError) as info:
        load_dataset(jsonl_dataset)
    assert "line 4" in str(info.value)


def test_invalid_json_names_line(jsonl_dataset: Path):
    path = jsonl_dataset / "records.jsonl"
    path.write_text(path.read_text() + "{not json\n")
    with pytest.raises(DataError) as info:
        load_dataset(jsonl_dataset)
    assert "Line 4" in str(info.value)


def test_image_outside_folder_rejected(tmp_path: Path):
    _write_image(tmp_path / "outside.png")
    folder = tmp_path / "ds"
    folder.mkdir()
    _write_jsonl(folder / "records.jsonl", [{"image": "../outside.png", "text": "escape"}])
    with pytest.raises(DataError) as info:
        load_dataset(folder)
    assert "../outside.png" in str(info.value)


def test_check_images_rejects_corrupt(jsonl_dataset: Path):
    (jsonl_dataset / "images" / "c.png").write_bytes(b"not a png")
    assert len(load_dataset(jsonl_dataset)) == 3
    with pytest.raises(DataError) as info:
        load_dataset(jsonl_dataset, check_images=True)
    assert "c.png" in str(info.value)


def test_missing_folder_and_empty_folder(tmp_path: Path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "nowhere")
    with pytest.raises(DataError, match="records.jsonl"):
        load_dataset(tmp_path)


def test_write_then_load_round_trip(jsonl_dataset: Path):
    records = load_dataset(jsonl_dataset)
    out = jsonl_dataset / "copy"
    out.mkdir()
    # The new records file sits one level down, so images must still be inside its folder.
    with pytest.raises(DataError, match="outside"):
        write_dataset(out, records)
    relative = [Record(Path("images/a.png"), "relative path", 0, "dev", ("x",))]
    with pytest.raises(DataError, match="already exists"):
        write_dataset(jsonl_dataset, relative)
    write_dataset(jsonl_dataset, relative, overwrite=True)
    again = load_dataset(jsonl_dataset)
    assert again == [Record((jsonl_dataset / "images/a.png").resolve(), "relative path", 0, "dev", ("x",))]
    line = json.loads((jsonl_dataset / "records.jsonl").read_text().splitlines()[0])
    assert line["image"] == "images/a.png"


# Captions import


def test_import_captions_links_images(captions_folder: Path, tmp_path: Path):
    out = tmp_path / "imported"
    import_captions(captions_folder / "captions.csv", out)
    records = load_dataset(out)
    assert len(records) == 8
    assert all(record.image.is_relative_to(out.resolve()) for record in records)
    # Same file system here, so the image is a hard link to the original.
    assert (out / "images" / "0.jpg").stat().st_ino == (captions_folder / "images" / "0.jpg").stat().st_ino
    with pytest.raises(EdgemmError, match="already exists"):
        import_captions(captions_folder / "captions.csv", out)


def test_import_captions_copy_is_independent(captions_folder: Path, tmp_path: Path):
    out = tmp_path / "copied"
    import_captions(captions_folder / "captions.csv", out, copy_images=True)
    assert (out / "images" / "1.jpg").stat().st_ino != (captions_folder / "images" / "1.jpg").stat().st_ino
    assert [r.text for r in load_dataset(out)] == [r.text for r in load_dataset(captions_folder)]


def test_import_failure_leaves_no_folder(captions_folder: Path, tmp_path: Path):
    (captions_folder / "images" / "3.jpg").unlink()
    out = tmp_path / "never"
    with pytest.raises(DataError):
        import_captions(captions_folder / "captions.csv", out)
    assert not out.exists()


# Matching pairs


def _captions(n_images: int, per_image: int = 2, split: str | None = "train") -> list[Record]:
    return [
        Record(Path(f"/data/img{image:03d}.jpg"), f"caption {caption} of image {image}", split=split)
        for image in range(n_images)
        for caption in range(per_image)
    ]


def test_pairs_balanced_one_to_one():
    pairs = make_matching_pairs(_captions(20), seed=3)
    labels = collections.Counter(pair.label for pair in pairs)
    assert labels[1] == 40
    assert labels[0] == 40


def test_pairs_deterministic_and_order_free():
    records = _captions(30)
    first = make_matching_pairs(records, seed=7)
    second = make_matching_pairs(list(reversed(records)), seed=7)
    other_seed = make_matching_pairs(records, seed=8)
    assert first == second
    assert first != other_seed


def test_pairs_never_use_own_caption():
    records = _captions(10, per_image=5)
    # A caption shared word for word by two images must not become a negative for either.
    records.append(Record(Path("/data/img000.jpg"), "a shared caption", split="train"))
    records.append(Record(Path("/data/img001.jpg"), "A shared caption .", split="train"))
    own = collections.defaultdict(set)
    for record in records:
        own[record.image].add(normalize_text(record.text))
    for seed in range(5):
        for pair in make_matching_pairs(records, seed=seed, negatives_per_positive=3):
            if pair.label == 0:
                assert normalize_text(pair.text) not in own[pair.image]


def test_pairs_hard_negative_fraction():
    records = [
        Record(Path(f"/d/{index}.png"), f"true {index}", split="train", negatives=(f"hard {index}", f"hard2 {index}"))
        for index in range(40)
    ]
    pairs = make_matching_pairs(records, seed=0, hard_negative_fraction=0.5)
    negatives = [pair for pair in pairs if pair.label == 0]
    hard = [pair for pair in negatives if pair.text.startswith("hard")]
    assert len(hard) == 20
    for pair in hard:
        assert pair.text.split()[-1] == pair.image.stem
    none_hard = make_matching_pairs(records, seed=0, hard_negative_fraction=0.0)
    assert not any(pair.text.startswith("hard") for pair in none_hard if pair.label == 0)
    all_hard = make_matching_pairs(records, seed=0, hard_negative_fraction=1.0, negatives_per_positive=2)
    assert sum(pair.text.startswith("hard") for pair in all_hard if pair.label == 0) == 80


def test_pairs_stay_within_split():
    records = _captions(6, split="train") + [
        Record(Path(f"/dev/{index}.jpg"), f"dev caption {index}", split="dev") for index in range(4)
    ]
    for pair in make_matching_pairs(records, seed=1):
        if pair.label == 0 and pair.split == "dev":
            assert pair.text.startswith("dev caption")


def test_pairs_reject_bad_input():
    with pytest.raises(DataError, match="two images"):
        make_matching_pairs(_captions(1, per_image=3))
    with pytest.raises(DataError, match="label 0"):
        make_matching_pairs([Record(Path("/a.png"), "x", label=0), Record(Path("/b.png"), "y")])
    with pytest.raises(ConfigError, match="negatives_per_positive"):
        make_matching_pairs(_captions(3), negatives_per_positive=0)
    with pytest.raises(ConfigError, match="hard_negative_fraction"):
        make_matching_pairs(_captions(3), hard_negative_fraction=1.5)


def test_group_by_image_skips_mismatches():
    records = _captions(3, per_image=2) + [Record(Path("/data/img000.jpg"), "wrong", label=0)]
    groups = group_by_image(records)
    assert list(groups) == [Path(f"/data/img{index:03d}.jpg") for index in range(3)]
    assert groups[Path("/data/img000.jpg")] == ["caption 0 of image 0", "caption 1 of image 0"]


# Real captions


@pytest.mark.shared_data
def test_flickr_folder_counts(flickr_dir: Path):
    records = load_dataset(flickr_dir)
    assert len(records) == 4375
    assert len({record.image for record in records}) == 875
    images_per_split = {
        split: len({record.image for record in records if record.split == split}) for split in ("train", "dev")
    }
    assert images_per_split == {"train": 762, "dev": 113}

    dev_pairs = make_matching_pairs(load_dataset(flickr_dir, split="dev"), seed=0)
    assert len(dev_pairs) == 2 * 565
    assert dev_pairs == make_matching_pairs(load_dataset(flickr_dir, split="dev"), seed=0)
    groups = group_by_image(records)
    assert len(groups) == 875
    assert all(len(captions) == 5 for captions in groups.values())


# Augmentation


def _two_color_image(size=(64, 48)) -> Image.Image:
    """Red left half, blue right half."""
    image = Image.new("RGB", size, (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return image


def _left_is_red(image: Image.Image) -> bool:
    red, _, blue = image.getpixel((2, image.height // 2))
    return red > blue


def test_augmenter_keeps_size_and_mode():
    augmenter = Augmenter(seed=0)
    for size in ((64, 48), (31, 77)):
        image, text = augmenter(Image.new("L", size, 128), "a grey picture")
        assert image.size == size
        assert image.mode == "RGB"
        assert text == "a grey picture"


def test_augmenter_swaps_left_right_with_flip():
    # No crop, rotation or jitter, so the only change is the flip.
    augmenter = Augmenter(seed=1, min_scale=1.0, max_rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0)
    flips = 0
    for _ in range(40):
        image, text = augmenter(_two_color_image(), "a red area left of a blue area")
        if _left_is_red(image):
            assert text == "a red area left of a blue area"
        else:
            assert text == "a red area right of a blue area"
            flips += 1
    assert 5 < flips < 35


def test_augmenter_skips_flip_for_verb_left():
    augmenter = Augmenter(seed=2, min_scale=1.0, max_rotation=0.0, flip_probability=1.0)
    for _ in range(10):
        image, text = augmenter(_two_color_image(), "the red team has left the blue team")
        assert _left_is_red(image)
        assert text == "the red team has left the blue team"


def test_augmenter_deterministic_per_seed():
    image = _two_color_image()
    first = [Augmenter(seed=4)(image, "left")[0].tobytes() for _ in range(2)]
    assert first[0] == first[1]
    assert Augmenter(seed=5)(image, "left")[0].tobytes() != first[0]


def test_augmenter_keeps_hue():
    augmenter = Augmenter(seed=3, min_scale=1.0, max_rotation=0.0, flip_probability=0.0)
    for _ in range(20):
        image, _ = augmenter(Image.new("RGB", (32, 32), (200, 40, 40)), "a red square")
        red, green, blue = image.getpixel((16, 16))
        assert red > green
        assert red > blue


def test_mirror_caption_cases():
    cases = {
        "a cat on the Left of a dog": "a cat on the Right of a dog",
        "the leftmost boy raises his right hand": "the rightmost boy raises his left hand",
        "leftover pizza": "leftover pizza",
        "a man walking right now": None,
        "she has left the room": None,
        "a dog": "a dog",
    }
    for text, expected in cases.items():
        assert mirror_caption(text) == expected, text


def test_augmenter_rejects_bad_options():
    with pytest.raises(ConfigError, match="scale"):
        Augmenter(min_scale=0.0)
    with pytest.raises(ConfigError, match="brightness"):
        Augmenter(brightness=1.5)


# CLI


def _run_cli(*args: str):
    from typer.testing import CliRunner

    from edgemm.cli.main import app

    return CliRunner().invoke(app, list(args))


def test_cli_synth_info_import(tmp_path: Path, captions_folder: Path):
    out = tmp_path / "scenes"
    result = _run_cli("data", "synth", str(out), "--n", "12", "--seed", "1", "--image-size", "48")
    assert result.exit_code == 0, result.output
    assert len(load_dataset(out)) == 12

    json_path = tmp_path / "info.json"
    result = _run_cli("data", "info", str(out), "--rows", "2", "--json", str(json_path))
    assert result.exit_code == 0, result.output
    assert "images/000000.png" in result.output
    counts = {row["split"]: row["records"] for row in json.loads(json_path.read_text())["splits"]}
    assert counts == {"dev": 2, "train": 10, "all": 12}

    imported = tmp_path / "imported"
    result = _run_cli("data", "import-captions", str(captions_folder / "captions.csv"), "--out", str(imported))
    assert result.exit_code == 0, result.output
    assert len(load_dataset(imported)) == 8


def test_cli_data_error_is_one_line(tmp_path: Path):
    result = _run_cli("data", "info", str(tmp_path / "missing"))
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1
    assert lines[0].startswith("error:")
    assert "missing" in lines[0]
    assert "Traceback" not in result.output


def test_cli_help_for_each_command():
    for command in ("synth", "import-captions", "info"):
        result = _run_cli("data", command, "--help")
        assert result.exit_code == 0, command
        assert "Usage" in result.output


# Torch datasets


@pytest.fixture()
def preprocessor(tmp_path: Path):
    from edgemm.data.synthetic import caption_words
    from edgemm.runtime.preprocess import Preprocessor
    from edgemm.runtime.spec import ImageSpec, InputSpec

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *caption_words()]) + "\n", encoding="utf-8")
    return Preprocessor(InputSpec(image=ImageSpec(resize=40, crop=32)), vocab)


def test_pair_dataset_matches_preprocessor(tmp_path: Path, preprocessor):
    import numpy as np
    import torch
    from torch.utils.data import DataLoader

    from edgemm.data.synthetic import generate_scenes
    from edgemm.data.torch_data import PairDataset

    records = make_matching_pairs(generate_scenes(tmp_path / "scenes", 6, image_size=48), seed=0)
    dataset = PairDataset(records, preprocessor)
    batch = next(iter(DataLoader(dataset, batch_size=5, collate_fn=dataset.collate)))

    expected_text = preprocessor.texts([record.text for record in records[:5]], padding="longest")
    expected_pixels = preprocessor.images([record.image for record in records[:5]])["pixel_values"]
    assert batch["input_ids"].dtype == torch.int64
    assert np.array_equal(batch["input_ids"].numpy(), expected_text["input_ids"])
    assert np.array_equal(batch["attention_mask"].numpy(), expected_text["attention_mask"])
    assert np.array_equal(batch["pixel_values"].numpy(), expected_pixels)
    assert batch["pixel_values"].shape == (5, 3, 32, 32)
    assert batch["label"].tolist() == [record.label for record in records[:5]]


def test_pair_dataset_with_augmenter(tmp_path: Path, preprocessor):
    from edgemm.data.synthetic import generate_scenes
    from edgemm.data.torch_data import PairDataset

    records = generate_scenes(tmp_path / "scenes", 4, image_size=48)
    plain = PairDataset(records, preprocessor)
    augmented = PairDataset(records, preprocessor, augment=Augmenter(seed=0))
    item = augmented[0]
    assert item["pixel_values"].shape == (3, 32, 32)
    assert item["label"].item() == 1
    assert not bool((item["pixel_values"] == plain[0]["pixel_values"]).all())

    from torch.utils.data import DataLoader

    loader = DataLoader(
        augmented, batch_size=2, num_workers=1, worker_init_fn=PairDataset.seed_worker, collate_fn=augmented.collate
    )
    assert next(iter(loader))["pixel_values"].shape == (2, 3, 32, 32)
    with pytest.raises(DataError):
        PairDataset([], preprocessor)


def test_load_from_file_paths(jsonl_dataset: Path, captions_folder: Path):
    assert load_dataset(jsonl_dataset / "records.jsonl") == load_dataset(jsonl_dataset)
    assert load_dataset(captions_folder / "captions.csv") == load_dataset(captions_folder)
    other = jsonl_dataset / "notes.txt"
    other.write_text("hello")
    with pytest.raises(DataError, match="notes.txt"):
        load_dataset(other)


def test_csv_with_byte_order_mark(captions_folder: Path):
    path = captions_folder / "captions.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(load_dataset(captions_folder)) == 8


def test_non_utf8_file_is_data_error(captions_folder: Path):
    path = captions_folder / "captions.csv"
    path.write_bytes(path.read_bytes() + "0.jpg,caf\xe9 latte,train\n".encode("latin-1"))
    with pytest.raises(DataError) as info:
        load_dataset(captions_folder)
    assert "UTF-8" in str(info.value)
    assert "captions.csv" in str(info.value)
