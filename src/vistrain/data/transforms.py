"""The random augmentation policies (torchvision transforms v2), applied after the deterministic preprocessing.

Every dataset item is first decoded and put through ``Preprocessor.deterministic`` (crop, resize to the training
size, CLAHE: uint8 [H, W, 3]). Validation and inference then only normalise (``Preprocessor.normalize``); training
runs ``TrainTransform``: the policy's random operations on those pixels, the same normalisation, random erasing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor, size_hw  # noqa: F401 - size_hw: re-exported

CROP_SCALE = (0.6, 1.0)  # hard: RandomResizedCrop's share of the area
BLUR = {"kernel": 5, "sigma": (0.1, 2.0), "p": 0.2}  # hard: Gaussian blur


def affine_ranges(policy: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of the policy's random affine; the device policy (``device_augment``) draws the same."""
    return ((0.9, 1.1), (0.05, 0.05)) if policy == "light" else ((0.8, 1.2), (0.1, 0.1))


def erasing_p(aug: AugmentCfg) -> float:
    """Random erasing probability: ``augment.random_erasing``, else 0.25 for the hard policy."""
    return aug.random_erasing or (0.25 if aug.policy == "hard" else 0.0)


def augment_ops(aug: AugmentCfg, hw: tuple[int, int]) -> list:
    """The random operations of ``augment.policy`` (none / light / hard) on an image already of size ``hw``."""
    if aug.policy == "none":
        return []
    ops: list = []
    if aug.policy == "hard":
        ops.append(T.RandomResizedCrop(hw, scale=CROP_SCALE, antialias=True))
    if aug.hflip:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if aug.vflip:
        ops.append(T.RandomVerticalFlip(aug.vflip))
    scale, translate = affine_ranges(aug.policy)
    ops.append(T.RandomAffine(degrees=aug.rotate, translate=translate, scale=scale, fill=255))
    if aug.color_jitter or aug.hue:
        cj = aug.color_jitter
        ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue))
    if aug.policy == "hard":
        ops.append(T.RandomApply([T.GaussianBlur(kernel_size=BLUR["kernel"], sigma=BLUR["sigma"])], p=BLUR["p"]))
    return ops


class TrainTransform:
    """Preprocessed pixels (uint8 [H, W, 3], ``Preprocessor.deterministic``) -> augmented, normalised float32
    [3, H, W]. The random operations run on a PIL image: on CPU workers they are 2-3x faster than the same
    operations on a uint8 tensor at 224-384 px."""

    def __init__(self, aug: AugmentCfg, pre: Preprocessor):
        ops = augment_ops(aug, pre.size)
        self.augment = T.Compose(ops) if ops else None
        self.albumentations = _albumentations(aug, pre.size)
        self.normalize = pre.normalize
        erasing = erasing_p(aug)
        self.erase = T.RandomErasing(p=erasing, value=0) if erasing else None

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        if self.augment is not None:
            pixels = np.asarray(self.augment(Image.fromarray(pixels)))
        if self.albumentations is not None:  # augment.albumentations: after the policy, still uint8
            pixels = self.albumentations(pixels)
        x = self.normalize(pixels)
        return self.erase(x) if self.erase is not None else x


def _albumentations(aug: AugmentCfg, hw: tuple[int, int]) -> Callable[[np.ndarray], np.ndarray] | None:
    """``augment.albumentations``'s pipeline (``data/albu.py``; Albumentations is imported only then), or None."""
    if aug.albumentations is None:
        return None
    from vistrain.data.albu import AlbumentationsStep

    return AlbumentationsStep(aug.albumentations, hw)


def to_uint8_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 [3, H, W]: what a loader yields when ``augment.device`` augments on the device."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(2, 0, 1).contiguous()
