"""Evaluation of trained checkpoints on a dataset split, and of the image tower on ImageNet photos."""

from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from edgemm.data.matching import make_matching_pairs
from edgemm.data.records import load_dataset, require_columns
from edgemm.errors import CheckpointError, DataError
from edgemm.io import resolve_inside
from edgemm.training import metrics, modeling
from edgemm.training.features import compute_features, load_images
from edgemm.training.scoring import FeatureTable, match_scores, matching_metrics, retrieval_metrics

logger = logging.getLogger(__name__)

# Called as progress(stage, done, total) with stage "text" or "image".
ProgressCallback = Callable[[str, int, int], None]

# The seed of the dev matching pairs, fixed so every evaluation of a split scores the same pairs.
EVALUATION_PAIRS_SEED = 0

IMAGENET_LABELS_CSV = "labels.csv"


def evaluate_checkpoint(
    checkpoint: Path | str,
    dataset_folder: Path | str,
    split: str = "dev",
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    hard_negative_fraction: float = 0.5,
) -> dict:
    """Score a checkpoint on one split of a dataset and return its metrics as a JSON-ready dict.

    Fusion models: when the split has labelled pairs (some records with label 0) they are scored
    as given, otherwise 1:1 pairs of true and mismatched captions are built with a fixed seed.
    The result has ROC-AUC, accuracy at the checkpoint's `decision_threshold`, and the accuracy
    at the best threshold for these very labels under `oracle_*` (an upper bound, not an estimate).
    Dual encoders: recall@1/5/10 text->image and image->text over the unique images of the split,
    and the same matching metrics on cosine similarity.
    """
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    dataset_folder = Path(dataset_folder)
    bundle = modeling.load_model(checkpoint)
    model = bundle.model
    threshold = bundle.decision_threshold

    records = load_dataset(dataset_folder, split=split)
    if any(record.label == 0 for record in records):
        pairs = records
        pairs_source = "labelled records"
    else:
        pairs = make_matching_pairs(records, seed=EVALUATION_PAIRS_SEED, hard_negative_fraction=hard_negative_fraction)
        pairs_source = f"1:1 true and mismatched captions (seed {EVALUATION_PAIRS_SEED})"
    table = FeatureTable.from_records(pairs)

    features = compute_features(
        model,
        table.texts,
        table.images,
        bundle.input_spec,
        bundle.vocab_path,
        cache_dir=cache_dir,
        progress=progress,
    )
    text_indices, image_indices, labels = table.pair_indices(pairs)
    scores = match_scores(bundle, features, text_indices, image_indices)
    result_metrics = matching_metrics(scores, labels.numpy(), threshold)
    if bundle.is_dual_encoder:
        result_metrics.update(retrieval_metrics(model, features, table, records))

    return {
        "checkpoint": str(checkpoint),
        "dataset": str(dataset_folder),
        "split": split,
        "architecture": bundle.architecture,
        "pairs": pairs_source,
        "decision_threshold": threshold,
        "metrics": result_metrics,
        "seconds": round(time.perf_counter() - started, 3),
    }


def read_imagenet_labels(folder: Path) -> list[tuple[Path, int]]:
    """Read `labels.csv` (image,class_index,wnid,class_name) of an ImageNet sample folder.

    Image paths are relative to `images/` when that folder exists, else to `folder`.
    """
    folder = Path(folder)
    labels_path = folder / IMAGENET_LABELS_CSV
    if not labels_path.is_file():
        raise DataError(f"{IMAGENET_LABELS_CSV} not found in {folder}.", "Pass a folder with labels.csv (image,class_index,wnid,class_name) and images/.")
    images_root = folder / "images" if (folder / "images").is_dir() else folder

    samples = []
    with labels_path.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        require_columns(reader.fieldnames, ("image", "class_index"), labels_path)
        # Line 1 is the header, so the first data row is line 2.
        for line_number, row in enumerate(reader, start=2):
            image = (row["image"] or "").strip()
            index = (row["class_index"] or "").strip()
            if not image:
                raise DataError(f"Field 'image' is empty on line {line_number} of {labels_path}.", "Give every row an image file name.")
            if not index.isdigit():
                raise DataError(
                    f"Field 'class_index' on line {line_number} of {labels_path} is {index!r}, not a class number.",
                    "Use the ImageNet-1k class index, 0 to 999.",
                )
            samples.append((resolve_inside(images_root, image), int(index)))
    if not samples:
        raise DataError(f"{labels_path} lists no images.", "Add one row per image.")
    return samples


@torch.no_grad()
def evaluate_imagenet(
    imagenet_folder: Path | str,
    image_tower: str = "efficientnet-lite0",
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
) -> dict:
    """Measure top-1 accuracy of a pretrained image tower's own ImageNet classifier, with the tower's preprocessing."""
    from edgemm.models.image import ImageTower
    from edgemm.runtime.image import ImageTransform

    started = time.perf_counter()
    samples = read_imagenet_labels(Path(imagenet_folder))
    tower = ImageTower.from_pretrained(image_tower, with_classifier=True).eval()
    image_spec = tower.config.image_spec()
    transform = ImageTransform(image_spec)

    logits = []
    for start in range(0, len(samples), batch_size):
        paths = [path for path, _ in samples[start : start + batch_size]]
        logits.append(tower.classify(load_images(transform, paths)).numpy())
        if progress is not None:
            progress("image", min(start + batch_size, len(samples)), len(samples))
    logits = np.concatenate(logits)
    class_indices = np.array([index for _, index in samples])
    if class_indices.max() >= logits.shape[1]:
        raise DataError(
            f"Class index {int(class_indices.max())} in {imagenet_folder} is out of range for {logits.shape[1]} classes.",
            "Use ImageNet-1k class indices, 0 to 999.",
        )

    return {
        "imagenet_folder": str(imagenet_folder),
        "image_tower": image_tower,
        "images": len(samples),
        "top1": metrics.top1_accuracy(logits, class_indices),
        "image_spec": {"resize": image_spec.resize, "crop": image_spec.crop, "mean": list(image_spec.mean), "std": list(image_spec.std)},
        "seconds": round(time.perf_counter() - started, 3),
    }
