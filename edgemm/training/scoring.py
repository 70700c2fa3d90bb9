"""Scores and metrics of a model's head on cached tower features, shared by training and evaluation.

A fusion model's match score is the softmax probability of the "match" label. A dual encoder's
match score is the cosine similarity of its text and image embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from edgemm.data.matching import group_by_image
from edgemm.data.records import Record
from edgemm.training import metrics
from edgemm.training.features import TowerFeatures
from edgemm.training.modeling import ModelBundle

RECALL_KS = (1, 5, 10)


@dataclass
class FeatureTable:
    """The unique texts and images of a set of records, in a fixed order, with index lookups."""

    texts: list[str]
    images: list[Path]
    text_index: dict[str, int] = field(init=False)
    image_index: dict[Path, int] = field(init=False)

    def __post_init__(self) -> None:
        self.text_index = {text: index for index, text in enumerate(self.texts)}
        self.image_index = {image: index for index, image in enumerate(self.images)}

    @classmethod
    def from_records(cls, records: Sequence[Record]) -> "FeatureTable":
        """Collect captions, hard negatives and images of `records`, sorted so the order is reproducible."""
        texts = {record.text for record in records}
        for record in records:
            texts.update(record.negatives)
        images = {record.image for record in records}
        return cls(texts=sorted(texts), images=sorted(images, key=str))

    def pair_indices(self, pairs: Sequence[Record]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return (text indices, image indices, 0/1 labels) of labelled pairs."""
        text_indices = torch.tensor([self.text_index[pair.text] for pair in pairs], dtype=torch.long)
        image_indices = torch.tensor([self.image_index[pair.image] for pair in pairs], dtype=torch.long)
        labels = torch.tensor([1 if pair.label in (None, 1) else 0 for pair in pairs], dtype=torch.long)
        return text_indices, image_indices, labels


@torch.no_grad()
def match_scores(
    bundle: ModelBundle,
    features: TowerFeatures,
    text_indices: torch.Tensor,
    image_indices: torch.Tensor,
    batch_size: int = 512,
) -> np.ndarray:
    """Score pairs with the model's head: P(match) for fusion models, cosine for a dual encoder."""
    model = bundle.model
    was_training = model.training
    model.eval()

    scores = []
    for start in range(0, len(text_indices), batch_size):
        texts = text_indices[start : start + batch_size]
        images = image_indices[start : start + batch_size]
        output = model.head(features.text[texts], features.text_mask[texts], features.image[images])
        if bundle.is_dual_encoder:
            text_embeds, image_embeds = output
            scores.append((text_embeds * image_embeds).sum(dim=-1))
        else:
            scores.append(torch.softmax(output.float(), dim=-1)[:, bundle.match_index])

    model.train(was_training)
    return torch.cat(scores).cpu().numpy().astype(np.float64)


@torch.no_grad()
def embed(model: nn.Module, features: TowerFeatures, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a dual encoder's L2-normalised (text embeddings, image embeddings) for all rows of `features`."""
    was_training = model.training
    model.eval()
    text_embeds = [model.project_text(chunk) for chunk in features.text.split(batch_size)]
    image_embeds = [model.project_image(chunk) for chunk in features.image.split(batch_size)]
    model.train(was_training)
    return torch.cat(text_embeds), torch.cat(image_embeds)


def matching_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float | None) -> dict:
    """Compute ROC-AUC, accuracy at `threshold` and the oracle accuracy at the best threshold for these labels.

    The oracle figures are fitted on the labels being scored, so they are an upper bound and not
    an estimate of accuracy on new data.
    """
    oracle = metrics.fit_threshold(scores, labels)
    result = {
        "pairs": int(len(labels)),
        "positives": int(np.sum(labels)),
        "roc_auc": metrics.roc_auc(scores, labels),
        "oracle_accuracy": oracle.accuracy,
        "oracle_threshold": oracle.threshold,
    }
    if threshold is not None:
        result["threshold"] = float(threshold)
        result["accuracy"] = metrics.accuracy_at_threshold(scores, labels, threshold)
    return result


def retrieval_metrics(
    model: nn.Module, features: TowerFeatures, table: FeatureTable, records: Sequence[Record]
) -> dict:
    """Compute recall@1/5/10 text->image and image->text over the unique images of `records`.

    Queries are the true captions (records labelled 0 are left out) and the gallery is every
    image with at least one caption.
    """
    groups = group_by_image(records)
    images = list(groups)
    captions = [(text, image_number) for image_number, image in enumerate(images) for text in groups[image]]

    text_embeds, image_embeds = embed(model, features)
    text_rows = torch.tensor([table.text_index[text] for text, _ in captions], dtype=torch.long)
    image_rows = torch.tensor([table.image_index[image] for image in images], dtype=torch.long)
    similarity = (text_embeds[text_rows] @ image_embeds[image_rows].T).cpu().numpy()
    text_to_image = [image_number for _, image_number in captions]

    recalls = metrics.retrieval_recalls(similarity, text_to_image, RECALL_KS)
    result: dict = {"images": len(images), "texts": len(captions)}
    for direction, values in recalls.items():
        for k, value in values.items():
            result[f"{direction}_recall@{k}"] = value
    result["mean_recall"] = float(np.mean([value for values in recalls.values() for value in values.values()]))
    return result
