"""Helpers for tests across edgemm: tiny checkpoints that build and load in well under a second."""

from __future__ import annotations

from pathlib import Path

import torch

from edgemm.models.checkpoint import save_checkpoint
from edgemm.models.registry import create_model, default_input_spec, default_vocab_path

MATCH_LABELS = ["mismatch", "match"]


def make_tiny_checkpoint(folder: str | Path, architecture: str, seed: int = 0) -> Path:
    """Save a randomly initialised model of `architecture` on the tiny towers to `folder`.

    The same `seed` gives the same weights. Labels are ["mismatch", "match"], and the input spec uses
    the tiny vocabulary (max_length 32) and 64x64 images (resize 72, crop 64).
    """
    torch.manual_seed(seed)
    model = create_model(architecture, text_tower="tiny", image_tower="tiny", num_labels=2, pretrained=False)
    model.eval()
    return save_checkpoint(
        model,
        folder,
        labels=MATCH_LABELS,
        input_spec=default_input_spec(model),
        vocab_path=default_vocab_path(model),
    )
