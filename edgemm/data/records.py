"""Dataset records: one image, one text and optional label, split and hard negatives.

A dataset is a folder with `records.jsonl` or `records.csv` whose `image` paths are relative to
the folder. A folder that contains only a captions file (`captions.csv` with columns
`image,caption[,split]` and the images under `images/`) loads as a dataset too, and so does
the path of any one of these files. Torch-free.
"""

from __future__ import annotations

import csv
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, TextIO

from edgemm.errors import DataError, EdgemmError
from edgemm.io import atomic_write_text, resolve_inside

logger = logging.getLogger(__name__)

RECORDS_JSONL = "records.jsonl"
RECORDS_CSV = "records.csv"
CAPTIONS_CSV = "captions.csv"

# Separator of hard-negative captions inside the optional `negatives` column of records.csv.
CSV_NEGATIVES_SEPARATOR = "|"


@dataclass(frozen=True)
class Record:
    """One image-text example.

    `image` is an absolute path once loaded. `label` is 1 when `text` describes the image, 0
    when it does not, and None for plain captions (which describe their image). `negatives` are
    hard-negative captions: texts that are close to the truth but false for this image.
    """

    image: Path
    text: str
    label: int | None = None
    split: str | None = None
    negatives: tuple[str, ...] = field(default=())


def load_dataset(path: Path | str, split: str | None = None, check_images: bool = False) -> list[Record]:
    """Load the records of a dataset folder (or of one records or captions file), keeping only `split` when given.

    A folder is read from `records.jsonl`, else `records.csv`, else `captions.csv` (images under
    `images/`). A `.jsonl` file is read as records; a `.csv` file as captions when it has a
    `caption` column, else as records. Every image must exist; `check_images=True` also
    decodes each one with Pillow. Raises `DataError` naming the file, line or column at fault.
    """
    path = Path(path)
    if path.is_file():
        records = _read_file(path)
    elif path.is_dir():
        records = _read_folder(path)
    else:
        raise DataError(
            f"Dataset folder {path} not found.",
            f"Pass a folder that contains {RECORDS_JSONL}, {RECORDS_CSV} or {CAPTIONS_CSV}.",
        )

    if not records:
        raise DataError(f"Dataset {path} contains no records.", "Add at least one record.")
    if check_images:
        check_image_files(records)
    if split is not None:
        records = select_split(records, split, source=path)
    return records


def _read_folder(folder: Path) -> list[Record]:
    if (folder / RECORDS_JSONL).is_file():
        return read_records_jsonl(folder / RECORDS_JSONL)
    if (folder / RECORDS_CSV).is_file():
        return read_records_csv(folder / RECORDS_CSV)
    if (folder / CAPTIONS_CSV).is_file():
        from edgemm.data.captions import load_captions_csv

        return load_captions_csv(folder / CAPTIONS_CSV)
    raise DataError(
        f"No {RECORDS_JSONL}, {RECORDS_CSV} or {CAPTIONS_CSV} found in {folder}.",
        "Create one with `edgemm data import-captions` or `edgemm data synth`.",
    )


def _read_file(path: Path) -> list[Record]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return read_records_jsonl(path)
    if suffix == ".csv":
        with open_text_file(path) as handle:
            header = next(csv.reader(handle), [])
        if "caption" in header:
            from edgemm.data.captions import load_captions_csv

            return load_captions_csv(path)
        return read_records_csv(path)
    raise DataError(
        f"Dataset file {path} is neither .jsonl nor .csv.",
        f"Pass a dataset folder, a {RECORDS_JSONL} file or a CSV file.",
    )


def select_split(records: list[Record], split: str, source: Path | str = "the dataset") -> list[Record]:
    """Return the records of one split; raise `DataError` listing the splits found when it is empty."""
    selected = [record for record in records if record.split == split]
    if not selected:
        found = sorted({str(record.split) for record in records})
        raise DataError(
            f"Split {split!r} has no records in {source} (splits found: {', '.join(found)}).",
            "Pick one of the splits found.",
        )
    return selected


def read_records_jsonl(path: Path) -> list[Record]:
    """Parse a `records.jsonl` file; image paths resolve inside its folder."""
    path = Path(path)
    records = []
    with open_text_file(path) as handle:
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(
                    f"Line {line_number} of {path} is not valid JSON: {error.msg}.",
                    "Write one JSON object per line.",
                ) from error
            if not isinstance(row, dict):
                raise DataError(
                    f"Line {line_number} of {path} is a JSON {type(row).__name__}, not an object.",
                    'Write objects such as {"image": "images/a.jpg", "text": "..."}.',
                )
            records.append(_record_from_row(row, path, line_number))
    check_images_exist(records, path)
    return records


def read_records_csv(path: Path) -> list[Record]:
    """Parse a `records.csv` file (columns image,text[,label][,split][,negatives])."""
    path = Path(path)
    with open_text_file(path) as handle:
        reader = csv.DictReader(handle)
        require_columns(reader.fieldnames, ("image", "text"), path)
        records = []
        # Line 1 is the header, so the first data row is line 2.
        for line_number, row in enumerate(reader, start=2):
            row = dict(row)
            negatives = row.get("negatives") or ""
            row["negatives"] = [text for text in negatives.split(CSV_NEGATIVES_SEPARATOR) if text.strip()]
            records.append(_record_from_row(row, path, line_number))
    check_images_exist(records, path)
    return records


@contextmanager
def open_text_file(path: Path) -> Iterator[TextIO]:
    """Open a UTF-8 file for reading, skipping a byte-order mark as spreadsheet programs write one.

    Decoding and CSV syntax errors raised while the file is read become a `DataError` naming it.
    """
    try:
        with Path(path).open("r", encoding="utf-8-sig", newline="") as handle:
            yield handle
    except UnicodeDecodeError as error:
        raise DataError(f"File {path} is not valid UTF-8 text: {error}.", "Save it with UTF-8 encoding.") from error
    except csv.Error as error:
        raise DataError(f"File {path} is not valid CSV: {error}.", "Check the quoting of the rows.") from error


def require_columns(found: Iterable[str] | None, required: Iterable[str], path: Path) -> None:
    """Raise `DataError` naming the first missing column and listing the columns found."""
    found = [name for name in (found or []) if name is not None]
    for column in required:
        if column not in found:
            listed = ", ".join(found) if found else "none, the file is empty"
            raise DataError(
                f"Column {column!r} is missing from {path} (columns found: {listed}).",
                f"Add a header row that names the {column!r} column.",
            )


def _record_from_row(row: dict[str, Any], path: Path, line_number: int) -> Record:
    where = f"line {line_number} of {path}"
    for key in ("image", "text"):
        if key not in row:
            raise DataError(f"Field {key!r} is missing on {where}.", "Every record needs 'image' and 'text'.")

    image = row["image"]
    if not isinstance(image, str) or not image.strip():
        raise DataError(f"Field 'image' is empty on {where}.", "Give the image path relative to the dataset folder.")
    text = clean_text(row["text"], "text", where)
    negatives = _parse_negatives(row.get("negatives"), where)

    return Record(
        image=resolve_image(path.parent, image.strip(), where),
        text=text,
        label=_parse_label(row.get("label"), where),
        split=parse_split(row.get("split"), where),
        negatives=negatives,
    )


def clean_text(value: Any, name: str, where: str) -> str:
    """Collapse whitespace in a caption; raise `DataError` when it is empty or not a string."""
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise DataError(f"Field {name!r} on {where} is {value!r}, not a string.", "Write the caption as a string.")
    text = " ".join(value.split())
    if not text:
        raise DataError(f"Field {name!r} is empty on {where}.", "Give every record a non-empty caption or drop the row.")
    return text


def _parse_label(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise DataError(f"Field 'label' on {where} is {value!r}, not an integer.", "Use 1 for a match and 0 for a mismatch.")


def parse_split(value: Any, where: str) -> str | None:
    """Return the split name, or None when the field is absent or blank."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DataError(f"Field 'split' on {where} is {value!r}, not a string.", 'Use names such as "train" or "dev".')
    return value.strip() or None


def _parse_negatives(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DataError(
            f"Field 'negatives' on {where} is {type(value).__name__}, not a list.",
            'Write hard negatives as a list of captions, e.g. ["a blue circle"].',
        )
    return tuple(clean_text(item, "negatives", where) for item in value)


def resolve_image(root: Path, relative: str, where: str) -> Path:
    """Resolve an image path inside `root`; raise `DataError` when it escapes the folder."""
    try:
        return resolve_inside(root, relative)
    except EdgemmError as error:
        raise DataError(f"Image path {relative!r} on {where} points outside {root.resolve()}.", error.hint) from None


def check_images_exist(
    records: list[Record],
    source: Path,
    hint: str = "Check the image paths, which are relative to the folder of the records file.",
) -> None:
    """Raise `DataError` naming the first missing image and how many are missing."""
    missing = sorted({str(record.image) for record in records if not record.image.is_file()})
    if missing:
        others = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DataError(
            f"Image file {missing[0]}{others} listed in {source} not found.",
            hint,
        )


def check_image_files(records: list[Record]) -> None:
    """Decode each distinct image once with Pillow; raise `DataError` on the first that fails."""
    from PIL import Image, UnidentifiedImageError

    for path in sorted({record.image for record in records}):
        try:
            with Image.open(path) as image:
                image.load()
        except (OSError, UnidentifiedImageError, ValueError) as error:
            raise DataError(f"Failed to decode image file {path}: {error}.", "Replace or remove the file.") from error


def write_dataset(folder: Path | str, records: Iterable[Record], overwrite: bool = False) -> Path:
    """Write `records` as `folder/records.jsonl` atomically and return its path.

    Image paths are stored relative to `folder`. A relative `record.image` is taken relative to
    `folder`, and every image must lie inside it (copy or link images in first, as
    `import_captions` does). Raises `DataError` for an image outside the folder, empty text, or
    an existing `records.jsonl` unless `overwrite` is true.
    """
    folder = Path(folder)
    path = folder / RECORDS_JSONL
    if path.exists() and not overwrite:
        raise DataError(f"{path} already exists.", "Pass overwrite=True to replace it, or write to another folder.")
    root = folder.resolve()
    lines = []
    for index, record in enumerate(records):
        image = Path(record.image)
        absolute = (root / image).resolve() if not image.is_absolute() else image.resolve()
        if not absolute.is_relative_to(root):
            raise DataError(
                f"Image {record.image} of record {index} lies outside the dataset folder {root}.",
                "Copy or link the images into the folder first, e.g. with `edgemm data import-captions`.",
            )
        if not record.text.strip():
            raise DataError(f"Text of record {index} ({record.image}) is empty.", "Give every record a caption.")
        lines.append(json.dumps(record_to_dict(record, absolute.relative_to(root)), ensure_ascii=False))

    if not lines:
        raise DataError(f"No records to write to {folder}.", "Pass at least one record.")
    atomic_write_text(path, "\n".join(lines) + "\n")
    logger.debug("Wrote %d records to %s", len(lines), path)
    return path


def record_to_dict(record: Record, image: Path | str | None = None) -> dict[str, Any]:
    """Return the JSON form of a record, leaving out empty optional fields."""
    row: dict[str, Any] = {"image": Path(image if image is not None else record.image).as_posix(), "text": record.text}
    if record.label is not None:
        row["label"] = record.label
    if record.split is not None:
        row["split"] = record.split
    if record.negatives:
        row["negatives"] = list(record.negatives)
    return row
