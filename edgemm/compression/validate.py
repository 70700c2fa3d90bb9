"""Validate a compressed model package against the original PyTorch model.

Both sides see the same validation set, built with the runtime's own preprocessing.
- Fusion models get a fixed, seeded set of matching pairs: each caption with its image, and as
  many mismatched captions. The metrics are accuracy at the decision threshold and ROC-AUC.
- Dual encoders get the split's unique images and all their captions. The metrics are
  recall@1/5/10 in both directions.
Parity compares the package's outputs with the original's on the same inputs (decision
agreement and match-score difference for fusion models, embedding cosine for dual encoders).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgemm.data.matching import group_by_image, make_matching_pairs
from edgemm.data.records import Record
from edgemm.errors import AccuracyError
from edgemm.runtime.preprocess import Preprocessor
from edgemm.training import metrics

logger = logging.getLogger(__name__)

RECALL_KS = (1, 5, 10)
PAIR_SEED = 0

Progress = Callable[[int, int], None]


@dataclass
class ValidationSet:
    """Inputs shared by every model under comparison."""

    kind: str  # "fusion_classifier" or "dual_encoder"
    texts: list[str] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)  # fusion pairs: 1 match, 0 mismatch
    text_to_image: list[int] = field(default_factory=list)  # dual encoder: caption -> image index

    @property
    def size(self) -> int:
        return len(self.texts)


@dataclass
class ModelOutputs:
    """Outputs of one model on a `ValidationSet`."""

    match_scores: np.ndarray | None = None  # fusion: P(match) per pair
    text_embeds: np.ndarray | None = None  # dual encoder
    image_embeds: np.ndarray | None = None


@dataclass
class Limits:
    max_accuracy_drop: float = 1.0  # points (percent)
    max_auc_drop: float = 0.01
    max_recall_drop: float = 2.0  # points (percent), on text-to-image recall@5


@dataclass
class ValidationReport:
    kind: str
    num_samples: int
    before: dict[str, float]
    after: dict[str, float]
    drop: dict[str, float]
    parity: dict[str, float]
    limits: dict[str, float]
    passed: bool
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_validation_set(records: Sequence[Record], kind: str, max_pairs: int | None = None) -> ValidationSet:
    """Build the fixed validation inputs for a model kind from caption records of one split."""
    if kind == "dual_encoder":
        groups = group_by_image(records)
        images = list(groups)
        texts, text_to_image = [], []
        for index, image in enumerate(images):
            for caption in groups[image]:
                texts.append(caption)
                text_to_image.append(index)
        return ValidationSet(kind=kind, texts=texts, images=images, text_to_image=text_to_image)

    pairs = make_matching_pairs(records, seed=PAIR_SEED)
    if max_pairs is not None and len(pairs) > max_pairs:
        # Pairs come as (positive, negative) runs, so an even prefix stays balanced.
        pairs = pairs[: max_pairs - max_pairs % 2]
    return ValidationSet(
        kind=kind,
        texts=[pair.text for pair in pairs],
        images=[pair.image for pair in pairs],
        labels=[int(pair.label) for pair in pairs],
    )


def run_torch_model(model: Any, preprocessor: Preprocessor, data: ValidationSet, batch_size: int = 32) -> ModelOutputs:
    """Run the original PyTorch model, computing each unique text and image once."""
    import torch

    model.eval()
    unique_texts = sorted(set(data.texts))
    unique_images = sorted(set(data.images), key=str)
    text_row = {text: row for row, text in enumerate(unique_texts)}
    image_row = {image: row for row, image in enumerate(unique_images)}

    with torch.inference_mode():
        if data.kind == "dual_encoder":
            text_embeds = _torch_batches(unique_texts, batch_size, lambda chunk: model.encode_text(**_tensors(preprocessor.texts(chunk))))
            image_embeds = _torch_batches(unique_images, batch_size, lambda chunk: model.encode_image(**_tensors(preprocessor.images(chunk))))
            return ModelOutputs(
                text_embeds=text_embeds[[text_row[t] for t in data.texts]],
                image_embeds=image_embeds[[image_row[i] for i in data.images]],
            )

        # Fusion: tower features per unique input, then the head per pair. Text features of a
        # cross-attention model are per-token, so pad every text to the same length.
        encoded = preprocessor.texts(unique_texts, padding="max_length")
        ids = torch.from_numpy(encoded["input_ids"])
        mask = torch.from_numpy(encoded["attention_mask"])
        text_feats = torch.cat([
            model.text_features(ids[start : start + batch_size], mask[start : start + batch_size])
            for start in range(0, len(unique_texts), batch_size)
        ])
        image_feats = torch.cat([
            model.image_features(torch.from_numpy(preprocessor.images(unique_images[start : start + batch_size])["pixel_values"]))
            for start in range(0, len(unique_images), batch_size)
        ])
        t_index = torch.tensor([text_row[t] for t in data.texts])
        i_index = torch.tensor([image_row[i] for i in data.images])
        scores = []
        for start in range(0, data.size, 256):
            t = t_index[start : start + 256]
            i = i_index[start : start + 256]
            logits = model.head(text_feats[t], mask[t], image_feats[i])
            scores.append(torch.softmax(logits.float(), dim=-1)[:, 1].numpy())
        return ModelOutputs(match_scores=np.concatenate(scores))


def run_package(package: Path | Any, data: ValidationSet, threads: int | None = None, batch_size: int = 32) -> ModelOutputs:
    """Run a model package through `edgemm.runtime`, exactly as a device would."""
    from edgemm import runtime

    model = runtime.load(package, threads=threads) if isinstance(package, (str, Path)) else package
    if data.kind == "dual_encoder":
        unique_images = sorted(set(data.images), key=str)
        image_row = {image: row for row, image in enumerate(unique_images)}
        image_embeds = model.encode_image(unique_images, batch_size=batch_size)
        text_embeds = model.encode_text(data.texts, batch_size=batch_size)
        return ModelOutputs(text_embeds=text_embeds, image_embeds=image_embeds[[image_row[i] for i in data.images]])

    prediction = model.predict(data.texts, data.images, batch_size=batch_size)
    return ModelOutputs(match_scores=np.asarray(prediction.match_score, dtype=np.float64))


def task_metrics(data: ValidationSet, outputs: ModelOutputs, threshold: float) -> dict[str, float]:
    """Accuracy (points) and ROC-AUC for fusion models; recall@k (points) for dual encoders."""
    if data.kind == "dual_encoder":
        unique_images = sorted(set(data.images), key=str)
        row_of = {image: row for row, image in enumerate(unique_images)}
        image_embeds = np.zeros((len(unique_images), outputs.image_embeds.shape[1]), dtype=np.float64)
        for image, embed in zip(data.images, outputs.image_embeds):
            image_embeds[row_of[image]] = embed
        similarity = outputs.text_embeds.astype(np.float64) @ image_embeds.T
        # data.images lists each image once; text_to_image maps every caption to its image.
        targets = [row_of[data.images[index]] for index in data.text_to_image]
        recalls = metrics.retrieval_recalls(similarity, targets, RECALL_KS)
        result = {}
        for direction, values in recalls.items():
            for k, value in values.items():
                result[f"{direction}_recall@{k}"] = 100.0 * value
        return result

    scores = outputs.match_scores
    return {
        "accuracy": 100.0 * metrics.accuracy_at_threshold(scores, data.labels, threshold),
        "roc_auc": metrics.roc_auc(scores, data.labels),
    }


def parity_metrics(data: ValidationSet, reference: ModelOutputs, candidate: ModelOutputs, threshold: float) -> dict[str, float]:
    """Measure how closely the candidate reproduces the reference on the same inputs."""
    if data.kind == "dual_encoder":
        text_cos = _row_cosine(reference.text_embeds, candidate.text_embeds)
        image_cos = _row_cosine(reference.image_embeds, candidate.image_embeds)
        return {
            "text_cosine_mean": float(text_cos.mean()),
            "text_cosine_min": float(text_cos.min()),
            "image_cosine_mean": float(image_cos.mean()),
            "image_cosine_min": float(image_cos.min()),
        }
    ref, cand = reference.match_scores, candidate.match_scores
    return {
        "decision_agreement": float(np.mean((ref >= threshold) == (cand >= threshold))),
        "max_abs_score_diff": float(np.max(np.abs(ref - cand))),
        "mean_abs_score_diff": float(np.mean(np.abs(ref - cand))),
    }


def compare(
    data: ValidationSet,
    reference: ModelOutputs,
    candidate: ModelOutputs,
    threshold: float,
    limits: Limits,
    candidate_threshold: float | None = None,
) -> ValidationReport:
    """Compare candidate against reference and check the drop limits."""
    before = task_metrics(data, reference, threshold)
    after = task_metrics(data, candidate, threshold if candidate_threshold is None else candidate_threshold)
    drop = {name: before[name] - after[name] for name in before}
    failures = []
    if data.kind == "dual_encoder":
        key = "text_to_image_recall@5"
        if drop[key] > limits.max_recall_drop:
            failures.append(f"{key} fell by {drop[key]:.2f} points (limit {limits.max_recall_drop})")
        limit_record = {"max_recall_drop": limits.max_recall_drop}
    else:
        if drop["accuracy"] > limits.max_accuracy_drop:
            failures.append(f"accuracy fell by {drop['accuracy']:.2f} points (limit {limits.max_accuracy_drop})")
        if drop["roc_auc"] > limits.max_auc_drop:
            failures.append(f"ROC-AUC fell by {drop['roc_auc']:.4f} (limit {limits.max_auc_drop})")
        limit_record = {"max_accuracy_drop": limits.max_accuracy_drop, "max_auc_drop": limits.max_auc_drop}
    return ValidationReport(
        kind=data.kind,
        num_samples=data.size,
        before=before,
        after=after,
        drop=drop,
        parity=parity_metrics(data, reference, candidate, threshold),
        limits=limit_record,
        passed=not failures,
        failures=failures,
    )


def raise_if_failed(report: ValidationReport) -> None:
    if report.passed:
        return
    raise AccuracyError(
        "The compressed model lost more accuracy than allowed: " + "; ".join(report.failures) + ".",
        "Lower the prune ratio, add recovery epochs, choose a milder quantization mode, "
        "or raise --max-accuracy-drop if the loss is acceptable.",
    )


def _tensors(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    import torch

    return {name: torch.from_numpy(value) for name, value in arrays.items()}


def _torch_batches(items: Sequence[Any], batch_size: int, encode: Callable[[list[Any]], Any]) -> np.ndarray:
    chunks = [encode(list(items[start : start + batch_size])).float().numpy() for start in range(0, len(items), batch_size)]
    return np.concatenate(chunks)


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return (a * b).sum(axis=1) / np.maximum(norms, 1e-12)
