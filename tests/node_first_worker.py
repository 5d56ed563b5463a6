"""The worker of ``test_multinode``'s node_first test, in a module of its own so that the spawned processes import
torch and vistrain's distributed helpers only, not the test module's data and plotting stack."""

from __future__ import annotations

import time
from pathlib import Path

import torch.distributed as dist

from vistrain.engine.distributed import DistInfo, node_first
from vistrain.errors import UserError


def two_processes_on_one_machine(rank: int, store: str, out: str) -> None:
    """Rank ``rank`` of 2 on one machine: node_first once where every make() works, once where rank 0's fails."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    info = DistInfo(rank=rank, world=2, local_rank=rank)
    log = Path(out)

    def make(fail: bool) -> int:
        with log.open("a") as fh:
            fh.write(f"{rank} start\n")
        time.sleep(0.5)
        if fail and rank == 0:
            raise UserError("data.cache_dir: /local/cache: read-only file system")
        with log.open("a") as fh:
            fh.write(f"{rank} done\n")
        return rank
    for fail in (False, True):
        try:
            got = node_first(info, lambda fail=fail: make(fail))
        except UserError as err:
            got = f"error: {err}"
        with log.open("a") as fh:
            fh.write(f"{rank} got {got}\n")
    dist.destroy_process_group()
