"""Several processes (``torchrun --nproc_per_node=N -m vistrain train ...``): DistributedDataParallel with
NCCL on GPUs and gloo on CPUs. Rank 0 alone reads the data, owns the run directory and writes every file;
the others receive what they need from it.

Each rank trains on its own share of every epoch's batches (so the effective batch is batch_size x N) and
evaluates the whole validation set, so all ranks see the same metrics; rank 0's monitor value is the one
every rank acts on, so early stopping and the plateau schedule stay in step.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Sampler

T = TypeVar("T")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


SINGLE = DistInfo()  # one process


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes in the environment; a single process gets ``DistInfo()``."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return DistInfo(rank, world, local_rank)


def shutdown(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()


def from_main(info: DistInfo, make: Callable[[], T]) -> T:
    """``make()`` on rank 0, its result (or its exception) on every rank: one source of truth, and an error
    on rank 0 stops the other ranks too instead of leaving them waiting."""
    if not info.enabled:
        return make()
    box: list[Any] = [None]
    if info.is_main:
        try:
            box[0] = ("ok", make())
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            box[0] = ("error", err)
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise value
    return value


def node_first(info: DistInfo, make: Callable[[], T]) -> T:
    """``make()`` on each machine's first process (local rank 0), then on the machine's others: what it writes to a
    machine's local disk (a decode cache) is written once per machine, and the others find it there. An error on
    any machine's first process is raised on every rank, so no rank waits for a partner that has stopped."""
    if not info.enabled:
        return make()
    result: Any = None
    error: Exception | None = None
    if info.local_rank == 0:
        try:
            result = make()
        except Exception as err:  # noqa: BLE001 - re-raised on every rank below
            error = err
    errors: list[Any] = [None] * info.world
    dist.all_gather_object(errors, error)
    failed = error or next((e for e in errors if e is not None), None)
    if failed is not None:
        raise failed
    return result if info.local_rank == 0 else make()


def main_value(info: DistInfo, value: float) -> float:
    """Rank 0's ``value`` on every rank (metrics can differ in the last bits between GPUs)."""
    if not info.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (its state_dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, info: DistInfo, device: torch.device, find_unused: bool = False) -> nn.Module:
    if not info.enabled:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)


class RankShare(Sampler[int]):
    """Every rank draws the same indices from ``sampler`` (same seed) and keeps every ``world``-th one, so
    the ranks' shares of an epoch are disjoint and equally long (the remainder is dropped)."""

    def __init__(self, sampler: Sampler[int], rank: int, world: int):
        self.sampler, self.rank, self.world = sampler, rank, world

    def __iter__(self) -> Iterator[int]:
        indices = list(self.sampler)
        usable = len(indices) - len(indices) % self.world
        return iter(indices[self.rank:usable:self.world])

    def __len__(self) -> int:
        return len(self.sampler) // self.world
