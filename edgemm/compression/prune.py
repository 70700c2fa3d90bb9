"""Structural pruning of edgemm models with torch-pruning's dependency graph.

A prune ratio is the fraction of channels removed from every prunable group of a part (text
tower, image tower, fusion or projection head), as torch-pruning's `pruning_ratio` defines it.
Remaining widths are rounded down to multiples of `round_to`, so INT8 kernels stay vectorised.
With `prune_heads`, attention layers lose `round(ratio * heads)` whole heads (at least one head
stays) and keep their head size, so the attention scale and the head layout are unchanged.

The model's interfaces keep their widths: the vocabulary, the RGB input of the image stem and
every layer whose output reaches a model output (classifier logits, dual encoder embeddings).
An image tower with an ImageNet classifier also keeps the width of the conv that feeds it.

After pruning, the widths are written back into the modules and configs (`sync_config`), the
model runs on the example inputs and the calibration batches, and the achieved parameter and
MAC reduction is compared with the request per part.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from edgemm.compression.profile import PartProfile, call_with_inputs, profile_model
from edgemm.errors import CompressionError, ConfigError

logger = logging.getLogger(__name__)

IMPORTANCE_NAMES = ("magnitude", "taylor")
RATIO_FIELDS = ("ratio", "text_ratio", "image_ratio", "head_ratio")
PART_RATIO_FIELDS = {"text_tower": "text_ratio", "image_tower": "image_ratio", "head": "head_ratio"}

# Layers that mix channels. Channels pass unchanged through everything else (norms, activations,
# pooling, reshapes), so a layer of these types whose output reaches a model output without
# crossing another of them defines an output width.
_CHANNEL_MIXING = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention, nn.LSTM, nn.Embedding)
_ROOT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Layer types that torch-pruning prunes and therefore must find in its traced graph.
_TRACED_TYPES = (
    nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.LayerNorm,
    nn.GroupNorm, nn.Embedding, nn.MultiheadAttention, nn.PReLU,
)

# Tensor methods that read activation values into Python, which the autograd-based tracer of
# torch-pruning cannot follow.
_VALUE_READS = frozenset({"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"})


@dataclass
class PruneConfig:
    """Settings of one structural pruning run.

    `ratio` applies to every part; `text_ratio`, `image_ratio` and `head_ratio` (the fusion or
    projection head) override it per part. A part whose ratio resolves to None is not pruned.
    Each ratio is the fraction of channels removed per prunable group, strictly between 0 and 1.
    `importance` is "magnitude" (L2 norm of the weights) or "taylor" (weight times gradient,
    averaged over `taylor_batches` calibration batches). `global_pruning` ranks channels across
    all groups of a part instead of within each group; attention heads are always ranked within
    their layer, so no layer loses all its heads. `iterative_steps` reaches the ratio in that
    many equal steps. `ignored_layers` lists module names (as in `model.named_modules()`)
    whose output width must stay. With `strict`, a part that does not shrink raises
    CompressionError; otherwise it is reported in `PruneResult.warnings`.
    """

    ratio: float | None = None
    text_ratio: float | None = None
    image_ratio: float | None = None
    head_ratio: float | None = None
    importance: str = "magnitude"
    round_to: int = 8
    prune_heads: bool = True
    global_pruning: bool = False
    iterative_steps: int = 1
    taylor_batches: int = 4
    ignored_layers: tuple[str, ...] = ()
    strict: bool = True

    def __post_init__(self) -> None:
        self.ignored_layers = tuple(self.ignored_layers)
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and its fix."""
        for name in RATIO_FIELDS:
            _check_ratio(name, getattr(self, name))
        if all(getattr(self, name) is None for name in RATIO_FIELDS):
            raise ConfigError(
                "No prune ratio is set.",
                "Set ratio (for every part) or text_ratio, image_ratio and head_ratio, e.g. ratio=0.3.",
            )
        if self.importance not in IMPORTANCE_NAMES:
            raise ConfigError(
                f"Unknown importance {self.importance!r}.",
                f"Use one of {list(IMPORTANCE_NAMES)}.",
            )
        _check_positive_int("round_to", self.round_to, "Use 8 or 16 so INT8 kernels stay vectorised.")
        _check_positive_int("iterative_steps", self.iterative_steps, "Use 1 for one-shot pruning.")
        _check_positive_int("taylor_batches", self.taylor_batches, "Use at least 1 calibration batch.")

    def ratio_for(self, part: str) -> float | None:
        """Return the prune ratio of `part` (`text_tower`, `image_tower`, `head` or `model`)."""
        specific = getattr(self, PART_RATIO_FIELDS[part]) if part in PART_RATIO_FIELDS else None
        return specific if specific is not None else self.ratio

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ignored_layers"] = list(self.ignored_layers)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PruneConfig":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown prune options: {unknown}.", f"Valid options are {sorted(known)}.")
        return cls(**dict(data))


def _check_ratio(name: str, value: Any) -> None:
    if value is None:
        return
    valid_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not valid_number or not 0.0 < float(value) < 1.0 or math.isnan(float(value)):
        raise ConfigError(
            f"Prune ratio {name}={value!r} is invalid.",
            "Use a fraction strictly between 0 and 1: 0.3 removes 30% of the channels of every "
            "prunable group. To keep a part unpruned, leave its ratio unset and do not set ratio.",
        )


def _check_positive_int(name: str, value: Any, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"Prune option {name}={value!r} is invalid; it must be a positive integer.", hint)


@dataclass
class PartReport:
    """Size of one part before and after pruning, with the ratio that was requested for it.

    `channels_*` sum the output widths of its prunable Linear and Conv layers (interface layers
    excluded), and `heads_*` sum the heads of its attention layers. MACs are for one forward
    pass on the example inputs, so they scale with their batch size and sequence length.
    """

    requested_ratio: float | None
    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    channels_before: int = 0
    channels_after: int = 0
    heads_before: int = 0
    heads_after: int = 0

    @property
    def param_reduction(self) -> float:
        return _reduction(self.params_before, self.params_after)

    @property
    def mac_reduction(self) -> float:
        return _reduction(self.macs_before, self.macs_after)

    @property
    def channel_reduction(self) -> float:
        return _reduction(self.channels_before, self.channels_after)

    @property
    def head_reduction(self) -> float:
        return _reduction(self.heads_before, self.heads_after)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            param_reduction=round(self.param_reduction, 4),
            mac_reduction=round(self.mac_reduction, 4),
            channel_reduction=round(self.channel_reduction, 4),
            head_reduction=round(self.head_reduction, 4),
        )
        return data


def _reduction(before: int, after: int) -> float:
    return 0.0 if before == 0 else 1.0 - after / before


@dataclass
class LayerChange:
    """Output width of one prunable layer before and after pruning."""

    name: str
    part: str
    before: int
    after: int


@dataclass
class PruneResult:
    """The pruned model and what pruning did to it, part by part (`total` covers the whole model)."""

    model: nn.Module
    config: PruneConfig
    parts: dict[str, PartReport]
    layers: list[LayerChange] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready summary (the model itself is left out), as stored in manifests."""
        return {
            "config": self.config.to_dict(),
            "parts": {name: report.to_dict() for name, report in self.parts.items()},
            "layers": [asdict(change) for change in self.layers],
            "warnings": list(self.warnings),
        }


# Layers of the edgemm towers that write the residual stream (or a block's output channels).
# Keeping them unpruned keeps the pretrained representation the head was trained on, and
# prunes only inner widths: attention heads, MLP and MBConv expansion channels.
RESIDUAL_WRITER_SUFFIXES = (
    "word_embeddings",
    "position_embeddings",
    "token_type_embeddings",
    "attention.output.dense",
    ".output.dense",
    "_conv_stem",
    "_project_conv",
    "_conv_head",
)


def residual_layers(model: nn.Module) -> tuple[str, ...]:
    """Return the names of the tower layers that write residual or block-output widths."""
    return tuple(
        name
        for name, _ in model.named_modules()
        if name.startswith(("text_tower.", "image_tower.")) and name.endswith(RESIDUAL_WRITER_SUFFIXES)
    )


def find_parts(model: nn.Module) -> dict[str, list[nn.Module]]:
    """Split `model` into the parts that get their own ratio.

    An edgemm architecture has `text_tower`, `image_tower` and a head made of its other
    children. Any other model is one part called `model`.
    """
    towers = {name: getattr(model, name) for name in ("text_tower", "image_tower") if isinstance(getattr(model, name, None), nn.Module)}
    if not towers:
        return {"model": [model]}
    tower_ids = {id(tower) for tower in towers.values()}
    head = [child for child in model.children() if id(child) not in tower_ids]
    parts = {name: [tower] for name, tower in towers.items()}
    parts["head"] = head
    return parts


def _part_of_modules(parts: Mapping[str, list[nn.Module]]) -> dict[nn.Module, str]:
    owner = {}
    for part, roots in parts.items():
        for root in roots:
            for module in root.modules():
                owner.setdefault(module, part)
    return owner


def find_attention_layers(model: nn.Module) -> list[nn.Module]:
    """Return modules with `query`, `key` and `value` Linear layers and int `num_heads`/`head_dim`.

    These are the attention layers of the text tower and of the cross-attention head.
    `nn.MultiheadAttention` is left out on purpose: torch-pruning 1.6 prunes its embedding width
    as a whole and, when it is listed in `num_heads`, silently skips the residual width.
    """
    layers = []
    for module in model.modules():
        projections = [getattr(module, name, None) for name in ("query", "key", "value")]
        if all(isinstance(projection, nn.Linear) for projection in projections) and isinstance(
            getattr(module, "num_heads", None), int
        ) and isinstance(getattr(module, "head_dim", None), int):
            layers.append(module)
    return layers


def _interface_layers(graph, model: nn.Module) -> list[nn.Module]:
    """Return layers whose output channels reach a model output without a channel-mixing layer."""
    interfaces = []
    for module, node in graph.module2node.items():
        if not isinstance(module, _ROOT_TYPES):
            continue
        stack, seen = list(node.outputs), set()
        reaches_output = not node.outputs
        while stack and not reaches_output:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if isinstance(current.module, _CHANNEL_MIXING) or _uses_bare_parameter(current):
                continue
            if not current.outputs:
                reaches_output = True
            stack.extend(current.outputs)
        if reaches_output:
            interfaces.append(module)

    # forward does not call an image tower's ImageNet classifier, so the trace misses that it reads
    # the head conv's channels. Keeping that width keeps `classify` working.
    image_tower = getattr(model, "image_tower", model)
    if getattr(image_tower, "classifier", None) is not None and isinstance(getattr(image_tower, "_conv_head", None), nn.Module):
        interfaces.append(image_tower._conv_head)
    return interfaces


def _uses_bare_parameter(node) -> bool:
    """Return True for an operation (such as `x @ projection`) that multiplies by a bare parameter."""
    import torch_pruning as tp

    return any(
        source.type == tp.ops.OPTYPE.PARAMETER and source.module.numel() > 1 for source in node.inputs
    )


class _ActivationReadDetector(TorchFunctionMode):
    """Record reads of activation values (`.item()`, `if tensor:`, `.numpy()`) during a forward pass.

    A tensor counts as an activation when it requires grad or was computed from one. Such reads
    steer Python control flow or leave autograd, so torch-pruning's trace misses parts of the model.
    """

    def __init__(self) -> None:
        super().__init__()
        self.derived: set[int] = set()
        self._keep_alive: list[torch.Tensor] = []
        self.reads: list[str] = []

    def _is_activation(self, value: Any) -> bool:
        return isinstance(value, torch.Tensor) and (value.requires_grad or id(value) in self.derived)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs = list(args) + list(kwargs.values())
        from_activation = any(self._is_activation(value) for value in inputs)
        if name in _VALUE_READS and from_activation:
            self.reads.append(f"Tensor.{name}")
        result = func(*args, **kwargs)
        if from_activation:
            for output in result if isinstance(result, (tuple, list)) else (result,):
                if isinstance(output, torch.Tensor) and not output.requires_grad:
                    self.derived.add(id(output))
                    # Keep the tensor alive so its id is not reused by another tensor.
                    self._keep_alive.append(output)
        return result


def _probe_forward(model: nn.Module, example_inputs: Any) -> tuple[list[nn.Module], list[str]]:
    """Run one forward pass; return the weight-carrying modules it called and its activation reads."""
    called: list[nn.Module] = []
    hooks = [
        module.register_forward_hook(lambda module, args, output: called.append(module))
        for module in model.modules()
        if isinstance(module, _TRACED_TYPES)
    ]
    detector = _ActivationReadDetector()
    try:
        with torch.enable_grad(), detector:
            call_with_inputs(model, example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return list(dict.fromkeys(called)), list(dict.fromkeys(detector.reads))


def _untraceable(model: nn.Module, reason: str) -> CompressionError:
    return CompressionError(
        f"torch-pruning cannot trace {type(model).__name__}: {reason}.",
        "List the affected modules in PruneConfig.ignored_layers, remove the data-dependent code "
        "from forward, or prune a built-in architecture (concat_fusion, cross_attention, dual_encoder).",
    )


def build_dependency_graph(model: nn.Module, example_inputs: Any):
    """Trace `model` with torch-pruning and check that the trace saw every layer forward calls.

    Raises CompressionError when tracing fails, when forward reads activation values into
    Python (data-dependent control flow, `.item()`, numpy) or when a called layer is missing
    from the traced graph (e.g. its output was detached).
    """
    import torch_pruning as tp

    called, reads = _probe_forward(model, example_inputs)
    if reads:
        raise _untraceable(model, f"forward reads activation values with {', '.join(reads)}")

    try:
        with warnings.catch_warnings():
            # PruningSession reports bare parameters itself, with a fix.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            graph = tp.DependencyGraph().build_dependency(
                model,
                example_inputs=example_inputs,
                forward_fn=call_with_inputs,
                ignored_params=_scalar_parameters(model),
            )
    except CompressionError:
        raise
    except Exception as error:  # torch-pruning raises assorted errors on graphs it cannot follow
        raise _untraceable(model, f"{type(error).__name__}: {error}") from error

    names = {module: name for name, module in model.named_modules()}
    missing = [names.get(module, type(module).__name__) for module in called if module not in graph.module2node]
    if missing:
        raise _untraceable(model, f"layers {missing[:5]} run in forward but are missing from the autograd graph")
    return graph


def _bare_parameters(model: nn.Module, graph) -> list[tuple[str, tuple[int, ...]]]:
    """Return name and shape of traced parameters with channels that no known layer owns."""
    return [
        (name, tuple(parameter.shape))
        for parameter, name in graph._param_to_name.items()
        if parameter.numel() > 1
    ]


def _scalar_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Return parameters with at most one element (such as `logit_scale`), which have no channels."""
    return [parameter for parameter in model.parameters() if parameter.numel() <= 1]


def _make_importance(name: str):
    import torch_pruning as tp

    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    return tp.importance.GroupMagnitudeImportance(p=2)


def default_calibration_loss(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Return a loss whose gradients rank channels for Taylor importance.

    With `labels` in the batch, cross-entropy on the logits. A dual encoder gets the symmetric
    InfoNCE loss of its batch (pair i matches pair i). Logits without labels use the model's own
    predictions as targets.
    """
    output = call_with_inputs(model, _model_inputs(batch))
    if isinstance(output, (tuple, list)) and len(output) == 2:
        return info_nce_loss(output[0], output[1], _logit_scale(model))
    if isinstance(output, torch.Tensor) and output.dim() == 2:
        labels = batch.get("labels")
        targets = labels if labels is not None else output.detach().argmax(dim=-1)
        return F.cross_entropy(output, targets)
    tensors = [value for value in (output if isinstance(output, (tuple, list)) else [output]) if isinstance(value, torch.Tensor)]
    return sum(value.float().pow(2).mean() for value in tensors)


def _logit_scale(model: nn.Module) -> torch.Tensor:
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        return scale.exp().clamp(max=100.0)
    return torch.tensor(1.0 / 0.07)


def info_nce_loss(text_embeds: torch.Tensor, image_embeds: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Return the symmetric InfoNCE (CLIP) loss of a batch where row i of both inputs is a pair."""
    logits = scale * text_embeds @ image_embeds.T
    targets = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


class PruningSession:
    """Pruner for one model: traces it once, then prunes it in `config.iterative_steps` steps.

    `prune_model` runs all steps at once; `edgemm.compression.recover.prune_and_recover` calls
    `step()` and recovers between steps. The model is modified in place.
    """

    def __init__(self, model: nn.Module, config: PruneConfig, example_inputs: Any):
        import torch_pruning as tp

        config.validate()
        self.model = model
        self.config = config
        self.example_inputs = example_inputs
        self.parts = find_parts(model)
        self.part_of = _part_of_modules(self.parts)
        self.names = {module: name for name, module in model.named_modules()}
        self.warnings: list[str] = []
        self.steps_done = 0
        # torch-pruning traces through autograd, so frozen parameters would hide their layers.
        for parameter in model.parameters():
            parameter.requires_grad_(True)

        graph = build_dependency_graph(model, example_inputs)
        self.owner = self._group_owners(graph)
        self.attention = [layer for layer in find_attention_layers(model) if layer.query in graph.module2node]
        self.initial_heads = {layer: layer.num_heads for layer in self.attention}
        self.interfaces = _interface_layers(graph, model)
        ignored = self.interfaces + self._named_layers(config.ignored_layers) + self._unpruned_part_layers(graph)
        if getattr(model, "architecture", "") == "cross_attention":
            # Its width follows the text tower's; `_tie_cross_attention_width` prunes it after each step.
            ignored.append(model.image_proj)
        ignored += self._too_narrow_layers(graph, ignored)
        self.ignored = list(dict.fromkeys(ignored))

        num_heads = {}
        for layer in self.attention:
            for projection in (layer.query, layer.key, layer.value):
                num_heads[projection] = layer.num_heads
        self.importance = _make_importance(config.importance)
        self.bare_parameters = _bare_parameters(model, graph)
        for name, shape in self.bare_parameters:
            self.warnings.append(
                f"Parameter {name} {shape} is used outside an nn.Linear or nn.Conv layer; torch-pruning "
                "prunes its last dimension and may keep the widths coupled to it. Wrap it in nn.Linear."
            )
        with warnings.catch_warnings():
            # torch-pruning warns about the bare parameters reported above.
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            self.pruner = tp.pruner.BasePruner(
                model,
                example_inputs,
                importance=self.importance,
                global_pruning=config.global_pruning,
                pruning_ratio=0.0,
                pruning_ratio_dict=self._ratio_dict(graph),
                iterative_steps=config.iterative_steps,
                ignored_layers=self.ignored + _scalar_parameters(model),
                round_to=config.round_to,
                num_heads=num_heads,
                prune_num_heads=False,
                prune_head_dims=False,
                forward_fn=call_with_inputs,
            )
        self.widths_before = self.layer_widths()

    def _named_layers(self, names: Iterable[str]) -> list[nn.Module]:
        modules = dict(self.model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ConfigError(
                f"ignored_layers names modules that do not exist: {missing}.",
                "Use names from model.named_modules(), e.g. 'classifier.fc2'.",
            )
        return [modules[name] for name in names]

    def ratio_of(self, module: nn.Module) -> float | None:
        """Return the prune ratio that applies to `module`'s output channels."""
        return self.config.ratio_for(self.owner.get(module, self.part_of.get(module, "model")))

    def _unpruned_part_layers(self, graph) -> list[nn.Module]:
        """Return the prunable layers of parts without a ratio, so their widths stay."""
        return [module for module in graph.module2node if isinstance(module, _ROOT_TYPES) and self.ratio_of(module) is None]

    def _too_narrow_layers(self, graph, ignored: list[nn.Module]) -> list[nn.Module]:
        """Return layers whose rounded width after pruning would be zero; their groups keep their width.

        torch-pruning rounds the remaining width down to `round_to`, so a 12-channel layer at
        ratio 0.5 and round_to 8 would otherwise lose all its channels.
        """
        narrow = []
        for module in graph.module2node:
            if not isinstance(module, _ROOT_TYPES) or module in ignored or _is_depthwise(module):
                continue
            ratio = self.ratio_of(module)
            if ratio is None:
                continue
            width = _out_width(module)
            kept = int(width * (1.0 - ratio))
            if kept - kept % self.config.round_to <= 0:
                narrow.append(module)
                self.warnings.append(
                    f"{self.names.get(module)} keeps its {width} channels: pruning it at ratio "
                    f"{ratio} would leave fewer than round_to={self.config.round_to}."
                )
        return narrow

    def _ratio_dict(self, graph) -> dict[Any, float]:
        """Map each part's layers (as one tuple, which torch-pruning treats as one scope) to its ratio.

        A channel group that spans a tower and the head (the text residual width runs through
        the cross-attention blocks) belongs to the tower, so the tower's ratio sets its width.
        """
        members: dict[str, list[nn.Module]] = {}
        for module in graph.module2node:
            if module in self.part_of and not list(module.children()):
                part = self.owner.get(module, self.part_of[module])
                members.setdefault(part, []).append(module)
        ratios = {}
        for part, modules in members.items():
            ratio = self.config.ratio_for(part)
            if ratio is not None and modules:
                ratios[tuple(modules)] = ratio
        return ratios

    def _group_owners(self, graph) -> dict[nn.Module, str]:
        """Return the owning tower of head layers whose output channels are coupled to a tower."""
        towers = [part for part in ("text_tower", "image_tower") if part in self.parts]
        owner: dict[nn.Module, str] = {}
        for group in graph.get_all_groups(root_module_types=_ROOT_TYPES):
            modules = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
            parts = {self.part_of.get(module) for module in modules}
            tower = next((part for part in towers if part in parts), None)
            if tower is not None and len(parts) > 1:
                for module in modules:
                    owner[module] = tower
        return owner

    def layer_widths(self) -> dict[nn.Module, int]:
        """Return the output width of every prunable layer that is not an interface."""
        interfaces = set(self.interfaces)
        return {
            module: _out_width(module)
            for module in self.model.modules()
            if isinstance(module, _ROOT_TYPES) and module not in interfaces
        }

    def step(self, calibration_batches: Sequence[Mapping[str, Any]] | None = None, loss_fn: Callable | None = None) -> None:
        """Prune one step: attention heads first, then channel widths; then sync the configs."""
        if self.steps_done >= self.config.iterative_steps:
            raise CompressionError(
                f"All {self.config.iterative_steps} pruning steps have run.",
                "Create a new session with a higher iterative_steps to prune further.",
            )
        self.steps_done += 1
        if self.config.importance == "taylor":
            self._accumulate_gradients(calibration_batches, loss_fn)
        try:
            if self.config.prune_heads:
                self._prune_heads()
            self.pruner.step()
        except AssertionError as error:
            # torch-pruning checks widths with assert, e.g. nn.MultiheadAttention's embed_dim.
            raise CompressionError(
                f"torch-pruning rejected a pruning step of {type(self.model).__name__}: {error}.",
                "Try another round_to or ratio, or list the layer in ignored_layers.",
            ) from error
        finally:
            self.model.zero_grad(set_to_none=True)
        self.sync()

    def _accumulate_gradients(self, calibration_batches, loss_fn) -> None:
        if not calibration_batches:
            raise ConfigError(
                "Taylor importance needs calibration batches, but none were given.",
                "Pass calibration_batches (dicts of model inputs, optionally with labels) or use importance='magnitude'.",
            )
        loss_fn = loss_fn or default_calibration_loss
        self.model.zero_grad(set_to_none=True)
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in list(calibration_batches)[: self.config.taylor_batches]:
                loss = loss_fn(self.model, batch)
                loss.backward()
        finally:
            self.model.train(was_training)

    def _prune_heads(self) -> None:
        """Remove the least important whole heads of each attention layer for this step."""
        import torch_pruning as tp

        graph = self.pruner.DG
        for layer in self.attention:
            ratio = self.ratio_of(layer.query)
            if ratio is None or layer.query in self.ignored:
                continue
            initial = self.initial_heads[layer]
            target_removed = min(initial - 1, round(ratio * initial * self.steps_done / self.config.iterative_steps))
            count = target_removed - (initial - layer.num_heads)
            if count <= 0:
                continue

            head_dim = layer.head_dim
            channels = list(range(layer.query.out_features))
            group = graph.get_pruning_group(layer.query, tp.prune_linear_out_channels, channels)
            scores = self.importance(group)
            if scores is None:
                continue
            head_scores = scores.reshape(layer.num_heads, head_dim).mean(dim=1)
            heads = torch.topk(head_scores, k=count, largest=False).indices.tolist()
            indices = [head * head_dim + offset for head in sorted(heads) for offset in range(head_dim)]
            graph.get_pruning_group(layer.query, tp.prune_linear_out_channels, indices).prune()

            layer.num_heads -= count
            for projection in (layer.query, layer.key, layer.value):
                self.pruner.num_heads[projection] = layer.num_heads
                self.pruner.out_channel_groups[projection] = layer.num_heads

    def sync(self) -> None:
        """Write head counts and widths back into the attention modules and the configs."""
        for layer in self.attention:
            widths = {layer.query.out_features, layer.key.out_features, layer.value.out_features}
            inner = layer.query.out_features
            if len(widths) != 1 or inner % layer.num_heads != 0:
                raise CompressionError(
                    f"Attention layer {self.names.get(layer)} is inconsistent after pruning: "
                    f"query/key/value widths {sorted(widths)} with {layer.num_heads} heads.",
                    "Prune with prune_heads=True, or list the layer's query, key and value in ignored_layers.",
                )
            layer.head_dim = inner // layer.num_heads
        _tie_cross_attention_width(self)
        heads = {
            projection: layer.num_heads
            for layer in self.attention
            for projection in (layer.query, layer.key, layer.value)
        }
        syncers = [self.model] if hasattr(self.model, "sync_config") else [
            module for module in self.model.modules() if hasattr(module, "sync_config")
        ]
        for module in syncers:
            try:
                if inspect.signature(module.sync_config).parameters:
                    module.sync_config(heads)
                else:
                    module.sync_config()
            except CompressionError:
                raise
            except Exception as error:  # a config that rejects the new widths (ConfigError, ValueError)
                raise CompressionError(
                    f"The pruned widths of {type(module).__name__} do not form a valid config: {error}.",
                    "Lower the ratio or round_to so every layer keeps at least round_to channels.",
                ) from error


def _tie_cross_attention_width(session: PruningSession) -> None:
    """Prune the image projection of a cross-attention head to the text width, if they differ.

    The head's config records one token width for both sides, so the image projection must
    output as many channels as the text tower's hidden size.
    """
    import torch_pruning as tp

    model = session.model
    image_proj = getattr(model, "image_proj", None)
    text_tower = getattr(model, "text_tower", None)
    if getattr(model, "architecture", "") != "cross_attention" or image_proj is None or text_tower is None:
        return
    text_width = text_tower.embeddings.word_embeddings.embedding_dim
    excess = image_proj.out_features - text_width
    if excess < 0:
        raise CompressionError(
            f"Cross-attention image projection has {image_proj.out_features} channels, fewer than the "
            f"text width {text_width}.",
            "edgemm only ever prunes image_proj down to the text width, so this is a bug: report it with the PruneConfig.",
        )
    if excess == 0:
        return
    graph = session.pruner.DG
    group = graph.get_pruning_group(image_proj, tp.prune_linear_out_channels, list(range(image_proj.out_features)))
    scores = session.importance(group)
    order = torch.argsort(scores) if scores is not None else torch.arange(image_proj.out_features)
    graph.get_pruning_group(image_proj, tp.prune_linear_out_channels, sorted(order[:excess].tolist())).prune()


def _out_width(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels


def _output_shapes(model: nn.Module, inputs: Any) -> list[tuple[int, ...]]:
    with torch.no_grad():
        output = call_with_inputs(model, inputs)
    values = output if isinstance(output, (tuple, list)) else [output]
    return [tuple(value.shape) for value in values if isinstance(value, torch.Tensor)]


def _check_forward(model: nn.Module, inputs: Any, expected: list[tuple[int, ...]], what: str) -> None:
    try:
        shapes = _output_shapes(model, inputs)
    except Exception as error:  # any failure here means pruning left the model inconsistent
        raise CompressionError(
            f"The pruned {type(model).__name__} fails on {what}: {type(error).__name__}: {error}.",
            "A module probably keeps a stale width attribute (such as num_heads or head_dim); give it "
            "a sync_config() that re-reads widths from its layers, or list it in ignored_layers.",
        ) from error
    if shapes != expected:
        raise CompressionError(
            f"Pruning changed the outputs of {type(model).__name__} on {what}: {expected} became {shapes}.",
            "List the layers that produce the outputs in PruneConfig.ignored_layers.",
        )


def _heads_of(layers: Iterable[nn.Module]) -> int:
    return sum(layer.num_heads for layer in layers)


def _build_reports(
    session: PruningSession,
    before: Mapping[str, PartProfile],
    after: Mapping[str, PartProfile],
    heads_before: Mapping[str, int],
) -> tuple[dict[str, PartReport], list[LayerChange]]:
    widths_after = session.layer_widths()
    changes = [
        LayerChange(
            name=session.names.get(module, type(module).__name__),
            part=session.part_of.get(module, "model"),
            before=width,
            after=widths_after.get(module, width),
        )
        for module, width in session.widths_before.items()
    ]
    profiles_before, profiles_after = dict(before), dict(after)
    if "model" in session.parts:
        # A model without towers is one part; its profile is the total.
        profiles_before["model"], profiles_after["model"] = before["total"], after["total"]
    reports = {}
    for name in profiles_before:
        members = [change for change in changes if name == "total" or change.part == name]
        layers = [layer for layer in session.attention if name == "total" or session.part_of.get(layer) == name]
        reports[name] = PartReport(
            requested_ratio=session.config.ratio if name == "total" else session.config.ratio_for(name),
            params_before=profiles_before[name].params,
            params_after=profiles_after[name].params,
            macs_before=profiles_before[name].macs,
            macs_after=profiles_after[name].macs,
            channels_before=sum(change.before for change in members),
            channels_after=sum(change.after for change in members),
            heads_before=heads_before.get(name, 0),
            heads_after=_heads_of(layers),
        )
    return reports, changes


def _check_shrinkage(session: PruningSession, reports: Mapping[str, PartReport], changes: list[LayerChange]) -> list[str]:
    """Return warnings for parts that shrank less than requested; raise for parts that did not shrink."""
    messages = []
    protected = {session.names.get(module) for module in session.ignored}
    for part, report in reports.items():
        ratio = report.requested_ratio
        if part == "total" or ratio is None:
            continue
        if report.params_after >= report.params_before and report.channels_after >= report.channels_before:
            message = (
                f"{part} did not shrink: {report.params_before} parameters before and after at requested "
                f"ratio {ratio}. torch-pruning found no prunable group there (for example a residual "
                "width coupled to nn.MultiheadAttention heads or to a bare nn.Parameter projection)."
            )
            if session.config.strict:
                raise CompressionError(
                    message,
                    "Check the model's layers against find_attention_layers, replace bare parameter "
                    "projections with nn.Linear, or pass strict=False to accept it.",
                )
            messages.append(message)
            continue
        untouched = [
            change
            for change in changes
            if change.part == part and change.before == change.after and change.name not in protected
            and change.before >= 2 * session.config.round_to
        ]
        if untouched:
            listed = ", ".join(f"{change.name} ({change.before})" for change in untouched[:6])
            more = f" and {len(untouched) - 6} more" if len(untouched) > 6 else ""
            messages.append(
                f"{part}: {len(untouched)} prunable layers kept their width at requested ratio {ratio}: "
                f"{listed}{more}. torch-pruning skipped their groups (a residual width that did not "
                "shrink usually means an attention module or bare parameter blocked it)."
            )
        if report.param_reduction < 0.5 * ratio:
            full_width = [name for name in session.config.ignored_layers if name.startswith(part + ".")]
            shrink = f"{part}: parameters shrank by {report.param_reduction:.1%}, less than half the requested channel ratio {ratio}"
            if full_width:
                # Expected: the layers kept at full width (keep_residual keeps the embeddings and
                # the residual width) contain most of the parameters.
                logger.info("%s, because %d layers keep their full width (ignored_layers).", shrink, len(full_width))
            else:
                messages.append(shrink + ".")
    return messages


def _check_round_to(session: PruningSession, changes: list[LayerChange]) -> list[str]:
    step = session.config.round_to
    off = [change for change in changes if change.after != change.before and change.after % step != 0]
    if not off:
        return []
    listed = ", ".join(f"{change.name} ({change.after})" for change in off[:6])
    return [f"{len(off)} pruned layers have widths that are not multiples of round_to={step}: {listed}."]


def prune_model(
    model: nn.Module,
    config: PruneConfig,
    example_inputs: Any,
    calibration_batches: Sequence[Mapping[str, Any]] | None = None,
    *,
    loss_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
    inplace: bool = False,
) -> PruneResult:
    """Prune `model` structurally as `config` requests and return the pruned model with a report.

    `example_inputs` is a tensor, a tuple of positional inputs or a dict of keyword inputs (for
    edgemm architectures: `input_ids`, `attention_mask`, `pixel_values`). They are used for
    tracing and for counting MACs. `calibration_batches` are dicts of model inputs, optionally with
    `labels`; Taylor importance needs them and every batch is run through the pruned model as a
    check. `loss_fn(model, batch)` replaces `default_calibration_loss`. Unless `inplace`, the
    input model is left untouched and a pruned copy is returned.

    Raises ConfigError for invalid settings and CompressionError when the model cannot be
    traced, when the pruned model fails or changes its output shapes, or (with `config.strict`)
    when a part with a ratio did not shrink.
    """
    config.validate()
    if not inplace:
        model = copy.deepcopy(model)
    was_training = model.training
    model.eval()

    expected_shapes = _output_shapes(model, example_inputs)
    expected_batches = [_output_shapes(model, _model_inputs(batch)) for batch in calibration_batches or []]
    before = profile_model(model, example_inputs)

    session = PruningSession(model, config, example_inputs)
    heads_before = _heads_by_part(session)
    for _ in range(config.iterative_steps):
        session.step(calibration_batches, loss_fn)
        logger.info("Pruning step %d of %d done", session.steps_done, config.iterative_steps)

    result = finish_pruning(session, before, heads_before, expected_shapes, calibration_batches, expected_batches)
    model.train(was_training)
    return result


def _heads_by_part(session: PruningSession) -> dict[str, int]:
    heads: dict[str, int] = {"total": _heads_of(session.attention)}
    for layer in session.attention:
        part = session.part_of.get(layer, "model")
        heads[part] = heads.get(part, 0) + layer.num_heads
    return heads


def _model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in batch.items() if key not in ("labels", "label")}


def finish_pruning(
    session: PruningSession,
    before: Mapping[str, PartProfile],
    heads_before: Mapping[str, int],
    expected_shapes: list[tuple[int, ...]],
    calibration_batches: Sequence[Mapping[str, Any]] | None = None,
    expected_batches: Sequence[list[tuple[int, ...]]] = (),
) -> PruneResult:
    """Check the pruned model on real inputs and build its report (used after the last step)."""
    model = session.model
    _check_forward(model, session.example_inputs, expected_shapes, "the example inputs")
    for index, (batch, shapes) in enumerate(zip(calibration_batches or [], expected_batches)):
        _check_forward(model, _model_inputs(batch), shapes, f"calibration batch {index}")

    after = profile_model(model, session.example_inputs)
    reports, changes = _build_reports(session, before, after, heads_before)
    warnings = list(session.warnings)
    warnings += _check_shrinkage(session, reports, changes)
    warnings += _check_round_to(session, changes)
    for message in warnings:
        logger.warning("%s", message)
    total = reports["total"]
    logger.info(
        "Pruned %s: parameters %d -> %d (-%.1f%%), MACs %d -> %d (-%.1f%%)",
        type(model).__name__, total.params_before, total.params_after, 100 * total.param_reduction,
        total.macs_before, total.macs_after, 100 * total.mac_reduction,
    )
    return PruneResult(model=model, config=session.config, parts=reports, layers=changes, warnings=warnings)
