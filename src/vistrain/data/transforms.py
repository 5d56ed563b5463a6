"""The random augmentation policies (torchvision transforms v2), applied after the deterministic preprocessing.

Every dataset item is first decoded and put through ``Preprocessor.deterministic`` (crop, resize to the training
size, CLAHE: uint8 [H, W, 3]). Validation and inference then only normalise (``Preprocessor.normalize``); training
runs ``TrainTransform``: the policy's random operations on those pixels (with ``augment.crop`` and a timm
``augment.auto`` policy), the same normalisation, random erasing (``augment.erasing_mode`` / ``erasing_count``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from vistrain.config.schema import AugmentCfg
from vistrain.data.auto_augment import auto_augment
from vistrain.data.preprocess import Preprocessor, size_hw  # noqa: F401 - size_hw: re-exported

CROP_SCALE = (0.6, 1.0)  # hard: RandomResizedCrop's share of the area
BLUR = {"kernel": 5, "sigma": (0.1, 2.0), "p": 0.2}  # hard: Gaussian blur


def affine_ranges(policy: str) -> tuple[tuple[float, float], tuple[float, float]]:
    """(scale, translate) of the policy's random affine; the device policy (``device_augment``) draws the same."""
    return ((0.9, 1.1), (0.05, 0.05)) if policy == "light" else ((0.8, 1.2), (0.1, 0.1))


TORCHVISION_ERASE_AREA = (0.02, 0.33)  # RandomErasing's default scale: one const rectangle, as vistrain always drew
TIMM_ERASE_AREA = (0.02, 1 / 3)  # timm's RandomErasing default min_area / max_area: the other modes and counts


def erasing_p(aug: AugmentCfg) -> float:
    """Random erasing probability: ``augment.random_erasing``, else 0.25 for the hard policy."""
    return aug.random_erasing or (0.25 if aug.policy == "hard" else 0.0)


def augment_ops(aug: AugmentCfg, hw: tuple[int, int], pre: Preprocessor | None = None) -> list:
    """The random operations of ``augment`` on an image already of size ``hw``, in order: crop (rrc), flips, crop
    (pad_crop: after the flips, as the re-ID chain), affine, ``auto`` policy, colour jitter, blur. The policy
    (none / light / hard) gives the flips, affine, colour and blur; ``crop``, ``auto`` apply under any policy.
    ``pre``: the preprocessor whose mean fills what an ``auto`` policy uncovers (ImageNet's when not given)."""
    light = aug.policy != "none"
    ops: list = []
    if aug.crop == "rrc":
        ops.append(T.RandomResizedCrop(hw, scale=tuple(aug.scale), ratio=tuple(aug.ratio), antialias=True))
    elif aug.crop == "auto" and aug.policy == "hard":
        ops.append(T.RandomResizedCrop(hw, scale=CROP_SCALE, antialias=True))
    if light and aug.hflip:
        ops.append(T.RandomHorizontalFlip(aug.hflip))
    if light and aug.vflip:
        ops.append(T.RandomVerticalFlip(aug.vflip))
    if aug.crop == "pad_crop":
        ops += [T.Pad(aug.pad), T.RandomCrop(hw)]  # T.Pad fills black, as torchvision's in the re-ID chain
    if light and aug.crop in ("auto", "none"):
        scale, translate = affine_ranges(aug.policy)
        ops.append(T.RandomAffine(degrees=aug.rotate, translate=translate, scale=scale, fill=255))
    elif light and aug.rotate:  # an rrc / pad_crop crop already shifts and zooms: the affine only rotates
        ops.append(T.RandomAffine(degrees=aug.rotate, fill=255))
    if aug.auto:
        pre = pre or Preprocessor(size=hw)
        ops.append(auto_augment(aug.auto, hw, pre.mean, pre.interpolation))
    if light and (aug.color_jitter or aug.hue):
        cj = aug.color_jitter
        ops.append(T.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue))
    if aug.policy == "hard":
        ops.append(T.RandomApply([T.GaussianBlur(kernel_size=BLUR["kernel"], sigma=BLUR["sigma"])], p=BLUR["p"]))
    return ops


def random_erasing(aug: AugmentCfg) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Random erasing of the normalised tensor [3, H, W]: one rectangle of 0 (the model's mean) is torchvision's
    ``RandomErasing`` as vistrain always drew it; other modes and counts are timm's ``RandomErasing`` (train.py's
    --remode / --recount), which fills ``const`` with 0 as well."""
    p = erasing_p(aug)
    if not p:
        return None
    if aug.erasing_mode == "const" and aug.erasing_count == 1:
        return T.RandomErasing(p=p, scale=tuple(aug.erasing_area or TORCHVISION_ERASE_AREA), value=0)
    from timm.data.random_erasing import RandomErasing

    low, high = aug.erasing_area or TIMM_ERASE_AREA
    return RandomErasing(p, min_area=low, max_area=high, mode=aug.erasing_mode, max_count=aug.erasing_count,
                         device="cpu")


class TrainTransform:
    """Preprocessed pixels (uint8 [H, W, 3], ``Preprocessor.deterministic``) -> augmented, normalised float32
    [3, H, W]. The random operations run on a PIL image: on CPU workers they are 2-3x faster than the same
    operations on a uint8 tensor at 224-384 px."""

    def __init__(self, aug: AugmentCfg, pre: Preprocessor):
        ops = augment_ops(aug, pre.size, pre)
        self.augment = T.Compose(ops) if ops else None
        self.albumentations = _albumentations(aug, pre.size)
        self.normalize = pre.normalize
        self.erase = random_erasing(aug)

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
