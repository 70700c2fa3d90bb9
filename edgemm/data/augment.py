"""Training augmentation of image-text pairs that keeps the caption true. Torch-free (Pillow).

A horizontal flip mirrors the scene, so the caption's "left" and "right" are swapped with it.
When the caption uses those words in a sense a mirror does not change ("he has left",
"right now"), the pair is not flipped. Colour jitter changes brightness, contrast and
saturation but never hue, so colour words stay true.
"""

from __future__ import annotations

import math
import random
import re

from PIL import Image, ImageEnhance, ImageStat

from edgemm.errors import ConfigError

_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most)?\b)", re.IGNORECASE)
# Uses of "left" and "right" that are not directions, so a mirror image must keep them.
_NOT_A_DIRECTION = re.compile(
    r"\b(?:has|have|had|is|are|was|were|been|being|just|gets?|got)\s+left\b"
    r"|\bright\s+(?:now|away|here|there|after|before)\b"
    r"|\ball\s+right\b",
    re.IGNORECASE,
)


def mirror_caption(text: str) -> str | None:
    """Return `text` with "left" and "right" swapped (case kept), or None when a swap would be wrong.

    Words that start with left/right are swapped too ("leftmost" becomes "rightmost").
    """
    if _NOT_A_DIRECTION.search(text):
        return None

    def swap(match: re.Match) -> str:
        word = match.group(1)
        swapped = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return swapped.upper()
        return swapped.capitalize() if word[0].isupper() else swapped

    return _LEFT_RIGHT.sub(swap, text)


class Augmenter:
    """Random resized crop, horizontal flip with caption mirroring, small rotation and colour jitter.

    Args:
        seed: seed of the augmenter's own `random.Random`; the same seed gives the same sequence.
        min_scale, max_scale: range of the crop area as a fraction of the image area.
        flip_probability: probability of a horizontal flip (skipped when `mirror_caption` returns None).
        max_rotation: largest rotation in degrees either way; corners are filled with the mean colour.
        brightness, contrast, saturation: each factor is drawn from [1 - value, 1 + value].

    The output image has the input's size and RGB mode.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        min_scale: float = 0.6,
        max_scale: float = 1.0,
        flip_probability: float = 0.5,
        max_rotation: float = 10.0,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
    ):
        if not 0.0 < min_scale <= max_scale <= 1.0:
            raise ConfigError(
                f"Crop scale range ({min_scale}, {max_scale}) is invalid.",
                "Use 0 < min_scale <= max_scale <= 1, e.g. 0.6 and 1.0.",
            )
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"{name}={value} is invalid.", f"Use a {name} jitter between 0 and 1, e.g. 0.2.")
        if not 0.0 <= flip_probability <= 1.0:
            raise ConfigError(f"flip_probability={flip_probability} is invalid.", "Use a probability between 0 and 1.")
        self.min_scale = min_scale
        self.max_scale = max_scale
        self.flip_probability = flip_probability
        self.max_rotation = abs(max_rotation)
        self.jitter = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        self.rng = random.Random(seed)

    def reseed(self, seed: int) -> None:
        """Restart the random sequence, e.g. with a different seed in each data-loader worker."""
        self.rng = random.Random(seed)

    def __call__(self, image: Image.Image, text: str) -> tuple[Image.Image, str]:
        """Return an augmented copy of `image` and the caption that stays true for it."""
        image = image.convert("RGB") if image.mode != "RGB" else image
        image = self._random_resized_crop(image)
        image, text = self._maybe_flip(image, text)
        image = self._rotate(image)
        image = self._jitter_colors(image)
        return image, text

    def _random_resized_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.rng.uniform(self.min_scale, self.max_scale)
        aspect = math.exp(self.rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        crop_width = min(width, max(1, round(math.sqrt(scale * width * height * aspect))))
        crop_height = min(height, max(1, round(math.sqrt(scale * width * height / aspect))))
        left = self.rng.randint(0, width - crop_width)
        top = self.rng.randint(0, height - crop_height)
        box = (left, top, left + crop_width, top + crop_height)
        return image.resize((width, height), Image.Resampling.BILINEAR, box=box)

    def _maybe_flip(self, image: Image.Image, text: str) -> tuple[Image.Image, str]:
        if self.rng.random() >= self.flip_probability:
            return image, text
        mirrored = mirror_caption(text)
        if mirrored is None:
            return image, text
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mirrored

    def _rotate(self, image: Image.Image) -> Image.Image:
        angle = self.rng.uniform(-self.max_rotation, self.max_rotation)
        if angle == 0.0:
            return image
        fill = tuple(round(value) for value in ImageStat.Stat(image).mean)
        return image.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=fill)

    def _jitter_colors(self, image: Image.Image) -> Image.Image:
        enhancers = {
            "brightness": ImageEnhance.Brightness,
            "contrast": ImageEnhance.Contrast,
            "saturation": ImageEnhance.Color,
        }
        order = list(enhancers)
        self.rng.shuffle(order)
        for name in order:
            amount = self.jitter[name]
            factor = self.rng.uniform(1.0 - amount, 1.0 + amount)
            if amount > 0:
                image = enhancers[name](image).enhance(factor)
        return image
