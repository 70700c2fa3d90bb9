"""Tests of the validation metrics that decide whether a compressed package passes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgemm.compression.validate import Limits, ModelOutputs, build_validation_set, compare, task_metrics
from edgemm.data.records import Record


def caption_records(images: int, captions_per_image: int) -> list[Record]:
    return [
        Record(image=Path(f"/data/{index}.jpg"), text=f"caption {caption} of image {index}")
        for index in range(images)
        for caption in range(captions_per_image)
    ]


def one_hot_outputs(data) -> ModelOutputs:
    """Embeddings that put every caption exactly on its own image."""
    size = len(data.images)
    text_embeds = np.eye(size, dtype=np.float32)[data.text_to_image]
    return ModelOutputs(text_embeds=text_embeds, image_embeds=np.eye(size, dtype=np.float32))


def test_dual_set_lists_each_image_once():
    data = build_validation_set(caption_records(4, 5), "dual_encoder")

    assert len(data.images) == 4
    assert data.size == 20
    assert data.text_to_image == [index // 5 for index in range(20)]


def test_dual_recall_with_several_captions_per_image():
    data = build_validation_set(caption_records(6, 5), "dual_encoder")

    result = task_metrics(data, one_hot_outputs(data), threshold=0.0)

    assert result["text_to_image_recall@1"] == 100.0
    assert result["image_to_text_recall@1"] == 100.0


def test_dual_recall_drop_fails_limit():
    data = build_validation_set(caption_records(12, 2), "dual_encoder")
    perfect = one_hot_outputs(data)
    shuffled = ModelOutputs(text_embeds=perfect.text_embeds[::-1].copy(), image_embeds=perfect.image_embeds)

    report = compare(data, perfect, shuffled, threshold=0.0, limits=Limits(max_recall_drop=2.0))

    assert report.passed is False
    assert report.drop["text_to_image_recall@5"] > 2.0
    assert "text_to_image_recall@5" in report.failures[0]


def test_fusion_accuracy_and_auc():
    data = build_validation_set(caption_records(10, 1), "fusion_classifier")
    labels = np.array(data.labels)
    scores = np.where(labels == 1, 0.9, 0.1)

    result = task_metrics(data, ModelOutputs(match_scores=scores), threshold=0.5)

    assert data.size == 20
    assert labels.sum() == 10
    assert result["accuracy"] == 100.0
    assert result["roc_auc"] == pytest.approx(1.0)


def test_fusion_parity_counts_flipped_decisions():
    data = build_validation_set(caption_records(10, 1), "fusion_classifier")
    labels = np.array(data.labels, dtype=np.float64)
    reference = ModelOutputs(match_scores=np.where(labels == 1, 0.9, 0.1))
    flipped = reference.match_scores.copy()
    flipped[:2] = 1.0 - flipped[:2]

    report = compare(data, reference, ModelOutputs(match_scores=flipped), threshold=0.5, limits=Limits())

    assert report.parity["decision_agreement"] == pytest.approx(0.9)
    assert report.parity["max_abs_score_diff"] == pytest.approx(0.8)
    assert report.drop["accuracy"] == pytest.approx(10.0)
    assert report.passed is False
