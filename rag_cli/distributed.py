"""Data-parallel training across processes (`torchrun --nproc-per-node N -m rag_cli train ...`), as torch's DDP does it.

Every rank takes its share of each step's questions, the models that learn are wrapped in
DistributedDataParallel (gradients averaged in buckets during the backward pass), and each rank's loss is the sum
over its share divided by the step's whole batch, so the averaged gradient is the one-process gradient of the
batch's mean loss, whatever the shares' sizes. Work without gradients (scoring the likelihood table, the held-out
NLL) is split by rank and summed. Rank 0 writes the checkpoints and the outputs and evaluates. Without torchrun's
environment it is one process, and none of this runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from rag.errors import require

T = TypeVar("T")


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items: every world-th, from its own rank on."""
        return list(items[self.rank :: self.world])

    def total(self, value: float | torch.Tensor) -> float:
        """The sum of `value` over the ranks."""
        if self.world == 1:
            return float(value)
        summed = torch.tensor(float(value), dtype=torch.float64)
        dist.all_reduce(summed)
        return float(summed)

    def wait(self) -> None:
        """Until every rank gets here."""
        if self.world > 1:
            dist.barrier()

    def data_parallel(self, module: torch.nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        """`forward` (a call that uses `module`'s parameters) through DDP over `module` when there are several ranks.
        Unused parameters (a pooler the embedding skips) are expected."""
        if self.world == 1:
            return forward
        wrapped = _Calls(module, forward)
        device = next(module.parameters()).device
        return torch.nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device] if device.type == "cuda" else None, find_unused_parameters=True
        )

    def close(self) -> None:
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


class _Calls(torch.nn.Module):
    """A module whose forward is `forward`, holding `module` so DDP sees (and synchronises) its parameters."""

    def __init__(self, module: torch.nn.Module, forward: Callable[..., Any]) -> None:
        super().__init__()
        self.module = module
        self._forward = forward

    def forward(self, *args: Any) -> Any:
        return self._forward(*args)


def start(cuda: bool) -> Ranks:
    """The ranks torchrun started (WORLD_SIZE, RANK, LOCAL_RANK), with the process group up: NCCL when training on
    CUDA (each rank on its own GPU), gloo on CPUs. One process when torchrun did not start this one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks()
    require(
        all(name in os.environ for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")),
        "WORLD_SIZE is set but not the rest of torchrun's environment: start data-parallel training with "
        "`torchrun --nproc-per-node N -m rag_cli train ...`",
    )
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size())
