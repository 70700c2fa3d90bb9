"""Checkpoint folders: config.json + model.safetensors + vocab.txt, written atomically.

Weights are loaded only from safetensors, or from a `.pt` state_dict through
`torch.load(weights_only=True)`, so loading a checkpoint never runs pickled code.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

import edgemm
from edgemm.errors import CheckpointError, ConfigError
from edgemm.io import atomic_directory, atomic_write_text
from edgemm.models.fusion import FusionModel
from edgemm.models.registry import build_model, model_config
from edgemm.models.weights import load_state
from edgemm.runtime.spec import InputSpec

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "edgemm-checkpoint"
CHECKPOINT_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_DICT_FILE = "model.pt"
VOCAB_FILE = "vocab.txt"
# Files that can only be read by unpickling arbitrary objects.
PICKLE_SUFFIXES = (".pkl", ".pickle", ".bin", ".pth", ".ckpt")


@dataclass
class Checkpoint:
    """A loaded checkpoint whose `model` is in eval mode."""

    model: FusionModel
    config: dict[str, Any]
    labels: list[str]
    input_spec: InputSpec
    vocab_path: Path
    history: list[Any] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    folder: Path | None = None


def _check_labels(model: FusionModel, labels: Sequence[str]) -> list[str]:
    labels = [str(label) for label in labels]
    num_labels = getattr(model.head_config, "num_labels", None)
    if num_labels is not None and len(labels) != num_labels:
        raise ConfigError(
            f"{len(labels)} labels {labels} given for a model with {num_labels} outputs.",
            "Pass one label per output of the classifier.",
        )
    if len(set(labels)) != len(labels):
        raise ConfigError(f"Labels {labels} contain duplicates.", "Give each class a distinct name.")
    return labels


def save_checkpoint(
    model: FusionModel,
    folder: str | Path,
    *,
    labels: Sequence[str],
    input_spec: InputSpec | Mapping[str, Any],
    vocab_path: str | Path,
    history: list[Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `model` to `folder` (config.json, model.safetensors, vocab.txt) and return the folder.

    The folder appears complete or not at all. It must not exist unless `overwrite` is true.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    vocab_path = Path(vocab_path)
    if not vocab_path.is_file():
        raise CheckpointError(f"Vocabulary file {vocab_path} not found.", "Pass the vocab.txt of the model's text tower.")
    spec = input_spec if isinstance(input_spec, InputSpec) else InputSpec.from_dict(input_spec)
    labels = _check_labels(model, labels)

    config = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "edgemm_version": edgemm.__version__,
        **model_config(model),
        "labels": labels,
        "input_spec": spec.to_dict(),
        "history": list(history or []),
        "extra": dict(extra or {}),
    }
    # safetensors needs contiguous tensors that do not share memory.
    state = {key: value.detach().cpu().contiguous().clone() for key, value in model.state_dict().items()}

    with atomic_directory(folder, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": CHECKPOINT_FORMAT})
        shutil.copyfile(vocab_path, tmp / VOCAB_FILE)
        atomic_write_text(tmp / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
    logger.info("Saved %s checkpoint to %s", config["architecture"], folder)
    return folder


def read_checkpoint_config(folder: str | Path) -> dict[str, Any]:
    """Read and check `config.json` of a checkpoint folder without loading weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Checkpoint folder {folder} not found.", "Pass a folder written by save_checkpoint or `edgemm train`.")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"Missing {path}.", "A checkpoint folder needs config.json, model.safetensors and vocab.txt.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"Invalid JSON in {path}: {error}.", "Restore the file or save the checkpoint again.") from error
    if not isinstance(config, dict) or config.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path} is not an edgemm checkpoint config (format is not {CHECKPOINT_FORMAT!r}).",
            "Pass a folder written by save_checkpoint.",
        )
    version = config.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}, but this edgemm reads version {CHECKPOINT_FORMAT_VERSION}.",
            "Save the checkpoint again with this edgemm version.",
        )
    return config


def _load_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    safetensors_path = folder / WEIGHTS_FILE
    if safetensors_path.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors_path)), safetensors_path
        except Exception as error:  # safetensors raises SafetensorError, a plain Exception subclass
            raise CheckpointError(
                f"Cannot read {safetensors_path}: {error}.", "The file is corrupt or truncated. Save the checkpoint again."
            ) from error

    state_dict_path = folder / STATE_DICT_FILE
    if state_dict_path.is_file():
        try:
            state = torch.load(state_dict_path, map_location="cpu", weights_only=True)
        except Exception as error:  # UnpicklingError for pickled objects, RuntimeError/EOFError for corrupt files
            raise CheckpointError(
                f"Cannot load {state_dict_path} with weights_only=True: {error}.",
                "Only plain state_dicts of tensors are accepted. Convert the weights to model.safetensors.",
            ) from error
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{state_dict_path} is not a state_dict of tensors.", "Save model.state_dict() instead.")
        return dict(state), state_dict_path

    pickles = sorted(path.name for path in folder.iterdir() if path.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"Rejected pickle weights {pickles} in {folder}: loading them could run arbitrary code.",
            f"Convert the weights to {WEIGHTS_FILE} (safetensors) or a {STATE_DICT_FILE} state_dict.",
        )
    raise CheckpointError(f"Missing {safetensors_path}.", "A checkpoint folder needs config.json, model.safetensors and vocab.txt.")


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Load a checkpoint folder written by `save_checkpoint` and return it with the model in eval mode."""
    folder = Path(folder)
    config = read_checkpoint_config(folder)
    config_path = folder / CONFIG_FILE

    try:
        model = build_model(config)
        input_spec = InputSpec.from_dict(config["input_spec"])
        labels = [str(label) for label in config["labels"]]
    except KeyError as error:
        raise CheckpointError(f"{config_path} is missing the field {error}.", "Save the checkpoint again.") from error
    except ConfigError as error:
        raise CheckpointError(f"Invalid model description in {config_path}: {error}", "Save the checkpoint again.") from error

    vocab_path = folder / VOCAB_FILE
    if not vocab_path.is_file():
        raise CheckpointError(f"Missing {vocab_path}.", "Copy the text tower's vocab.txt into the checkpoint folder.")

    state, weights_path = _load_weights(folder)
    load_state(model, state, weights_path)
    model.eval()
    logger.info("Loaded %s checkpoint from %s", config["architecture"], folder)
    return Checkpoint(
        model=model,
        config=config,
        labels=labels,
        input_spec=input_spec,
        vocab_path=vocab_path,
        history=list(config.get("history", [])),
        extra=dict(config.get("extra", {})),
        folder=folder,
    )
