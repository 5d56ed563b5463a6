"""The map-style dataset over the item table: path -> decoded, transformed tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils.data import Dataset

from vistrain.data.images import load_rgb


class ImageDataset(Dataset):
    """Yields ``(image [3, H, W] float, label int, index int)``; label is -1 for unlabelled items."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int] | None, transform: Callable):
        self.paths = list(paths)
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        return self.transform(load_rgb(self.paths[i])), self.labels[i], i
