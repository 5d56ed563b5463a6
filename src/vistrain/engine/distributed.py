"""Several processes (``torchrun --nproc_per_node=N -m vistrain train ...``): DistributedDataParallel with
NCCL on GPUs and gloo on CPUs. Rank 0 alone reads the data, owns the run directory and writes every file;
the others receive what they need from it.

Each rank trains on its own share of every epoch's batches (so the effective batch is batch_size x N) and
evaluates its own whole batches of the validation set (``EvalShard``); rank 0 gathers the outputs in order,
computes the metrics and sends the row to every rank, so early stopping and the plateau schedule stay in step
and the numbers are those of one process evaluating the same model. As in timm's train.py: gradients cross the
ranks only at an optimiser update (``no_sync``), the logged loss and rates are the whole job's, and BatchNorm
statistics are averaged over the ranks before each evaluation (``distribute_bn``) unless ``train.sync_bn``
synchronises them in every forward.
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

from vistrain.errors import UserError

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


def all_reduce_floats(info: DistInfo, values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """``values`` summed (``op="sum"``) or maximised (``"max"``) over the ranks, on every rank; one collective.
    ``device``: where the backend reduces (NCCL: the rank's GPU)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (its state_dict has no ``module.`` prefix)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def sync_batchnorm(model: nn.Module, info: DistInfo, device: torch.device) -> nn.Module:
    """``train.sync_bn: true``: every BatchNorm (timm's BatchNormAct2d too) computes its batch statistics over all
    ranks, before the DDP wrap (timm's ``convert_sync_batchnorm``; the parameters stay the same objects, the
    state_dict keys the same). One process has nothing to synchronise; torch synchronises on GPUs only."""
    if not info.enabled:
        return model
    if device.type != "cuda":
        raise UserError(f"train.sync_bn: true needs CUDA devices (torch's SyncBatchNorm); this run trains on "
                        f"{device.type}: use train.sync_bn=false (BatchNorm statistics are then averaged over the "
                        "processes before each evaluation)")
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def distribute_bn(info: DistInfo, *models: nn.Module) -> None:
    """Each model's BatchNorm running statistics averaged over the ranks (timm's ``distribute_bn``, reduce): the
    ranks trained them on different batches, and validation, the checkpoints and a resumed run need one value."""
    if not info.enabled:
        return
    from timm.utils import distribute_bn as timm_distribute_bn

    for model in models:
        timm_distribute_bn(model, info.world, reduce=True)


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


class EvalShard(Sampler[int]):
    """Validation under several processes: each rank takes a contiguous run of whole batches of ``batch_size``
    (rank r: batches ``r * B // N`` to ``(r + 1) * B // N`` of the ``B`` a single process makes), so no image is
    evaluated twice (torch's DistributedSampler pads with duplicates), concatenating the ranks' outputs in rank
    order gives the items' order, and every batch holds the same images as in one process: the outputs are
    bit-equal to a single-process evaluation (CPU kernels may round differently for another batch size)."""

    def __init__(self, n: int, batch_size: int, rank: int, world: int):
        batches = -(-n // batch_size)
        self.bounds = [min(n, (r * batches // world) * batch_size) for r in range(world + 1)]
        self.rank = rank

    @property
    def sizes(self) -> list[int]:
        """How many items each rank evaluates."""
        return [b - a for a, b in zip(self.bounds, self.bounds[1:])]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.bounds[self.rank], self.bounds[self.rank + 1]))

    def __len__(self) -> int:
        return self.sizes[self.rank]


def gather_to_main(info: DistInfo, value: T) -> list[T] | None:
    """Every rank's ``value`` on rank 0, in rank order (None elsewhere): validation outputs to score once."""
    if not info.enabled:
        return [value]
    box: list[Any] | None = [None] * info.world if info.is_main else None
    dist.gather_object(value, box, dst=0)
    return box
