"""Single-process or torchrun (DDP, gloo backend on CPU) execution context for training.

Under `torchrun --nproc_per_node N` the launcher sets WORLD_SIZE, RANK and the rendezvous
address. One process per rank then trains on its shard of every epoch, and DDP averages the
gradients.
Only rank 0 writes files and reports progress.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    rank: int = 0
    world_size: int = 1
    owns_process_group: bool = False

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_gather_objects(self, value: Any) -> list[Any]:
        """Return the `value` of every rank, in rank order (just `[value]` in one process)."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def init_distributed() -> DistributedContext:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1.

    Uses the gloo backend because training runs on CPU. A process group that the caller already
    set up is reused and left open.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()
    if dist.is_initialized():
        return DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size())

    dist.init_process_group("gloo")
    context = DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(), owns_process_group=True)
    logger.info("Joined process group: rank %d of %d (gloo)", context.rank, context.world_size)
    return context
