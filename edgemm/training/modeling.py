"""The calls training and evaluation make into `edgemm.models`, kept in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemm.runtime.spec import InputSpec

MATCH_LABEL = "match"
MATCHING_LABELS = ["mismatch", MATCH_LABEL]
DUAL_ENCODER = "dual_encoder"
FUSION_ARCHITECTURES = ("concat_fusion", "cross_attention")
ARCHITECTURES = FUSION_ARCHITECTURES + (DUAL_ENCODER,)

# Upper bound on exp(logit_scale), as in CLIP, so the contrastive temperature cannot collapse.
MAX_LOGIT_SCALE = 100.0


@dataclass
class ModelBundle:
    """A model with what it takes to feed it (input spec, vocabulary) and read its output (labels)."""

    model: nn.Module
    input_spec: InputSpec
    vocab_path: Path
    labels: list[str]
    extra: dict[str, Any] = field(default_factory=dict)
    history: list[Any] = field(default_factory=list)

    @property
    def architecture(self) -> str:
        return self.model.architecture

    @property
    def is_dual_encoder(self) -> bool:
        return self.architecture == DUAL_ENCODER

    @property
    def match_index(self) -> int:
        """Index of the "match" class in the logits (the last class when no label is named so)."""
        return self.labels.index(MATCH_LABEL) if MATCH_LABEL in self.labels else len(self.labels) - 1

    @property
    def decision_threshold(self) -> float | None:
        value = self.extra.get("decision_threshold")
        return None if value is None else float(value)

    def towers(self) -> list[nn.Module]:
        return [self.model.text_tower, self.model.image_tower]


def build_model(architecture: str, text_tower: str, image_tower: str, seed: int) -> ModelBundle:
    """Create a model with pretrained towers where the tower has weights, and a head seeded by `seed`."""
    from edgemm.models.registry import create_model, default_input_spec, default_vocab_path

    torch.manual_seed(seed)
    model = create_model(architecture, text_tower=text_tower, image_tower=image_tower, num_labels=len(MATCHING_LABELS))
    labels = [] if architecture == DUAL_ENCODER else list(MATCHING_LABELS)
    return ModelBundle(model=model, input_spec=default_input_spec(model), vocab_path=default_vocab_path(model), labels=labels)


def load_model(folder: Path) -> ModelBundle:
    """Load a checkpoint folder; raises `CheckpointError` naming a missing or invalid file."""
    from edgemm.models.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(folder)
    return ModelBundle(
        model=checkpoint.model,
        input_spec=checkpoint.input_spec,
        vocab_path=checkpoint.vocab_path,
        labels=checkpoint.labels,
        extra=checkpoint.extra,
        history=checkpoint.history,
    )


def save_model(bundle: ModelBundle, folder: Path, history: list[dict], extra: dict, overwrite: bool) -> Path:
    from edgemm.models.checkpoint import save_checkpoint

    return save_checkpoint(
        bundle.model,
        folder,
        labels=bundle.labels,
        input_spec=bundle.input_spec,
        vocab_path=bundle.vocab_path,
        history=history,
        extra=extra,
        overwrite=overwrite,
    )


def logit_scale_of(model: nn.Module) -> torch.Tensor:
    """Return the multiplier of cosine similarities, exp(logit_scale), clamped to MAX_LOGIT_SCALE."""
    return model.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
