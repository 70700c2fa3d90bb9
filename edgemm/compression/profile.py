"""Count parameters and multiply-accumulates (MACs) of a model, per tower and in total.

MACs come from `torch.utils.flop_counter.FlopCounterMode`, which counts matrix products and
convolutions at the ATen level, so attention score and context matmuls are included.
`torch_pruning.utils.count_ops_and_params` (1.6.1) counts through module hooks only and misses
the `q @ k^T` and `attn @ v` products of an attention block written with `torch.matmul`.
Element-wise work (activations, normalisation, softmax) is not counted, as usual for MACs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

aten = torch.ops.aten

# Attribute names of the towers of an edgemm architecture. The rest of the model is the fusion or
# projection head.
TOWER_ATTRIBUTES = ("text_tower", "image_tower")


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# NOTE: torch 2.13 has no FLOP formula for the CPU kernel of scaled_dot_product_attention, so the
# counter would report 0 for `F.scaled_dot_product_attention` and `nn.MultiheadAttention` on CPU.
_EXTRA_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}


@dataclass(frozen=True)
class PartProfile:
    """Parameter count and MACs of one part of a model for one batch of example inputs."""

    params: int
    macs: int

    def to_dict(self) -> dict[str, int]:
        return {"params": self.params, "macs": self.macs}


def call_with_inputs(module: nn.Module, example_inputs: Any) -> Any:
    """Call `module` on a tensor, a tuple/list of positional arguments or a dict of keywords."""
    if isinstance(example_inputs, Mapping):
        return module(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return module(*example_inputs)
    return module(example_inputs)


def count_params(module: nn.Module) -> int:
    """Return the number of distinct parameter elements of `module` (shared tensors count once)."""
    return sum(parameter.numel() for parameter in module.parameters())


def _count_flops_by_module(model: nn.Module, example_inputs: Any) -> dict[str, int]:
    """Run one forward pass and return FLOPs per module path ("Global" is the total)."""
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        # Gradients stay enabled on purpose: under no_grad, nn.MultiheadAttention takes a fused
        # fast path (`_native_multi_head_attention`) that the counter cannot see.
        with torch.enable_grad(), counter:
            call_with_inputs(model, example_inputs)
    finally:
        model.train(was_training)
    return {name: sum(counts.values()) for name, counts in counter.get_flop_counts().items()}


def count_params_and_macs(module: nn.Module, example_inputs: Any) -> tuple[int, int]:
    """Return `(params, macs)` of `module` for one forward pass on `example_inputs`.

    MACs are FLOPs of matmuls, linear layers, convolutions and attention divided by two. They
    scale with the batch size and sequence length of `example_inputs`.
    """
    flops = _count_flops_by_module(module, example_inputs)
    return count_params(module), flops.get("Global", 0) // 2


def profile_model(model: nn.Module, example_inputs: Any) -> dict[str, PartProfile]:
    """Return parameters and MACs for each tower, for the head and for the whole model.

    The keys are `text_tower` and `image_tower` (when the model has them), `head` (everything
    else: fusion layers, projections, classifier) and `total`. A model without towers gets
    only `total`.
    """
    flops = _count_flops_by_module(model, example_inputs)
    root_name = type(model).__name__
    total = PartProfile(params=count_params(model), macs=flops.get("Global", 0) // 2)

    towers: dict[str, PartProfile] = {}
    for attribute in TOWER_ATTRIBUTES:
        tower = getattr(model, attribute, None)
        if isinstance(tower, nn.Module):
            towers[attribute] = PartProfile(
                params=count_params(tower),
                macs=flops.get(f"{root_name}.{attribute}", 0) // 2,
            )
    if not towers:
        return {"total": total}

    head = PartProfile(
        params=total.params - sum(part.params for part in towers.values()),
        macs=total.macs - sum(part.macs for part in towers.values()),
    )
    return {**towers, "head": head, "total": total}
