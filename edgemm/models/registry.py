"""Build models by architecture name and tower names, and rebuild them from their config dict."""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from edgemm.errors import ConfigError
from edgemm.models.fusion import (
    ConcatFusionClassifier,
    CrossAttentionFusion,
    DualEncoder,
    FusionModel,
    head_config_from_dict,
)
from edgemm.models.image import ImageTower, ImageTowerConfig
from edgemm.models.text import TextTower, TextTowerConfig
from edgemm.runtime.spec import InputSpec, TextSpec

logger = logging.getLogger(__name__)

ARCHITECTURES: dict[str, type[FusionModel]] = {
    "concat_fusion": ConcatFusionClassifier,
    "cross_attention": CrossAttentionFusion,
    "dual_encoder": DualEncoder,
}

# Captions are short: 64 WordPiece tokens cover them, and shorter inputs run faster on a device.
PRETRAINED_TEXT_MAX_LENGTH = 64
TINY_TEXT_MAX_LENGTH = 32

# Head widths used for tiny towers unless the caller overrides them.
_TINY_HEAD_DEFAULTS = {
    "concat_fusion": {"proj_dim": 64, "hidden_dim": 64},
    "cross_attention": {"hidden_dim": 64},
    "dual_encoder": {"embed_dim": 64},
}


def _check_architecture(architecture: str) -> type[FusionModel]:
    if architecture not in ARCHITECTURES:
        raise ConfigError(f"Unknown architecture {architecture!r}.", f"Use one of {sorted(ARCHITECTURES)}.")
    return ARCHITECTURES[architecture]


def _looks_like_path(value: str) -> bool:
    # Tower names contain no path separator, so "/data/minilm" or "weights.pth" is a file or
    # folder, and a missing one raises CheckpointError with its path instead of "unknown tower".
    return Path(value).exists() or os.sep in value or "/" in value or value.endswith((".pth", ".pt"))


def text_tower_config(text_tower: str | Path | TextTowerConfig | Mapping[str, Any]) -> TextTowerConfig:
    """Turn a tower name, a local folder, a dict or a config into a TextTowerConfig."""
    if isinstance(text_tower, TextTowerConfig):
        return text_tower
    if isinstance(text_tower, Mapping):
        return TextTowerConfig.from_dict(text_tower)
    name = str(text_tower)
    if _looks_like_path(name):
        return TextTowerConfig(name="local", source=name)
    return TextTowerConfig(name=name)


def image_tower_config(image_tower: str | Path | ImageTowerConfig | Mapping[str, Any]) -> ImageTowerConfig:
    """Turn a tower name, a local .pth file, a dict or a config into an ImageTowerConfig."""
    if isinstance(image_tower, ImageTowerConfig):
        return image_tower
    if isinstance(image_tower, Mapping):
        return ImageTowerConfig.from_dict(image_tower)
    name = str(image_tower)
    if _looks_like_path(name):
        return ImageTowerConfig(name="local", source=name)
    return ImageTowerConfig(name=name)


def create_model(
    architecture: str,
    text_tower: str | Path | TextTowerConfig = "tiny",
    image_tower: str | Path | ImageTowerConfig = "tiny",
    num_labels: int = 2,
    pretrained: bool = True,
    **head_options: Any,
) -> FusionModel:
    """Create a model of `architecture` on the named towers.

    With `pretrained=True`, pretrained towers (`minilm-l6`, `efficientnet-lite0` or local files)
    load their weights. Tiny towers always start from random weights. `num_labels` sets the
    classifier size of the fusion architectures and is ignored by `dual_encoder`. `head_options`
    are fields of the architecture's head config (e.g. `proj_dim`, `num_layers`, `embed_dim`).
    """
    model_class = _check_architecture(architecture)
    text_config = text_tower_config(text_tower)
    image_config = image_tower_config(image_tower)

    text = TextTower(text_config)
    image = ImageTower(image_config)
    if pretrained and text_config.is_pretrained:
        text.load_pretrained()
    if pretrained and image_config.is_pretrained:
        image.load_pretrained()

    options = dict(head_options)
    if text_config.name == "tiny":
        options = {**_TINY_HEAD_DEFAULTS[architecture], **options}
    if architecture != "dual_encoder":
        options["num_labels"] = num_labels
    head = head_config_from_dict(architecture, options)
    return model_class(text, image, head)


def build_model(config: Mapping[str, Any]) -> FusionModel:
    """Rebuild a model (random weights) from `model.config` or a checkpoint's config.json dict."""
    try:
        architecture = config["architecture"]
        text_data, image_data, head_data = config["text_tower"], config["image_tower"], config["head"]
    except (KeyError, TypeError) as error:
        raise ConfigError(
            f"Model config is missing {error}.",
            "Expected a dict with architecture, text_tower, image_tower and head (as written by model_config).",
        ) from error
    model_class = _check_architecture(architecture)
    text = TextTower(TextTowerConfig.from_dict(text_data))
    image = ImageTower(ImageTowerConfig.from_dict(image_data))
    return model_class(text, image, head_config_from_dict(architecture, head_data))


def model_config(model: nn.Module, num_heads: Mapping[nn.Module, int] | None = None) -> dict[str, Any]:
    """Sync every width from the modules (after pruning) and return a copy of the model's config.

    `num_heads` is torch-pruning's `pruner.num_heads`, as in `FusionModel.sync_config`.
    """
    if not isinstance(model, FusionModel):
        raise ConfigError(
            f"model_config expects an edgemm model, got {type(model).__name__}.",
            f"Create the model with create_model or build_model (architectures: {sorted(ARCHITECTURES)}).",
        )
    return copy.deepcopy(model.sync_config(num_heads))


def default_input_spec(model: FusionModel) -> InputSpec:
    """Return the preprocessing that matches the model's towers."""
    text_config = model.text_tower.config
    max_length = TINY_TEXT_MAX_LENGTH if text_config.name == "tiny" else PRETRAINED_TEXT_MAX_LENGTH
    return InputSpec(text=TextSpec(max_length=max_length), image=model.image_tower.config.image_spec())


def default_vocab_path(model: FusionModel) -> Path:
    """Return the `vocab.txt` of the model's text tower."""
    return model.text_tower.config.vocab_path()
