"""Reference models: text and image towers, three text-image architectures and checkpoints."""

from edgemm.models.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from edgemm.models.fusion import ConcatFusionClassifier, CrossAttentionFusion, DualEncoder, FusionModel
from edgemm.models.image import ImageTower, ImageTowerConfig
from edgemm.models.registry import (
    ARCHITECTURES,
    build_model,
    create_model,
    default_input_spec,
    default_vocab_path,
    model_config,
)
from edgemm.models.text import TextTower, TextTowerConfig

__all__ = [
    "ARCHITECTURES",
    "Checkpoint",
    "ConcatFusionClassifier",
    "CrossAttentionFusion",
    "DualEncoder",
    "FusionModel",
    "ImageTower",
    "ImageTowerConfig",
    "TextTower",
    "TextTowerConfig",
    "build_model",
    "create_model",
    "default_input_spec",
    "default_vocab_path",
    "load_checkpoint",
    "model_config",
    "save_checkpoint",
]
