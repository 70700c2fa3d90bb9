"""Captions CSV files (`image,caption[,split]`) and their import into dataset folders. Torch-free."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path

from edgemm.data.records import (
    CAPTIONS_CSV,
    Record,
    clean_text,
    parse_split,
    resolve_image,
    check_images_exist,
    open_text_file,
    require_columns,
    write_dataset,
)
from edgemm.errors import DataError
from edgemm.io import atomic_directory

logger = logging.getLogger(__name__)


def default_images_dir(csv_path: Path) -> Path:
    """Return `images/` beside the CSV file when it exists, else the CSV file's folder."""
    images = Path(csv_path).parent / "images"
    return images if images.is_dir() else Path(csv_path).parent


def load_captions_csv(csv_path: Path | str, images_dir: Path | str | None = None) -> list[Record]:
    """Read a captions CSV into records, one per caption, with absolute image paths.

    Columns: `image` (a path relative to `images_dir`), `caption` (or `text`) and an optional
    `split`. `images_dir` defaults to `images/` beside the CSV file. Raises `DataError` for a
    missing file, column or image and for an empty caption, naming the line.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise DataError(f"Captions file {csv_path} not found.", f"Pass the path of a CSV file such as {CAPTIONS_CSV}.")
    images_root = Path(images_dir) if images_dir is not None else default_images_dir(csv_path)
    if not images_root.is_dir():
        raise DataError(f"Images folder {images_root} not found.", "Pass the folder that contains the images.")

    with open_text_file(csv_path) as handle:
        reader = csv.DictReader(handle)
        columns = [name for name in (reader.fieldnames or []) if name is not None]
        text_column = "text" if "text" in columns and "caption" not in columns else "caption"
        require_columns(columns, ("image", text_column), csv_path)

        records = []
        # Line 1 is the header, so the first data row is line 2.
        for line_number, row in enumerate(reader, start=2):
            where = f"line {line_number} of {csv_path}"
            image = (row.get("image") or "").strip()
            if not image:
                raise DataError(f"Field 'image' is empty on {where}.", f"Give the image path relative to {images_root}.")
            records.append(
                Record(
                    image=resolve_image(images_root, image, where),
                    text=clean_text(row.get(text_column), text_column, where),
                    split=parse_split(row.get("split"), where),
                )
            )

    if not records:
        raise DataError(f"Captions file {csv_path} has a header but no rows.", "Add one row per caption.")
    check_images_exist(records, csv_path, f"Check the image paths, which are relative to {images_root}.")
    logger.info("Read %d captions of %d images from %s", len(records), len({r.image for r in records}), csv_path)
    return records


def import_captions(
    csv_path: Path | str,
    out_folder: Path | str,
    images_dir: Path | str | None = None,
    copy_images: bool = False,
    overwrite: bool = False,
) -> Path:
    """Turn a captions CSV into a dataset folder with `records.jsonl` and `images/`; return the folder.

    Images keep their path relative to `images_dir`. With `copy_images=False` they are hard-linked,
    which costs no disk space, and copied when the output is on another file system. With
    `copy_images=True` they are always copied. The folder appears only once complete.
    """
    records = load_captions_csv(csv_path, images_dir)
    images_root = (Path(images_dir) if images_dir is not None else default_images_dir(Path(csv_path))).resolve()
    out_folder = Path(out_folder)

    with atomic_directory(out_folder, overwrite=overwrite) as staging:
        placed: dict[Path, Path] = {}
        for source in sorted({record.image for record in records}):
            relative = source.relative_to(images_root)
            target = staging / "images" / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            _place_file(source, target, copy_images)
            placed[source] = Path("images") / relative

        imported = [
            Record(image=placed[record.image], text=record.text, label=record.label, split=record.split)
            for record in records
        ]
        write_dataset(staging, imported)

    logger.info("Imported %d captions of %d images into %s", len(records), len(placed), out_folder)
    return out_folder


def _place_file(source: Path, target: Path, copy: bool) -> None:
    if not copy:
        try:
            os.link(source, target)
            return
        except OSError as error:
            logger.debug("Hard link %s -> %s failed (%s); copying instead", source, target, error)
    shutil.copy2(source, target)
