"""The map-style dataset over the item table: path -> preprocessed pixels -> transformed tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


class ImageDataset(Dataset):
    """Yields ``(image [3, H, W] float, label int, index int)``; label is -1 for unlabelled items.

    ``decode``: path -> uint8 [H, W, 3] pixels after the deterministic preprocessing (``Preprocessor.load``, or a
    decode-once cache holding the same pixels); ``transform``: those pixels -> the model's input
    (``Preprocessor.normalize`` for evaluation, ``transforms.TrainTransform`` for training)."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None,
                 transform: Callable[[np.ndarray], torch.Tensor], decode: Callable[[str], np.ndarray]):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.decode = decode

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(self.decode(self.paths[i])), self.labels[i], i


def worker_init(_: int) -> None:
    """A DataLoader worker is one of several processes already filling the cores: one OpenCV thread each (OpenCV's
    own pool, sized for the whole machine, would oversubscribe them)."""
    import cv2

    cv2.setNumThreads(1)
