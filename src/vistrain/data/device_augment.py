"""``augment.device``: the augmentation policy of ``transforms.augment_ops`` run on the training device, on whole
uint8 batches, every sample with its own random draw (Kornia's batched augmentations, not hand-written kernels).

The loader then only decodes (or reads the cache) and stacks uint8 pixels; ``DeviceAugment`` turns a batch on the
device into the model's input: the policy's random operations (random resized crop, flips, affine, colour jitter,
hue jitter, blur: every config key and range of the CPU policy), normalisation, random erasing. Validation and inference
are unchanged (``Preprocessor.normalize``).
"""

from __future__ import annotations

import torch
from torch import nn

from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import BLUR, CROP_SCALE, affine_ranges, erasing_p


def device_supports(aug: AugmentCfg) -> str | None:
    """None when ``device_ops`` + ``DeviceAugment`` draw everything ``aug`` asks of the CPU policy; else the first
    ``augment.<key>=<value>`` they have no twin of, for which the run augments on the CPU instead
    (``engine.run_setup``: one [DATA] line). A key given its Kornia twin leaves this list."""
    erasing = erasing_p(aug) > 0
    missing = [("auto", aug.auto is not None),
               ("crop", aug.crop in ("rrc", "pad_crop") or (aug.crop == "none" and aug.policy == "hard")),
               ("erasing_mode", erasing and aug.erasing_mode != "const"),
               ("erasing_count", erasing and aug.erasing_count != 1),
               ("splits", aug.splits > 0), ("albumentations", aug.albumentations is not None)]
    key = next((k for k, unsupported in missing if unsupported), None)
    return None if key is None else f"augment.{key}={getattr(aug, key)}"


def device_ops(aug: AugmentCfg, hw: tuple[int, int]) -> list[nn.Module]:
    """Kornia twins of ``transforms.augment_ops(aug, hw)``, in the same order, on float [B, 3, H, W] in [0, 1]."""
    import kornia.augmentation as K

    if aug.policy == "none":
        return []
    ops: list[nn.Module] = []
    if aug.policy == "hard":
        ops.append(K.RandomResizedCrop(hw, scale=CROP_SCALE))
    if aug.hflip:
        ops.append(K.RandomHorizontalFlip(p=aug.hflip))
    if aug.vflip:
        ops.append(K.RandomVerticalFlip(p=aug.vflip))
    scale, translate = affine_ranges(aug.policy)
    # torchvision's RandomAffine: nearest-neighbour sampling, white where the image moved away (fill=255)
    ops.append(K.RandomAffine(degrees=aug.rotate, translate=translate, scale=scale, resample="nearest",
                              padding_mode="fill", fill_value=torch.ones(3), p=1.0))
    if aug.color_jitter or aug.hue:  # hue alone is a colour jitter too, as on the CPU
        cj = aug.color_jitter
        # Kornia's ColorJitter (not ColorJiggle) runs torchvision's four formulas; hue in turns, as torchvision's
        ops.append(K.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue, p=1.0))
    if aug.policy == "hard":
        ops.append(K.RandomGaussianBlur((BLUR["kernel"],) * 2, BLUR["sigma"], p=BLUR["p"]))
    return ops


class DeviceAugment(nn.Module):
    """uint8 [B, 3, H, W] on any device (the training pixels: ``Preprocessor.load``'s, or the cache's, the same) ->
    augmented, normalised float32 [B, 3, H, W]."""

    def __init__(self, aug: AugmentCfg, pre: Preprocessor):
        import kornia.augmentation as K

        super().__init__()
        self.ops = nn.Sequential(*device_ops(aug, pre.size))
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)
        erasing = erasing_p(aug)
        self.erase = K.RandomErasing(p=erasing, value=0.0) if erasing else None

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        for op in self.ops:  # clamped after each, as the CPU policy's 8-bit pixels saturate after each
            x = op(x).clamp_(0, 1)
        x = (x - self.mean) / self.std
        return self.erase(x) if self.erase is not None else x
