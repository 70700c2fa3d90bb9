"""Strict loading of state_dicts with errors that name the file and the mismatched tensors."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from edgemm.errors import CheckpointError


def _preview(items: list[str], limit: int) -> str:
    return f"{items[:limit]}{' ...' if len(items) > limit else ''}"


def load_state(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Load `state` strictly, turning missing, unexpected or mis-shaped tensors into CheckpointError."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key}: file {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
        for key in own
        if key in state and tuple(state[key].shape) != tuple(own[key].shape)
    ]
    if missing or unexpected or mismatched:
        details = []
        if missing:
            details.append(f"missing {_preview(missing, 5)}")
        if unexpected:
            details.append(f"unexpected {_preview(unexpected, 5)}")
        if mismatched:
            details.append(f"shape mismatch {_preview(mismatched, 3)}")
        raise CheckpointError(
            f"Weights in {path} do not fit the model: {'; '.join(details)}.",
            "Check that config.json describes the same architecture and widths as the weights file.",
        )
    module.load_state_dict(state, strict=True)
