"""Preprocessing and augmentation policies (torchvision transforms v2), shared by train and predict."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2 as T

from vistrain.config.schema import AugmentCfg


def size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``[256, 128]`` -> ``(H, W)``."""
    return (img_size, img_size) if isinstance(img_size, int) else (int(img_size[0]), int(img_size[1]))


def _to_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(mean), std=list(std))]


def eval_transform(img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]) -> T.Compose:
    """Resize to the training size and normalise: the one preprocessing for validation and inference."""
    return T.Compose([T.Resize(size_hw(img_size), antialias=True), *_to_tensor(mean, std)])


def train_transform(
    aug: AugmentCfg, img_size: int | Sequence[int], mean: Sequence[float], std: Sequence[float]
) -> T.Compose:
    """The augmentation policy named by ``augment.policy`` (none / light / hard)."""
    hw = size_hw(img_size)
    ops: list = []
    if aug.policy == "hard":
        ops.append(T.RandomResizedCrop(hw, scale=(0.6, 1.0), antialias=True))
    else:
        ops.append(T.Resize(hw, antialias=True))
    if aug.policy != "none":
        if aug.hflip:
            ops.append(T.RandomHorizontalFlip(aug.hflip))
        if aug.vflip:
            ops.append(T.RandomVerticalFlip(aug.vflip))
        scale = (0.9, 1.1) if aug.policy == "light" else (0.8, 1.2)
        translate = (0.05, 0.05) if aug.policy == "light" else (0.1, 0.1)
        ops.append(T.RandomAffine(degrees=aug.rotate, translate=translate, scale=scale, fill=255))
        if aug.color_jitter or aug.hue:
            cj = aug.color_jitter
            ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue))
        if aug.policy == "hard":
            ops.append(T.RandomApply([T.GaussianBlur(kernel_size=5, sigma=(0.1, 2.0))], p=0.2))
    ops += _to_tensor(mean, std)
    erasing = aug.random_erasing or (0.25 if aug.policy == "hard" else 0.0)
    if erasing:
        ops.append(T.RandomErasing(p=erasing, value=0))
    return T.Compose(ops)
