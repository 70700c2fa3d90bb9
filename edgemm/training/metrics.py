"""Classification and retrieval metrics on numpy arrays (no scikit-learn).

Scores are "higher means more likely positive". Labels are 0/1 for binary metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np


def _binary_inputs(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels differ in length: {scores.shape[0]} != {labels.shape[0]}")
    if scores.size == 0:
        raise ValueError("scores and labels are empty")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got values {sorted(set(labels.tolist()))[:5]}")
    return scores, labels.astype(np.int64)


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    predictions = np.asarray(predictions).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions and labels differ in length: {predictions.shape[0]} != {labels.shape[0]}")
    if predictions.size == 0:
        raise ValueError("predictions and labels are empty")
    return float(np.mean(predictions == labels))


def top1_accuracy(logits: np.ndarray, labels: Sequence[int]) -> float:
    """Fraction of rows of `logits` [N, C] whose arg-max is the label."""
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D [N, C], got shape {logits.shape}")
    return accuracy(np.argmax(logits, axis=1), labels)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Rank `values` from 1 to N, giving tied values the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(values.size, dtype=np.float64)

    # Each run of equal values [start, end) shares the mean of the ranks start+1 .. end.
    boundaries = np.flatnonzero(np.diff(sorted_values)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [values.size]))
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + 1 + end) / 2.0
    return ranks


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve, computed as the Mann-Whitney U statistic.

    A tied positive/negative pair counts one half. Raises `ValueError` when only one class is
    present, because the area is undefined then.
    """
    scores, labels = _binary_inputs(scores, labels)
    positives = int(labels.sum())
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC-AUC needs both positive and negative labels")

    ranks = _average_ranks(scores)
    rank_sum = ranks[labels == 1].sum()
    u_statistic = rank_sum - positives * (positives + 1) / 2.0
    return float(u_statistic / (positives * negatives))


def accuracy_at_threshold(scores: Sequence[float], labels: Sequence[int], threshold: float) -> float:
    """Accuracy when `score >= threshold` predicts the positive class."""
    scores, labels = _binary_inputs(scores, labels)
    return float(np.mean((scores >= threshold).astype(np.int64) == labels))


@dataclass(frozen=True)
class ThresholdFit:
    threshold: float
    accuracy: float


def fit_threshold(scores: Sequence[float], labels: Sequence[int]) -> ThresholdFit:
    """Find the threshold that maximises accuracy of `score >= threshold` on this score set.

    Candidates are the midpoints between consecutive distinct scores, plus one value below the
    minimum and one above the maximum. When several candidates reach the best accuracy, the middle
    one of them is taken, so the threshold does not sit on the edge of a class.
    """
    scores, labels = _binary_inputs(scores, labels)
    distinct = np.unique(scores)
    span = float(distinct[-1] - distinct[0]) or 1.0
    midpoints = (distinct[:-1] + distinct[1:]) / 2.0
    candidates = np.concatenate(([distinct[0] - 0.01 * span], midpoints, [distinct[-1] + 0.01 * span]))

    # Correct predictions for threshold t: positives with score >= t plus negatives with score < t.
    positive_scores = np.sort(scores[labels == 1])
    negative_scores = np.sort(scores[labels == 0])
    true_positives = positive_scores.size - np.searchsorted(positive_scores, candidates, side="left")
    true_negatives = np.searchsorted(negative_scores, candidates, side="left")
    correct = true_positives + true_negatives

    best = np.flatnonzero(correct == correct.max())
    chosen = best[len(best) // 2]
    return ThresholdFit(threshold=float(candidates[chosen]), accuracy=float(correct[chosen] / scores.size))


def recall_at_k(
    similarity: np.ndarray,
    relevant: Sequence[int | Iterable[int]],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[int, float]:
    """Recall@k of a retrieval: the fraction of queries with a relevant item among the top k.

    `similarity` is [queries, items]; `relevant[q]` is one item index or a collection of them.
    Ties count against the query: an item scoring equal to the best relevant item ranks ahead
    of it, so a constant similarity matrix does not look perfect.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be 2-D [queries, items], got shape {similarity.shape}")
    if len(relevant) != similarity.shape[0]:
        raise ValueError(f"relevant has {len(relevant)} entries for {similarity.shape[0]} queries")
    if similarity.shape[0] == 0:
        raise ValueError("similarity has no queries")

    ranks = np.empty(similarity.shape[0], dtype=np.int64)
    for query, items in enumerate(relevant):
        if isinstance(items, (int, np.integer)):
            item_indices = np.array([items], dtype=np.int64)
        else:
            item_indices = np.fromiter(items, dtype=np.int64)
        if item_indices.size == 0:
            raise ValueError(f"query {query} has no relevant item")
        row = similarity[query]
        is_relevant = np.zeros(row.size, dtype=bool)
        is_relevant[item_indices] = True
        best_relevant = row[is_relevant].max()
        # Zero-based rank of the best relevant item among the irrelevant ones.
        ranks[query] = int(np.count_nonzero(row[~is_relevant] >= best_relevant))

    return {int(k): float(np.mean(ranks < k)) for k in ks}


def retrieval_recalls(
    similarity: np.ndarray,
    text_to_image: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, dict[int, float]]:
    """Recall@k in both directions from a text x image similarity matrix.

    `text_to_image[i]` is the index of the image that text i describes. Going image -> text, every
    text of an image counts as relevant.
    """
    similarity = np.asarray(similarity, dtype=np.float64)
    text_to_image = np.asarray(text_to_image, dtype=np.int64)
    if similarity.shape[0] != text_to_image.size:
        raise ValueError(f"similarity has {similarity.shape[0]} texts but text_to_image has {text_to_image.size}")

    image_to_texts: list[list[int]] = [[] for _ in range(similarity.shape[1])]
    for text_index, image_index in enumerate(text_to_image.tolist()):
        image_to_texts[image_index].append(text_index)
    missing = [index for index, texts in enumerate(image_to_texts) if not texts]
    if missing:
        raise ValueError(f"images {missing[:5]} have no text, so image->text recall is undefined")

    return {
        "text_to_image": recall_at_k(similarity, text_to_image.tolist(), ks),
        "image_to_text": recall_at_k(similarity.T, image_to_texts, ks),
    }
