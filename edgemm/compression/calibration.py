"""Calibration sets for static INT8 quantization: TOML definitions and a streaming reader.

A calibration set definition (see `calibration/*.toml`) sets which records to take, how many,
and how to batch and pad them. `EdgemmCalibrationReader` turns those records into ONNX feed
dicts one batch at a time with the runtime's tokenizer and image transform, so the ranges are
computed on exactly the arrays the device will see.
"""

from __future__ import annotations

import logging
import random
import tomllib
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader
from PIL import Image, UnidentifiedImageError

from edgemm.data.records import Record, load_dataset
from edgemm.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SOURCES = ("builtin", "dataset")
SELECTIONS = ("first", "random", "stratified")
TEXT_PADDINGS = ("max_length", "longest")

TEXT_INPUTS = ("input_ids", "attention_mask")
IMAGE_INPUT = "pixel_values"

# Type of the text encoder: the runtime's `WordPieceTokenizer.__call__(texts, padding, max_length)`.
TextEncoder = Callable[..., dict[str, np.ndarray]]
# Type of the image encoder: the runtime's `ImageTransform.__call__(images) -> float32 [B, 3, H, W]`.
ImageEncoder = Callable[[Sequence[Path]], np.ndarray]


@dataclass(frozen=True)
class CalibrationSet:
    """Definition of a calibration set: the records to take, their number, padding and batching.

    `text_padding="max_length"` pads every text to `max_length` tokens (default: the model's
    `TextSpec.max_length`). Keep it: the Entropy and Percentile calibrators of onnxruntime
    stack the activations of all batches and fail when their sequence lengths differ.
    """

    source: str = "dataset"
    path: Path | None = None
    split: str | None = "train"
    size: int = 128
    selection: str = "random"
    seed: int = 0
    text_padding: str = "max_length"
    max_length: int | None = None
    batch_size: int = 8
    definition: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = f" in {self.definition}" if self.definition else ""
        _check_choice("source", self.source, SOURCES, where)
        _check_choice("selection", self.selection, SELECTIONS, where)
        _check_choice("text_padding", self.text_padding, TEXT_PADDINGS, where)
        for name in ("size", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"Calibration {name}={value!r}{where} is invalid.", "Use a positive integer.")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length < 3):
            raise ConfigError(
                f"Calibration max_length={self.max_length!r}{where} is invalid.",
                "Use an integer of 3 or more ([CLS] and [SEP] take 2 tokens), or leave it out to use the model's.",
            )
        if self.source == "dataset" and self.path is None:
            raise ConfigError(
                f"Calibration source 'dataset'{where} has no path.",
                "Set path to a dataset folder (records.jsonl, records.csv or captions.csv).",
            )

    @classmethod
    def from_toml(cls, path: Path | str) -> "CalibrationSet":
        """Load a definition from the `[calibration]` table of a TOML file.

        A relative `path` in the file resolves against the file's folder. Raises `ConfigError`
        for a missing file, invalid TOML, an unknown table or key, or an invalid value.
        """
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"Calibration definition {path} not found.", "Pass a TOML file such as calibration/builtin.toml."
            )
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ConfigError(f"Calibration definition {path} is not valid TOML: {error}.") from error

        unknown_tables = sorted(set(data) - {"calibration"})
        if unknown_tables or "calibration" not in data:
            found = ", ".join(unknown_tables) or "none"
            raise ConfigError(
                f"Calibration definition {path} must contain only a [calibration] table (other tables: {found}).",
                "Put every setting under [calibration].",
            )
        return cls.from_dict(data["calibration"], base_dir=path.parent, definition=path)

    @classmethod
    def from_dict(
        cls, values: dict[str, Any], base_dir: Path | None = None, definition: Path | None = None
    ) -> "CalibrationSet":
        """Build a definition from a dict of settings; raise `ConfigError` naming an unknown key."""
        valid = sorted(f.name for f in fields(cls) if f.name != "definition")
        where = f" in {definition}" if definition else ""
        for key in values:
            if key not in valid:
                raise ConfigError(
                    f"Unknown calibration key {key!r}{where}.", f"Valid keys: {', '.join(valid)}."
                )

        settings = dict(values)
        if settings.get("path") is not None:
            data_path = Path(settings["path"])
            if not data_path.is_absolute() and base_dir is not None:
                data_path = base_dir / data_path
            settings["path"] = data_path
        return cls(**settings, definition=definition)

    def to_dict(self) -> dict[str, Any]:
        """Return the manifest record of this set (`compression.calibration`)."""
        return {
            "source": self.source,
            "path": None if self.path is None else str(self.path),
            "split": self.split,
            "size": self.size,
            "selection": self.selection,
            "seed": self.seed,
            "text_padding": self.text_padding,
            "max_length": self.max_length,
            "batch_size": self.batch_size,
            "definition": None if self.definition is None else str(self.definition),
        }

    def select_records(self, records: Sequence[Record] | None = None, check_images: bool = True) -> list[Record]:
        """Choose up to `size` records in selection order, skipping those whose image fails to load.

        `records` defaults to the records of `path` (source "dataset") or of a generated set of
        synthetic scenes (source "builtin"). `check_images=False` skips decoding, for text-only
        graphs. Raises `DataError` when no usable record remains, with the count and reasons.
        """
        if records is None:
            records = self._load_records()
        else:
            records = list(records)
        if self.split is not None:
            kept = [r for r in records if r.split in (None, self.split)]
            if not kept:
                splits = sorted({str(r.split) for r in records})
                raise DataError(
                    f"No calibration records have split {self.split!r} (splits found: {', '.join(splits)}).",
                    "Set split to one of them, or leave it out to use every record.",
                )
            records = kept
        if not records:
            raise DataError(f"The calibration source {self._source_name()} has no records.", "Add records.")

        ordered = order_records(records, self.selection, self.seed)
        chosen: list[Record] = []
        skipped: Counter[str] = Counter()
        checked: dict[Path, str | None] = {}
        for record in ordered:
            if len(chosen) == self.size:
                break
            if check_images:
                if record.image not in checked:
                    checked[record.image] = image_load_error(record.image)
                problem = checked[record.image]
                if problem is not None:
                    skipped[problem] += 1
                    continue
            chosen.append(record)

        reasons = "; ".join(f"{count} x {reason}" for reason, count in skipped.most_common(3))
        if not chosen:
            raise DataError(
                f"No usable calibration samples in {self._source_name()}: all {sum(skipped.values())} "
                f"records were skipped ({reasons}).",
                "Fix or replace the images, or point path at another dataset.",
            )
        if skipped:
            logger.warning("Skipped %d calibration records: %s", sum(skipped.values()), reasons)
        if len(chosen) < self.size:
            logger.warning("Calibration set has %d samples, fewer than size=%d", len(chosen), self.size)
        return chosen

    def _load_records(self) -> list[Record]:
        if self.source == "dataset":
            return load_dataset(self.path)
        return _builtin_records(self)

    def _source_name(self) -> str:
        return str(self.path) if self.source == "dataset" else "the built-in synthetic scenes"


def _check_choice(name: str, value: Any, choices: Sequence[str], where: str) -> None:
    if value not in choices:
        raise ConfigError(
            f"Calibration {name}={value!r}{where} is invalid.", f"Use one of: {', '.join(choices)}."
        )


def _builtin_records(calibration: CalibrationSet) -> list[Record]:
    """Return the synthetic scenes of source "builtin", generated once into `path` (or a cache folder)."""
    from edgemm.data.synthetic import generate_scenes

    folder = calibration.path
    if folder is None:
        folder = Path.home() / ".cache" / "edgemm" / f"calibration-scenes-{calibration.size}-seed{calibration.seed}"
    folder = Path(folder)
    if not (folder / "records.jsonl").is_file():
        # Every generated scene is in the train split, so the definition's split finds them all.
        generate_scenes(folder, calibration.size, seed=calibration.seed, splits=((calibration.split or "train", 1.0),))
    return load_dataset(folder)


def order_records(records: Sequence[Record], selection: str, seed: int) -> list[Record]:
    """Return every record in the order the selection takes them.

    "first" keeps file order. "random" shuffles with `seed`. "stratified" shuffles each label
    group and interleaves the groups so that any prefix keeps the label proportions.
    """
    if selection == "first":
        return list(records)
    rng = random.Random(seed)
    if selection == "random":
        shuffled = list(records)
        rng.shuffle(shuffled)
        return shuffled

    groups: dict[Any, list[Record]] = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    keyed = []
    for members in groups.values():
        rng.shuffle(members)
        for rank, record in enumerate(members):
            # The midpoint rank spreads each group evenly over the ordering.
            keyed.append(((rank + 0.5) / len(members), rng.random(), record))
    keyed.sort(key=lambda item: (item[0], item[1]))
    return [record for _, _, record in keyed]


def image_load_error(path: Path) -> str | None:
    """Return why an image cannot be decoded by Pillow, or None when it loads."""
    try:
        with Image.open(path) as image:
            image.load()
    except FileNotFoundError:
        return "image file not found"
    except (UnidentifiedImageError, OSError, ValueError) as error:
        return f"image cannot be decoded ({type(error).__name__})"
    return None


class EdgemmCalibrationReader(CalibrationDataReader):
    """Feed dicts for onnxruntime calibration, made one batch at a time from records.

    Only the graph's inputs among `input_ids`, `attention_mask` and `pixel_values` are built,
    so a text-only graph never decodes an image. Arrays for a batch exist only while that
    batch is being calibrated. `__len__` and `set_range` let onnxruntime calibrate in strides
    (extra option `CalibStridedMinMax`), which bounds the activations it keeps in memory.
    """

    def __init__(
        self,
        records: Sequence[Record],
        input_names: Sequence[str],
        encode_text: TextEncoder | None = None,
        encode_images: ImageEncoder | None = None,
        batch_size: int = 8,
        text_padding: str = "max_length",
        max_length: int | None = None,
    ):
        if not records:
            raise DataError("The calibration reader got no records.", "Select at least one calibration sample.")
        _check_choice("text_padding", text_padding, TEXT_PADDINGS, "")
        unknown = [name for name in input_names if name not in (*TEXT_INPUTS, IMAGE_INPUT)]
        if unknown:
            raise ConfigError(
                f"Graph input {unknown[0]!r} has no calibration data.",
                f"edgemm graphs take {', '.join((*TEXT_INPUTS, IMAGE_INPUT))}.",
            )
        self.needs_text = any(name in TEXT_INPUTS for name in input_names)
        self.needs_image = IMAGE_INPUT in input_names
        if self.needs_text and encode_text is None:
            raise ConfigError("The graph takes text inputs but no text encoder was given.", "Pass encode_text.")
        if self.needs_image and encode_images is None:
            raise ConfigError("The graph takes pixel_values but no image encoder was given.", "Pass encode_images.")

        self.records = list(records)
        self.input_names = tuple(input_names)
        self.encode_text = encode_text
        self.encode_images = encode_images
        self.batch_size = batch_size
        self.text_padding = text_padding
        self.max_length = max_length
        self._start = 0
        self._end = self.batch_count
        self._batches = self._generate()

    @classmethod
    def from_spec(
        cls,
        calibration: CalibrationSet,
        input_names: Sequence[str],
        spec: Any,
        vocab_path: Path | None,
        records: Sequence[Record] | None = None,
    ) -> "EdgemmCalibrationReader":
        """Build a reader with the runtime's preprocessing for an `InputSpec` and vocabulary."""
        needs_image = IMAGE_INPUT in input_names
        chosen = calibration.select_records(records, check_images=needs_image)
        encode_text, encode_images = runtime_encoders(spec, vocab_path, input_names)
        return cls(
            chosen,
            input_names,
            encode_text=encode_text,
            encode_images=encode_images,
            batch_size=calibration.batch_size,
            text_padding=calibration.text_padding,
            max_length=calibration.max_length,
        )

    @property
    def sample_count(self) -> int:
        return len(self.records)

    @property
    def batch_count(self) -> int:
        return -(-len(self.records) // self.batch_size)

    def __len__(self) -> int:
        return self.batch_count

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)

    def rewind(self) -> None:
        self._start = 0
        self._end = self.batch_count
        self._batches = self._generate()

    def set_range(self, start_index: int, end_index: int) -> None:
        """Restrict the next pass to batches `start_index` up to `end_index` (exclusive)."""
        self._start = max(0, start_index)
        self._end = min(self.batch_count, end_index)
        self._batches = self._generate()

    def first_batch(self) -> dict[str, np.ndarray]:
        """Return the first batch without changing the reader's position."""
        return next(self._generate(0, 1))

    def _generate(self, start: int | None = None, end: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        start = self._start if start is None else start
        end = self._end if end is None else end
        for index in range(start, end):
            batch = self.records[index * self.batch_size : (index + 1) * self.batch_size]
            yield self._make_feeds(batch)

    def _make_feeds(self, batch: Sequence[Record]) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        if self.needs_text:
            encoded = self.encode_text(
                [record.text for record in batch], padding=self.text_padding, max_length=self.max_length
            )
            for name in TEXT_INPUTS:
                if name in self.input_names:
                    feeds[name] = np.ascontiguousarray(encoded[name], dtype=np.int64)
        if self.needs_image:
            feeds[IMAGE_INPUT] = np.ascontiguousarray(self.encode_images([r.image for r in batch]), dtype=np.float32)
        return feeds


def runtime_encoders(
    spec: Any, vocab_path: Path | None, input_names: Sequence[str]
) -> tuple[TextEncoder | None, ImageEncoder | None]:
    """Return the text and image encoders of the runtime's `Preprocessor` that the graph needs.

    A graph without text inputs needs no vocabulary, so it gets the runtime's `ImageTransform`
    alone (the one `Preprocessor` uses).
    """
    needs_text = any(name in TEXT_INPUTS for name in input_names)
    needs_image = IMAGE_INPUT in input_names
    if not needs_text:
        from edgemm.runtime.image import ImageTransform

        return None, ImageTransform(spec.image) if needs_image else None

    from edgemm.runtime.preprocess import Preprocessor

    if vocab_path is None:
        raise ConfigError("The graph takes text but no vocabulary was given.", "Pass the model's vocab.txt.")
    preprocessor = Preprocessor(spec, Path(vocab_path))
    return preprocessor.tokenizer, preprocessor.image_transform if needs_image else None


def graph_input_names(onnx_path: Path | str) -> list[str]:
    """Return the input names of an ONNX graph, without its initializers."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    initializers = {init.name for init in model.graph.initializer}
    return [value.name for value in model.graph.input if value.name not in initializers]
