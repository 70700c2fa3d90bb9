"""One preprocessing implementation for calibration, validation and the device.

Whatever feeds a model (the calibration set, the validation step or `edgemm.runtime.load`)
builds its arrays with `Preprocessor`, so the inputs a quantized model was calibrated on are
computed exactly as the inputs it later runs on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from edgemm.runtime.image import DEFAULT_MAX_PIXELS, ImageSource, ImageTransform
from edgemm.runtime.spec import InputSpec
from edgemm.runtime.tokenizer import WordPieceTokenizer


class Preprocessor:
    """Turn raw texts and images into the named arrays of the ONNX graph inputs.

    `texts` returns {"input_ids", "attention_mask"} (int64 [batch, length]) and `images`
    returns {"pixel_values"} (float32 [batch, 3, crop, crop]), with the names the spec gives.
    Safe to share between threads.
    """

    def __init__(
        self,
        spec: InputSpec,
        vocab_path: Path,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        use_draft: bool = True,
    ):
        self.spec = spec
        self.tokenizer = WordPieceTokenizer.from_spec(spec.text, vocab_path)
        self.image_transform = ImageTransform(spec.image, max_pixels=max_pixels, use_draft=use_draft)

    def texts(self, texts: str | Sequence[str], padding: str = "longest", first_position: int = 0) -> dict[str, np.ndarray]:
        """Tokenize texts, truncated to the spec's max_length and padded to the longest row or to max_length.

        `first_position` is the position of the first text in the caller's whole batch, for error messages.
        """
        encoded = self.tokenizer(texts, padding=padding, first_position=first_position)
        ids_name, mask_name = self.spec.text.input_names
        return {ids_name: encoded["input_ids"], mask_name: encoded["attention_mask"]}

    def images(self, images: ImageSource | Sequence[ImageSource], first_position: int = 0) -> dict[str, np.ndarray]:
        """Load, resize, crop and normalise images; `first_position` works as in `texts`."""
        return {self.spec.image.input_name: self.image_transform(images, first_position=first_position)}

    def __call__(
        self,
        texts: str | Sequence[str],
        images: ImageSource | Sequence[ImageSource],
        padding: str = "longest",
    ) -> dict[str, np.ndarray]:
        """Preprocess paired texts and images into one feed dict for a fusion graph."""
        return {**self.texts(texts, padding=padding), **self.images(images)}
