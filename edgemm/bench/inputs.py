"""Real benchmark inputs: text-image pairs from a dataset folder or a package's own samples."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgemm.errors import PackageError

logger = logging.getLogger(__name__)

# Pairs read from a dataset: enough for distinct batches at batch size 8 without reading thousands.
DEFAULT_MAX_PAIRS = 64


@dataclass(frozen=True)
class BenchInputs:
    """Text-image pairs for timed runs.

    Images are kept as encoded file bytes (JPEG, PNG), so end-to-end runs include decoding but
    not disk reads.
    """

    texts: list[str]
    images: list[bytes]
    source: dict[str, Any]

    def __len__(self) -> int:
        return len(self.texts)

    def batches(self, batch_size: int, max_batches: int = 8) -> list[tuple[list[str], list[bytes]]]:
        """Split the pairs into up to `max_batches` batches, reusing pairs cyclically when there are too few."""
        count = max(1, min(max_batches, len(self) // batch_size))
        batches = []
        for batch_index in range(count):
            indices = [(batch_index * batch_size + offset) % len(self) for offset in range(batch_size)]
            batches.append(([self.texts[i] for i in indices], [self.images[i] for i in indices]))
        return batches


def load_dataset_inputs(folder: Path, max_pairs: int = DEFAULT_MAX_PAIRS) -> BenchInputs:
    """Read up to `max_pairs` text-image pairs from a dataset folder, one per distinct image first.

    Accepts every layout `edgemm.data.records.load_dataset` reads (records.jsonl, records.csv,
    captions.csv with images/) and raises its `DataError` for a missing file or image.
    """
    from edgemm.data.records import load_dataset

    folder = Path(folder)
    records = load_dataset(folder)
    seen_images: set[Path] = set()
    first_per_image, others = [], []
    for record in records:
        (others if record.image in seen_images else first_per_image).append(record)
        seen_images.add(record.image)
    chosen = (first_per_image + others)[:max_pairs]
    return BenchInputs(
        texts=[record.text for record in chosen],
        images=[record.image.read_bytes() for record in chosen],
        source={"kind": "dataset", "path": str(folder), "pairs": len(chosen)},
    )


def load_sample_inputs(manifest: Any) -> BenchInputs:
    """Read the sample texts and images that a model package carries (`samples` in its manifest).

    `manifest` is an `edgemm.runtime.manifest.Manifest`. Texts and images are paired in order
    and the shorter list is reused cyclically. Raises `PackageError` when the package has no
    sample texts or images.
    """
    samples = manifest.samples or {}
    texts = [str(text) for text in samples.get("texts", [])]
    image_names = list(samples.get("images", []))
    if not texts or not image_names:
        raise PackageError(
            f"Model package {manifest.package_dir} has no sample texts and images in its manifest.",
            "Pass --dataset DIR with records.jsonl or captions.csv to benchmark on real inputs.",
        )
    images = [manifest.path(name).read_bytes() for name in image_names]
    count = max(len(texts), len(images))
    return BenchInputs(
        texts=[texts[i % len(texts)] for i in range(count)],
        images=[images[i % len(images)] for i in range(count)],
        source={"kind": "package_samples", "path": str(manifest.package_dir), "pairs": count},
    )
