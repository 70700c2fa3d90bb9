"""Text-image architectures built on a TextTower and an ImageTower.

All three share one three-step interface so that tower features can be computed once and cached:

    text_features(input_ids, attention_mask) -> Tensor
    image_features(pixel_values) -> Tensor
    head(text_feats, attention_mask, image_feats) -> output
    forward(input_ids, attention_mask, pixel_values) == head(text_features(...), attention_mask, image_features(...))

Every head width is recorded in the model's config, and `sync_config()` re-reads the widths
after pruning so `build_model(model.config)` rebuilds the pruned model.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

import torch
from torch import nn
from torch.nn import functional as F

from edgemm.errors import CompressionError, ConfigError
from edgemm.models.configs import dataclass_from_dict
from edgemm.models.image import ImageTower
from edgemm.models.text import TextTower, heads_from_mapping, masked_mean, sync_attention_heads


def _check_positive(name: str, value: int) -> None:
    if int(value) <= 0:
        raise ConfigError(f"Head option {name}={value} is invalid.", f"{name} must be a positive integer.")


class MLPHead(nn.Module):
    """Linear -> GELU -> Dropout -> Linear."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(self.act(self.fc1(x))))


class FusionModel(nn.Module):
    """Base class: the two towers, the config dict and the shared `forward`."""

    architecture = ""

    def __init__(self, text_tower: TextTower, image_tower: ImageTower):
        super().__init__()
        self.text_tower = text_tower
        self.image_tower = image_tower

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor):
        text_feats = self.text_features(input_ids, attention_mask)
        image_feats = self.image_features(pixel_values)
        return self.head(text_feats, attention_mask, image_feats)

    @property
    def head_config(self) -> Any:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        """Architecture, tower configs and head config as a JSON-ready dict that `build_model` accepts."""
        return {
            "architecture": self.architecture,
            "text_tower": self.text_tower.config.to_dict(),
            "image_tower": self.image_tower.config.to_dict(),
            "head": asdict(self.head_config),
        }

    def sync_config(self, num_heads: Mapping[nn.Module, int] | None = None) -> dict[str, Any]:
        """Re-read all widths (towers and head) from the modules after pruning and return the config.

        `num_heads` is torch-pruning's `pruner.num_heads` (head count keyed by query/key/value
        Linear modules). It is needed only when head sizes, not whole heads, were pruned.
        """
        self.text_tower.sync_config(num_heads)
        self.image_tower.sync_config()
        self._sync_head(num_heads)
        return copy.deepcopy(self.config)

    def _sync_head(self, num_heads: Mapping[nn.Module, int] | None) -> None:
        raise NotImplementedError


@dataclass
class ConcatHeadConfig:
    """Widths of the concat head. `text_dim`/`image_dim` are filled from the towers when None."""

    num_labels: int = 2
    proj_dim: int = 256
    hidden_dim: int = 256
    dropout: float = 0.1
    text_dim: int | None = None
    image_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_labels", "proj_dim", "hidden_dim"):
            _check_positive(name, getattr(self, name))


class ConcatFusionClassifier(FusionModel):
    """Classify a pair from its pooled features: MLP over [t, i, t * i] of projected features.

    The product term lets a small MLP score agreement between the two projections, which plain
    concatenation learns poorly.
    """

    architecture = "concat_fusion"

    def __init__(self, text_tower: TextTower, image_tower: ImageTower, config: ConcatHeadConfig | None = None):
        super().__init__(text_tower, image_tower)
        config = config if config is not None else ConcatHeadConfig()
        config = replace(
            config,
            text_dim=config.text_dim or text_tower.hidden_size,
            image_dim=config.image_dim or image_tower.out_channels,
        )
        self._head_config = config
        self.text_proj = nn.Linear(config.text_dim, config.proj_dim)
        self.text_norm = nn.LayerNorm(config.proj_dim)
        self.image_proj = nn.Linear(config.image_dim, config.proj_dim)
        self.image_norm = nn.LayerNorm(config.proj_dim)
        self.classifier = MLPHead(3 * config.proj_dim, config.hidden_dim, config.num_labels, config.dropout)

    @property
    def head_config(self) -> ConcatHeadConfig:
        return self._head_config

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return pooled text features [B, H]."""
        return self.text_tower(input_ids, attention_mask)[1]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return pooled image features [B, C]."""
        return self.image_tower(pixel_values)[1]

    def head(self, text_feats: torch.Tensor, attention_mask: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        """Return logits [B, num_labels]. `attention_mask` is unused because the text is already pooled."""
        text = self.text_norm(self.text_proj(text_feats))
        image = self.image_norm(self.image_proj(image_feats))
        return self.classifier(torch.cat([text, image, text * image], dim=-1))

    def _sync_head(self, num_heads: Mapping[nn.Module, int] | None) -> None:
        if self.text_proj.out_features != self.image_proj.out_features:
            raise CompressionError(
                f"Concat head projections differ after pruning: text {self.text_proj.out_features}, "
                f"image {self.image_proj.out_features}.",
                "Prune both projections together, because their product needs equal widths.",
            )
        self._head_config = replace(
            self._head_config,
            text_dim=self.text_proj.in_features,
            image_dim=self.image_proj.in_features,
            proj_dim=self.text_proj.out_features,
            hidden_dim=self.classifier.fc1.out_features,
            num_labels=self.classifier.fc2.out_features,
        )


@dataclass
class CrossAttentionHeadConfig:
    """Widths of the cross-attention head, with one list entry per cross-attention block.

    `width` is the token width inside the head and equals the text tower's hidden size, because
    text tokens enter the blocks unchanged. Fields left as None are derived when the model is built.
    """

    num_labels: int = 2
    num_layers: int = 1
    num_heads: list[int] | int = 4
    head_dims: list[int] | None = None
    ffn_dims: list[int] | None = None
    hidden_dim: int = 256
    dropout: float = 0.1
    width: int | None = None
    image_dim: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_labels", "num_layers", "hidden_dim"):
            _check_positive(name, getattr(self, name))


class CrossAttentionBlock(nn.Module):
    """Pre-norm block: text tokens attend to image tokens, then a feed-forward layer."""

    def __init__(self, width: int, num_heads: int, head_dim: int, ffn_dim: int, dropout: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.norm_text = nn.LayerNorm(width)
        self.norm_image = nn.LayerNorm(width)
        self.query = nn.Linear(width, inner)
        self.key = nn.Linear(width, inner)
        self.value = nn.Linear(width, inner)
        self.out = nn.Linear(inner, width)
        self.drop = nn.Dropout(dropout)
        self.norm_ffn = nn.LayerNorm(width)
        self.ffn = MLPHead(width, ffn_dim, width, dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, text: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        normed_text = self.norm_text(text)
        normed_image = self.norm_image(image)
        query = self._split_heads(self.query(normed_text))
        key = self._split_heads(self.key(normed_image))
        value = self._split_heads(self.value(normed_image))

        scores = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        probs = self.drop(torch.softmax(scores, dim=-1))
        context = torch.matmul(probs, value).transpose(1, 2)
        context = context.reshape(context.shape[0], -1, self.num_heads * self.head_dim)

        text = text + self.drop(self.out(context))
        return text + self.drop(self.ffn(self.norm_ffn(text)))


class CrossAttentionFusion(FusionModel):
    """Classifier in which text tokens attend to image feature-map tokens before masked mean pooling."""

    architecture = "cross_attention"

    def __init__(self, text_tower: TextTower, image_tower: ImageTower, config: CrossAttentionHeadConfig | None = None):
        super().__init__(text_tower, image_tower)
        config = self._complete(config if config is not None else CrossAttentionHeadConfig(), text_tower, image_tower)
        self._head_config = config
        self.image_proj = nn.Linear(config.image_dim, config.width)
        self.blocks = nn.ModuleList(
            CrossAttentionBlock(config.width, heads, head_dim, ffn, config.dropout)
            for heads, head_dim, ffn in zip(config.num_heads, config.head_dims, config.ffn_dims)
        )
        self.norm = nn.LayerNorm(config.width)
        self.classifier = MLPHead(config.width, config.hidden_dim, config.num_labels, config.dropout)

    @staticmethod
    def _complete(config: CrossAttentionHeadConfig, text_tower: TextTower, image_tower: ImageTower) -> CrossAttentionHeadConfig:
        width = config.width or text_tower.hidden_size
        layers = config.num_layers
        heads = config.num_heads if isinstance(config.num_heads, list) else [int(config.num_heads)] * layers
        if config.head_dims is None:
            if width % heads[0] != 0:
                raise ConfigError(
                    f"Cross-attention width {width} is not divisible by num_heads={heads[0]}.",
                    "Choose num_heads that divides the text tower's hidden size.",
                )
            head_dims = [width // heads[0]] * layers
        else:
            head_dims = list(config.head_dims)
        ffn_dims = list(config.ffn_dims) if config.ffn_dims is not None else [2 * width] * layers
        if not len(heads) == len(head_dims) == len(ffn_dims) == layers:
            raise ConfigError(
                f"Cross-attention head config has num_layers={layers} but {len(heads)} head counts, "
                f"{len(head_dims)} head sizes and {len(ffn_dims)} feed-forward sizes.",
                "Give one value per block in each list.",
            )
        return replace(
            config,
            num_heads=heads,
            head_dims=head_dims,
            ffn_dims=ffn_dims,
            width=width,
            image_dim=config.image_dim or image_tower.out_channels,
        )

    @property
    def head_config(self) -> CrossAttentionHeadConfig:
        return self._head_config

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return text tokens [B, L, H]."""
        return self.text_tower(input_ids, attention_mask)[0]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return image feature-map tokens [B, h * w, C]."""
        feature_map = self.image_tower(pixel_values)[0]
        return feature_map.flatten(2).transpose(1, 2)

    def head(self, text_feats: torch.Tensor, attention_mask: torch.Tensor, image_feats: torch.Tensor) -> torch.Tensor:
        """Return logits [B, num_labels]."""
        image = self.image_proj(image_feats)
        text = text_feats
        for block in self.blocks:
            text = block(text, image)
        pooled = masked_mean(self.norm(text), attention_mask)
        return self.classifier(pooled)

    def _sync_head(self, num_heads: Mapping[nn.Module, int] | None) -> None:
        heads, head_dims, ffn_dims = [], [], []
        for index, block in enumerate(self.blocks):
            requested = heads_from_mapping(num_heads, block)
            count, head_dim = sync_attention_heads(block, requested, f"Cross-attention block {index}")
            heads.append(count)
            head_dims.append(head_dim)
            ffn_dims.append(block.ffn.fc1.out_features)
        self._head_config = replace(
            self._head_config,
            num_heads=heads,
            head_dims=head_dims,
            ffn_dims=ffn_dims,
            width=self.image_proj.out_features,
            image_dim=self.image_proj.in_features,
            hidden_dim=self.classifier.fc1.out_features,
            num_labels=self.classifier.fc2.out_features,
        )


@dataclass
class DualEncoderHeadConfig:
    """Widths of the dual encoder projections. `text_dim`/`image_dim` are filled from the towers."""

    embed_dim: int = 256
    logit_scale_init: float = math.log(1 / 0.07)
    text_dim: int | None = None
    image_dim: int | None = None

    def __post_init__(self) -> None:
        _check_positive("embed_dim", self.embed_dim)


class DualEncoder(FusionModel):
    """CLIP-style dual encoder: L2-normalised text and image embeddings and a learned `logit_scale`.

    Similarity logits for a batch are `logit_scale.exp() * text_embeds @ image_embeds.T`.
    """

    architecture = "dual_encoder"

    def __init__(self, text_tower: TextTower, image_tower: ImageTower, config: DualEncoderHeadConfig | None = None):
        super().__init__(text_tower, image_tower)
        config = config if config is not None else DualEncoderHeadConfig()
        config = replace(
            config,
            text_dim=config.text_dim or text_tower.hidden_size,
            image_dim=config.image_dim or image_tower.out_channels,
        )
        self._head_config = config
        # nn.Linear, not bare parameters, so torch-pruning traces the projections as prunable layers.
        self.text_proj = nn.Linear(config.text_dim, config.embed_dim, bias=False)
        self.image_proj = nn.Linear(config.image_dim, config.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))

    @property
    def head_config(self) -> DualEncoderHeadConfig:
        return self._head_config

    def text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return pooled text features [B, H]."""
        return self.text_tower(input_ids, attention_mask)[1]

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return pooled image features [B, C]."""
        return self.image_tower(pixel_values)[1]

    def project_text(self, text_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_feats), dim=-1)

    def project_image(self, image_feats: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_proj(image_feats), dim=-1)

    def head(
        self, text_feats: torch.Tensor, attention_mask: torch.Tensor, image_feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(text_embeds, image_embeds)`, each L2-normalised [B, embed_dim]."""
        return self.project_text(text_feats), self.project_image(image_feats)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised text embeddings [B, embed_dim]."""
        return self.project_text(self.text_features(input_ids, attention_mask))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Return L2-normalised image embeddings [B, embed_dim]."""
        return self.project_image(self.image_features(pixel_values))

    def _sync_head(self, num_heads: Mapping[nn.Module, int] | None) -> None:
        if self.text_proj.out_features != self.image_proj.out_features:
            raise CompressionError(
                f"Dual encoder projections differ after pruning: text {self.text_proj.out_features}, "
                f"image {self.image_proj.out_features}.",
                "Prune both projections together or not at all, because the embeddings must share one space.",
            )
        self._head_config = replace(
            self._head_config,
            embed_dim=self.text_proj.out_features,
            text_dim=self.text_proj.in_features,
            image_dim=self.image_proj.in_features,
        )


HEAD_CONFIGS = {
    "concat_fusion": ConcatHeadConfig,
    "cross_attention": CrossAttentionHeadConfig,
    "dual_encoder": DualEncoderHeadConfig,
}


def head_config_from_dict(architecture: str, data: Mapping[str, Any]):
    """Build the head config dataclass of `architecture` from a dict."""
    return dataclass_from_dict(HEAD_CONFIGS[architecture], data, f"{architecture} head")
