"""PyTorch datasets of image-text pairs, preprocessed exactly as on the device.

Items are built with `edgemm.runtime.preprocess.Preprocessor`, the implementation that also
feeds calibration, validation and the runtime, so a model is trained on the arrays it will run on.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset, get_worker_info

from edgemm.data.records import Record
from edgemm.errors import DataError

Augment = Callable[[Image.Image, str], tuple[Image.Image, str]]


class PairDataset(Dataset):
    """Image-text pairs as tensors: `input_ids`, `attention_mask` (int64 [L]),
    `pixel_values` (float32 [3, crop, crop]) and `label` (int64 scalar).

    A record without a label is a caption of its image, so its label is 1. `augment(image, text)`
    (e.g. `edgemm.data.augment.Augmenter`) runs on the decoded image before the spec's resize
    and crop. Batch items with `dataset.collate`, which pads texts to the longest in the batch,
    and pass `worker_init_fn=PairDataset.seed_worker` to a multi-worker `DataLoader` so each
    worker draws different augmentations.
    """

    def __init__(self, records: Sequence[Record], preprocessor: Any, augment: Augment | None = None):
        self.records = list(records)
        if not self.records:
            raise DataError("The records passed to PairDataset are empty.", "Pass at least one record, e.g. from load_dataset.")
        self.preprocessor = preprocessor
        self.augment = augment
        self.ids_name, self.mask_name = preprocessor.spec.text.input_names
        self.pixels_name = preprocessor.spec.image.input_name
        self.pad_token_id = int(preprocessor.tokenizer.pad_id)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        from edgemm.runtime.image import load_image

        record = self.records[index]
        text = record.text
        image: Any = record.image
        if self.augment is not None:
            image, text = self.augment(load_image(record.image), text)

        encoded = self.preprocessor.texts([text], padding="longest")
        pixels = self.preprocessor.images([image])[self.pixels_name]
        label = 1 if record.label is None else record.label
        return {
            "input_ids": torch.from_numpy(encoded[self.ids_name][0]),
            "attention_mask": torch.from_numpy(encoded[self.mask_name][0]),
            "pixel_values": torch.from_numpy(pixels[0]),
            "label": torch.tensor(label, dtype=torch.int64),
        }

    def collate(self, items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Stack items into a batch, padding texts with this tokenizer's [PAD] id."""
        return collate(items, pad_token_id=self.pad_token_id)

    @staticmethod
    def seed_worker(worker_id: int) -> None:
        """Give the augmenter in each `DataLoader` worker its own seed (the worker's torch seed)."""
        info = get_worker_info()
        if info is None:
            return
        augment = getattr(info.dataset, "augment", None)
        if augment is not None and hasattr(augment, "reseed"):
            augment.reseed(info.seed % 2**32)


def collate(items: Sequence[dict[str, torch.Tensor]], pad_token_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack `PairDataset` items into a batch; texts are right-padded to the longest in the batch.

    Returns `input_ids` and `attention_mask` (int64 [B, L]), `pixel_values` (float32
    [B, 3, H, W]) and `label` (int64 [B]). Any other tensor the items contain is stacked under its
    own key (recovery adds the teacher's pixels and cached features). Padding positions get
    `pad_token_id` and mask 0.
    """
    if not items:
        raise DataError("Cannot collate an empty batch.", "Use a batch size of at least 1.")
    length = max(item["input_ids"].shape[0] for item in items)
    input_ids = torch.full((len(items), length), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((len(items), length), dtype=torch.int64)
    for row, item in enumerate(items):
        size = item["input_ids"].shape[0]
        input_ids[row, :size] = item["input_ids"]
        attention_mask[row, :size] = item["attention_mask"]
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([item["pixel_values"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
    }
    # Extra tensors that recovery adds to the items (the teacher's pixels, cached features).
    for key in items[0]:
        if key not in batch:
            batch[key] = torch.stack([item[key] for item in items])
    return batch
