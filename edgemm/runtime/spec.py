"""Input specification shared by checkpoints, model packages and the runtime.

The same `InputSpec` drives preprocessing in training, calibration, validation and on the
device, so what was calibrated is what runs. Torch-free by design.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from edgemm.errors import ConfigError


@dataclass(frozen=True)
class TextSpec:
    """How raw text becomes `input_ids` and `attention_mask`."""

    tokenizer: str = "wordpiece"
    vocab_file: str = "vocab.txt"
    lowercase: bool = True
    strip_accents: bool = True
    max_length: int = 64
    cls_token: str = "[CLS]"
    sep_token: str = "[SEP]"
    pad_token: str = "[PAD]"
    unk_token: str = "[UNK]"
    input_names: tuple[str, str] = ("input_ids", "attention_mask")
    dtype: str = "int64"


@dataclass(frozen=True)
class ImageSpec:
    """How a decoded image becomes `pixel_values` (float32, NCHW, RGB).

    Steps: resize the shorter side to `resize` with `resample`, centre-crop to `crop` x `crop`,
    then `(pixel - mean) / std` per channel on the 0-255 scale.
    """

    resize: int = 256
    crop: int = 224
    resample: str = "bilinear"
    mean: tuple[float, float, float] = (127.0, 127.0, 127.0)
    std: tuple[float, float, float] = (128.0, 128.0, 128.0)
    channel_order: str = "RGB"
    layout: str = "NCHW"
    input_name: str = "pixel_values"
    dtype: str = "float32"


@dataclass(frozen=True)
class InputSpec:
    text: TextSpec = field(default_factory=TextSpec)
    image: ImageSpec = field(default_factory=ImageSpec)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputSpec":
        try:
            text = dict(data["text"])
            image = dict(data["image"])
            text["input_names"] = tuple(text.get("input_names", TextSpec.input_names))
            image["mean"] = tuple(float(v) for v in image["mean"])
            image["std"] = tuple(float(v) for v in image["std"])
            return cls(text=TextSpec(**text), image=ImageSpec(**image))
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f"Invalid input spec: {error}.",
                "Expected {'text': {...}, 'image': {...}} with the fields of TextSpec and ImageSpec.",
            ) from error
