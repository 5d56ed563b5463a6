"""A training epoch's batches, augmentation included, are a function of (seed, fold, epoch) alone (issue 19 item 3):
the same with 0 or 2 DataLoader workers, persistent across epochs or started afresh by a resumed run, and the
batches after a mid-epoch checkpoint's step are those the uninterrupted epoch trained there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, RandomSampler

from vistrain.config.schema import AugmentCfg
from vistrain.data.dataset import ImageDataset, worker_init
from vistrain.data.preprocess import Preprocessor
from vistrain.data.samplers import EpochBatches
from vistrain.data.transforms import TrainTransform
from vistrain.engine.distributed import RankShare

N, BATCH, SEED = 10, 2, 7000


def pixels(path: str) -> np.ndarray:
    """A distinct deterministic uint8 picture per item."""
    return np.random.default_rng(int(path)).integers(0, 256, (24, 24, 3), dtype=np.uint8)


HARD = AugmentCfg(policy="hard")
# timm's RandAugment and RandomErasing draw from Python's and NumPy's generators, not torch's
TIMM = AugmentCfg(auto="rand-m9-mstd0.5-inc1", random_erasing=0.5, erasing_mode="pixel", erasing_count=2)


def loader(workers: int, rank: int = 0, world: int = 1, aug: AugmentCfg = HARD) -> DataLoader:
    pre = Preprocessor(size=(24, 24))
    dataset = ImageDataset([str(i) for i in range(N)], list(range(N)), TrainTransform(aug, pre), pixels)
    order = torch.Generator()
    source = RandomSampler(range(N), generator=order)
    if world > 1:
        source = RankShare(source, rank, world)
    return DataLoader(dataset, batch_sampler=EpochBatches(source, order, BATCH, drop_last=True, rank=rank),
                      num_workers=workers, persistent_workers=workers > 0, worker_init_fn=worker_init if workers
                      else None, generator=torch.Generator())


def epoch(dl: DataLoader, number: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    dl.batch_sampler.set_epoch(SEED, number, skip)
    torch.manual_seed(number)  # whatever the training draws in between must not matter
    return [(images, labels) for images, labels, _ in dl]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.mark.parametrize(("workers", "aug"), [(0, HARD), (2, HARD), (0, TIMM), (2, TIMM)],
                         ids=["0-hard", "2-hard", "0-timm", "2-timm"])
def test_an_epochs_batches_and_augmentation_follow_from_seed_and_epoch_alone(workers: int, aug: AugmentCfg) -> None:
    ongoing = loader(workers, aug=aug)
    first, second = epoch(ongoing, 0), epoch(ongoing, 1)
    assert not same(first, second), "another epoch shuffles and augments anew"
    assert len(first) == N // BATCH
    assert same(epoch(loader(0, aug=aug), 0), first), "the number of workers changes nothing"
    assert same(epoch(loader(workers, aug=aug), 1), second), "a resumed run's fresh loader trains the same epoch 2"
    assert same(epoch(loader(workers, aug=aug), 1, skip=3), second[3:]), \
        "a mid-epoch resume trains the batches after step 3"
    assert len(loader(workers, aug=aug).batch_sampler) == N // BATCH


def test_ranks_draw_disjoint_shares_of_the_epoch() -> None:
    shares = [epoch(loader(0, rank, 2), 0) for rank in range(2)]
    items = [int(v) for share in shares for _, batch in share for v in batch]  # label = item index here
    assert len(items) == 8 and len(set(items)) == 8  # 5 items per rank, 2 whole batches each, none shared
