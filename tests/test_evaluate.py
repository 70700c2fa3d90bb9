"""Metrics against hand-computed values, evaluation of trained checkpoints and the `edgemm eval` CLI."""

from __future__ import annotations

import numpy as np
import pytest

from edgemm.training import metrics


# ---- metrics -------------------------------------------------------------------------------------


def test_accuracy_counts_matches():
    assert metrics.accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_accuracy_rejects_length_mismatch():
    with pytest.raises(ValueError, match="differ in length"):
        metrics.accuracy([1, 0], [1])


def test_top1_accuracy_uses_argmax():
    logits = np.array([[0.1, 0.9, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 5.0], [1.0, 3.0, 2.0]])
    assert metrics.top1_accuracy(logits, [1, 0, 1, 1]) == 0.75


def test_roc_auc_hand_computed():
    # Pairs (positive, negative): (0.35,0.1) win, (0.35,0.4) loss, (0.8,0.1) win, (0.8,0.4) win.
    assert metrics.roc_auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)


def test_roc_auc_ties_count_half():
    # Pairs: (0.5,0.5) tie = 0.5, (0.5,0.2) win, (0.9,0.5) win, (0.9,0.2) win -> 3.5 / 4.
    assert metrics.roc_auc([0.5, 0.9, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875)
    assert metrics.roc_auc([0.3, 0.3, 0.3, 0.3], [1, 0, 1, 0]) == pytest.approx(0.5)


def test_roc_auc_perfect_and_inverted():
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert metrics.roc_auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0


def test_roc_auc_one_class_raises():
    with pytest.raises(ValueError, match="both positive and negative"):
        metrics.roc_auc([0.1, 0.2], [1, 1])


def test_roc_auc_rejects_non_binary_labels():
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0.1, 0.2], [0, 2])


def test_fit_threshold_separable():
    fit = metrics.fit_threshold([0.1, 0.2, 0.3, 0.4], [0, 0, 1, 1])
    assert fit.threshold == pytest.approx(0.25)
    assert fit.accuracy == 1.0


def test_fit_threshold_overlapping():
    # Sorted: 0.1(n) 0.2(p) 0.3(n) 0.4(p) 0.5(p). Thresholds 0.15 and 0.35 both get 4 of 5 right.
    scores = [0.3, 0.1, 0.4, 0.2, 0.5]
    labels = [0, 0, 1, 1, 1]
    fit = metrics.fit_threshold(scores, labels)
    assert fit.accuracy == pytest.approx(0.8)
    assert metrics.accuracy_at_threshold(scores, labels, fit.threshold) == pytest.approx(0.8)
    assert fit.threshold in (pytest.approx(0.15), pytest.approx(0.35))


def test_fit_threshold_all_positive_goes_below_minimum():
    fit = metrics.fit_threshold([0.2, 0.7, 0.4], [1, 1, 1])
    assert fit.accuracy == 1.0
    assert fit.threshold < 0.2


def test_accuracy_at_threshold_inclusive():
    assert metrics.accuracy_at_threshold([0.5, 0.4], [1, 0], 0.5) == 1.0


def test_recall_at_k_hand_computed():
    similarity = np.array(
        [
            [0.9, 0.1, 0.0],  # relevant 0 ranks first
            [0.9, 0.5, 0.1],  # relevant 1 ranks second
            [0.9, 0.8, 0.1],  # relevant 2 ranks third
        ]
    )
    recalls = metrics.recall_at_k(similarity, [0, 1, 2], ks=(1, 2, 3))
    assert recalls == {1: pytest.approx(1 / 3), 2: pytest.approx(2 / 3), 3: pytest.approx(1.0)}


def test_recall_at_k_ties_count_against_query():
    recalls = metrics.recall_at_k(np.zeros((2, 4)), [0, 3], ks=(1, 4))
    assert recalls[1] == 0.0
    assert recalls[4] == 1.0


def test_recall_at_k_any_relevant_item_counts():
    similarity = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert metrics.recall_at_k(similarity, [{0, 2}], ks=(1, 2, 3)) == {1: 0.0, 2: 0.0, 3: 1.0}


def test_retrieval_recalls_both_directions():
    # Texts 0 and 1 describe image 0, and text 2 describes image 1.
    similarity = np.array(
        [
            [0.2, 0.8],  # text 0: wrong image first
            [0.9, 0.1],  # text 1: right image first
            [0.1, 0.7],  # text 2: right image first
        ]
    )
    recalls = metrics.retrieval_recalls(similarity, [0, 0, 1], ks=(1, 2))
    assert recalls["text_to_image"] == {1: pytest.approx(2 / 3), 2: 1.0}
    # Image 0: best relevant text is 1 (0.9), ahead of text 2 (0.1) -> rank 0.
    # Image 1: relevant text 2 scores 0.7, text 0 scores 0.8 -> rank 1.
    assert recalls["image_to_text"] == {1: 0.5, 2: 1.0}


def test_retrieval_recalls_rejects_image_without_text():
    with pytest.raises(ValueError, match="have no text"):
        metrics.retrieval_recalls(np.zeros((2, 3)), [0, 1])
