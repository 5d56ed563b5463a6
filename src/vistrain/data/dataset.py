"""The map-style dataset over the item table: path -> preprocessed pixels -> transformed tensor."""

from __future__ import annotations

import os
import random
import signal
import threading
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
    """The global generators seeded with one item's ``seed`` while its augmentation runs: torch's (torchvision's
    random transforms), NumPy's and Python's (timm's ``augment.auto`` policies and random erasing, any other
    augmentation library's draws). In a DataLoader worker nothing needs restoring: the worker's generators serve its
    items alone. In the main process (``num_workers: 0``) they are restored afterwards, so the training's own draws
    (dropout) follow the same stream whether the images are made here or in workers."""
    if get_worker_info() is not None:
        np.random.seed(seed % 2**32)
        random.seed(seed)
        torch.default_generator.manual_seed(seed)
        yield
        return
    saved = torch.default_generator.get_state(), np.random.get_state(), random.getstate()
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        torch.default_generator.set_state(saved[0])
        np.random.set_state(saved[1])
        random.setstate(saved[2])


def worker_init(_: int) -> None:
    """A DataLoader worker is one of several processes already filling the cores: one OpenCV thread each (OpenCV's
    own pool, sized for the whole machine, would oversubscribe them). It outlives the preemption signals sent to
    every process of a job (SLURM signals the whole job step, systemd the whole control group): the main process
    finishes its training step and writes its checkpoint first (``engine.preemption``), and a worker that died of
    the signal would end the run with a DataLoader error before that."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _sigterm_from_parent_only()  # first: the threads started after it (OpenCV's) inherit its signal mask
    import cv2

    cv2.setNumThreads(1)


def _sigterm_from_parent_only() -> None:
    """SIGTERM ends the worker only when its parent sends it: the loader shutting its workers down, or
    multiprocessing at interpreter exit (torch's own worker handler makes the same distinction, but dies of
    anyone's SIGTERM). The signal is blocked and a thread reads who sent it (``sigwaitinfo``: Linux only; elsewhere
    torch's handler stays)."""
    if not hasattr(signal, "sigwaitinfo"):
        return
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread; the waiting thread inherits it

    def wait() -> None:
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)  # as torch's handler exits on its parent's SIGTERM: no "worker killed" error in the parent

    threading.Thread(target=wait, name="sigterm-from-parent", daemon=True).start()
