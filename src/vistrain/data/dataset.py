"""The map-style dataset over the item table: path -> preprocessed pixels -> transformed tensor."""

from __future__ import annotations

import random
import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from vistrain.data.samplers import SeededIndex


class ImageDataset(Dataset):
    """Yields ``(image [3, H, W] float, label int, index int)``; label is -1 for unlabelled items.

    ``decode``: path -> uint8 [H, W, 3] pixels after the deterministic preprocessing (``Preprocessor.load``, or a
    decode-once cache holding the same pixels); ``transform``: those pixels -> the model's input
    (``Preprocessor.normalize`` for evaluation, ``transforms.TrainTransform`` for training).

    A training loader asks for ``SeededIndex`` items (``samplers.EpochBatches``): the transform of such an item runs
    with the random generators seeded by the item's seed (``item_rng``), so its augmentation is the same whichever
    process makes it and whatever it made before."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None,
                 transform: Callable[[np.ndarray], torch.Tensor], decode: Callable[[str], np.ndarray]):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | SeededIndex) -> tuple[torch.Tensor, int, int]:
        if isinstance(key, SeededIndex):
            pixels = self.decode(self.paths[key.index])
            with item_rng(key.seed):
                return self.transform(pixels), self.labels[key.index], key.index
        return self.transform(self.decode(self.paths[key])), self.labels[key], key


@contextmanager
def item_rng(seed: int) -> Iterator[None]:
    """The global generators seeded with one item's ``seed`` while its augmentation runs. torchvision's random
    transforms draw from torch's; in a DataLoader worker NumPy's and Python's are seeded too (any augmentation
    library's draws), and nothing needs restoring: the worker's generators serve its items alone. In the main
    process (``num_workers: 0``) only torch's CPU generator is seeded, and restored afterwards, so the training's
    own draws (dropout) follow the same stream whether the images are made here or in workers."""
    if get_worker_info() is not None:
        np.random.seed(seed % 2**32)
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield
        return
    saved = torch.default_generator.get_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved)


def worker_init(_: int) -> None:
    """A DataLoader worker is one of several processes already filling the cores: one OpenCV thread each (OpenCV's
    own pool, sized for the whole machine, would oversubscribe them). It ignores the preemption signals: a
    scheduler may send them to every process of the job (SLURM does), and the main process, which stops training
    after the current step (``engine.preemption``), shuts its workers down itself; a worker that died of the signal
    would stop the run before its checkpoint."""
    import cv2

    cv2.setNumThreads(1)
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
