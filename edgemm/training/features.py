"""Tower features for frozen-tower training and evaluation, with an optional cache file.

With frozen towers only the head learns, so the towers run once per unique text and once per
unique image, and the head then trains on these tensors. The cache file stores plain tensors
(`torch.save` of a dict, read back with `weights_only=True`). Its key hashes the tower weights,
the input spec and the inputs, so a changed model, spec or dataset never reuses stale features.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edgemm.errors import DataError, EdgemmError, InputError
from edgemm.io import atomic_write_bytes
from edgemm.training.distributed import DistributedContext

logger = logging.getLogger(__name__)

# Called as progress(stage, done, total), with stage "text" or "image".
ProgressCallback = Callable[[str, int, int], None]

CACHE_FORMAT_VERSION = 1


@dataclass
class TowerFeatures:
    """Features of unique texts and images, in the order they were given.

    `text` is [texts, H] for pooled features or [texts, max_length, H] for token features.
    `text_mask` is the attention mask [texts, max_length], and `image` is [images, ...].
    """

    text: torch.Tensor
    text_mask: torch.Tensor
    image: torch.Tensor

    def to_dict(self) -> dict[str, torch.Tensor]:
        return {"text": self.text, "text_mask": self.text_mask, "image": self.image}


def tower_weights_digest(model: nn.Module) -> str:
    """Hash every tensor of the model's towers (names, shapes, dtypes and bytes).

    Only the towers decide the features, so a changed head keeps the cache valid. A model without
    `text_tower` / `image_tower` attributes is hashed whole.
    """
    digest = hashlib.sha256()
    towers = [getattr(model, name, None) for name in ("text_tower", "image_tower")]
    modules = [tower for tower in towers if isinstance(tower, nn.Module)] or [model]
    for module in modules:
        for name, tensor in module.state_dict().items():
            tensor = tensor.detach().cpu().contiguous()
            digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def inputs_digest(texts: Sequence[str], images: Sequence[Path]) -> str:
    """Hash the texts and the image files (path, size and modification time)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    for image in images:
        path = Path(image)
        try:
            stat = path.stat()
        except FileNotFoundError:
            raise DataError(f"Image not found: {path}.", "Check the dataset's image paths.") from None
        digest.update(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()


def cache_key(model: nn.Module, input_spec_dict: dict, texts: Sequence[str], images: Sequence[Path]) -> str:
    parts = {
        "format": CACHE_FORMAT_VERSION,
        "towers": tower_weights_digest(model),
        "input_spec": input_spec_dict,
        "inputs": inputs_digest(texts, images),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _pad_tokens(features: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad token features [B, L, H] and mask [B, L] with zeros to `length` tokens."""
    extra = length - mask.shape[1]
    if extra <= 0:
        return features, mask
    mask = F.pad(mask, (0, extra))
    if features.dim() == 3:
        features = F.pad(features, (0, 0, 0, extra))
    return features, mask


@torch.no_grad()
def encode_texts(
    model: nn.Module,
    preprocessor,
    texts: Sequence[str],
    batch_size: int = 64,
    progress: ProgressCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `model.text_features` over `texts` in batches; return (features, attention_mask).

    `preprocessor` is an `edgemm.runtime.preprocess.Preprocessor`. Batches are padded to their
    longest text, then token features and masks are padded to the spec's max_length so batches
    stack. Padding does not change pooled features because the pooling is masked.
    """
    ids_name, mask_name = preprocessor.spec.text.input_names
    max_length = preprocessor.spec.text.max_length
    feature_batches: list[torch.Tensor] = []
    mask_batches: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        encoded = preprocessor.texts(list(texts[start : start + batch_size]), padding="longest")
        input_ids = torch.as_tensor(encoded[ids_name], dtype=torch.long)
        attention_mask = torch.as_tensor(encoded[mask_name], dtype=torch.long)
        features = model.text_features(input_ids, attention_mask)
        features, attention_mask = _pad_tokens(features, attention_mask, max_length)
        feature_batches.append(features.float())
        mask_batches.append(attention_mask)
        if progress is not None:
            progress("text", min(start + batch_size, len(texts)), len(texts))
    if not feature_batches:
        raise DataError("No texts to encode.", "Check that the dataset split has records.")
    return torch.cat(feature_batches), torch.cat(mask_batches)


def load_images(transform: Callable, paths: Sequence[Path]) -> torch.Tensor:
    """Preprocess image files into pixel values [N, 3, H, W] with an `ImageTransform`.

    Raises `DataError` naming the file that is missing, truncated or not an image.
    """
    pixels = []
    for path in paths:
        try:
            pixels.append(transform([path]))
        except InputError as error:
            raise DataError(f"Cannot read image {path}: {error.message}", "Replace or remove the file.") from None
    return torch.as_tensor(np.concatenate(pixels))


@torch.no_grad()
def encode_images(
    model: nn.Module,
    transform: Callable,
    images: Sequence[Path],
    batch_size: int = 32,
    progress: ProgressCallback | None = None,
) -> torch.Tensor:
    """Run `model.image_features` over image files in batches."""
    batches: list[torch.Tensor] = []
    for start in range(0, len(images), batch_size):
        pixel_values = load_images(transform, images[start : start + batch_size])
        batches.append(model.image_features(pixel_values).float())
        if progress is not None:
            progress("image", min(start + batch_size, len(images)), len(images))
    if not batches:
        raise DataError("No images to encode.", "Check that the dataset split has records.")
    return torch.cat(batches)


def compute_features(
    model: nn.Module,
    texts: Sequence[str],
    images: Sequence[Path],
    input_spec,
    vocab_path: Path,
    cache_dir: Path | None = None,
    progress: ProgressCallback | None = None,
    context: DistributedContext | None = None,
) -> TowerFeatures:
    """Compute (or load from `cache_dir`) the tower features of unique `texts` and `images`.

    `input_spec` is an `edgemm.runtime.spec.InputSpec`, so the same tokenizer and image transform
    as on the device turn the inputs into tensors. The model is put in eval mode. Under torchrun
    (`context` with several ranks) each rank encodes every world_size-th input, the shards are
    gathered, every rank returns all features, and only rank 0 writes the cache file.
    """
    from edgemm.runtime.preprocess import Preprocessor

    context = context or DistributedContext()
    model.eval()
    cache_path = None
    if cache_dir is not None:
        key = cache_key(model, input_spec.to_dict(), texts, images)
        cache_path = Path(cache_dir) / f"features-{key[:24]}.pt"
        cached = _read_cache(cache_path, len(texts), len(images))
        if cached is not None:
            logger.info("Loaded tower features from %s", cache_path)
            return cached

    preprocessor = Preprocessor(input_spec, vocab_path)
    shard = context.is_distributed and min(len(texts), len(images)) >= context.world_size
    rank, step = (context.rank, context.world_size) if shard else (0, 1)
    logger.info("Computing tower features for %d texts and %d images", len(texts[rank::step]), len(images[rank::step]))
    text, text_mask = encode_texts(model, preprocessor, texts[rank::step], progress=progress)
    image = encode_images(model, preprocessor.image_transform, images[rank::step], progress=progress)
    if shard:
        shards = context.all_gather_objects((text, text_mask, image))
        text = _interleave([part[0] for part in shards])
        text_mask = _interleave([part[1] for part in shards])
        image = _interleave([part[2] for part in shards])
    features = TowerFeatures(text=text, text_mask=text_mask, image=image)

    if cache_path is not None and context.is_main:
        buffer = io.BytesIO()
        torch.save(features.to_dict(), buffer)
        atomic_write_bytes(cache_path, buffer.getvalue())
        logger.info("Saved tower features to %s", cache_path)
    return features


def _interleave(shards: list[torch.Tensor]) -> torch.Tensor:
    """Undo the `items[rank::world_size]` split: row i of the result comes from shard i % world_size."""
    total = sum(part.shape[0] for part in shards)
    result = shards[0].new_empty((total, *shards[0].shape[1:]))
    for rank, part in enumerate(shards):
        result[rank :: len(shards)] = part
    return result


def _read_cache(path: Path, text_count: int, image_count: int) -> TowerFeatures | None:
    if not path.is_file():
        return None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        features = TowerFeatures(text=data["text"], text_mask=data["text_mask"], image=data["image"])
    except (EdgemmError, KeyError, TypeError, RuntimeError, OSError, EOFError, pickle.UnpicklingError) as error:
        logger.warning("Ignoring unreadable feature cache %s (%s); recomputing", path, error)
        return None
    if features.text.shape[0] != text_count or features.image.shape[0] != image_count:
        logger.warning("Ignoring feature cache %s: it has a different number of inputs", path)
        return None
    return features


def default_cache_dir() -> Path:
    """Return the feature cache folder: $EDGEMM_CACHE_DIR/features, else $XDG_CACHE_HOME/edgemm/features (~/.cache when unset)."""
    import os

    if os.environ.get("EDGEMM_CACHE_DIR"):
        return Path(os.environ["EDGEMM_CACHE_DIR"]) / "features"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "edgemm" / "features"
