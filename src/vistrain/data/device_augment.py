"""``augment.device``: the augmentation policy of ``transforms.augment_ops`` run on the training device, on whole
uint8 batches, every sample with its own random draw (Kornia's batched augmentations, not hand-written kernels).

The loader then only decodes (or reads the cache) and stacks uint8 pixels; ``DeviceAugment`` turns a batch on the
device into the model's input: the policy's random operations (``augment.crop``: random resized crop with
``augment.scale`` / ``augment.ratio`` or pad + random crop; flips, affine, colour jitter, hue jitter, blur: every
config key and range of the CPU policy), normalisation, random erasing (``augment.erasing_mode`` / ``erasing_count``).
Validation and inference are unchanged (``Preprocessor.normalize``).

What no batched op reproduces (``device_supports``: timm's auto-augment policies, AugMix splits, an Albumentations
file) keeps the CPU policy: ``run_setup`` then resolves ``augment.device`` to cpu with one [DATA] line naming it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vistrain.config.schema import AugmentCfg
from vistrain.data.preprocess import Preprocessor
from vistrain.data.transforms import BLUR, CROP_SCALE, TIMM_ERASE_AREA, TORCHVISION_ERASE_AREA, affine_ranges, erasing_p

# timm's RandomErasing: a picture's rectangles share augment.erasing_area of its area, each with a log-uniform aspect
# ratio in [0.3, 1 / 0.3]; a rectangle that does not fit is drawn again, 10 tries
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_TRIES = 10


def device_supports(aug: AugmentCfg) -> str | None:
    """None when the device policy runs ``aug``; else the key and value that need the CPU policy, and why."""
    if aug.auto:
        if aug.auto.startswith("augmix"):
            why = "AugMix blends several augmentation chains per picture; no batched library has it"
        else:
            # kornia.augmentation.auto: RandAugment / TrivialAugment / AutoAugment pick their sub-policy once per
            # forward call and apply it to every row; their contrast is input * factor, saturation HSV, brightness
            # additive (PIL's blend with the grey mean / grey / black)
            why = ("Kornia's RandAugment / TrivialAugment / AutoAugment pick their operations once per batch, not per "
                   "picture, always apply them, without timm's magnitude noise, and compute contrast, saturation and "
                   "brightness with other formulas than PIL's: not twins of timm's policies")
        return f"augment.auto: {aug.auto} ({why})"
    if aug.albumentations:
        return f"augment.albumentations: {aug.albumentations} (an Albumentations pipeline runs on NumPy pictures)"
    if aug.splits:
        return f"augment.splits: {aug.splits} (AugMix splits: the loader yields several augmented views per picture)"
    return None


def crop_op(aug: AugmentCfg, hw: tuple[int, int]) -> nn.Module | None:
    """``augment.crop`` on the device: auto is the policy's own (hard: a random resized crop of 60-100 % of the area,
    else none); rrc draws ``augment.scale`` / ``augment.ratio`` (torchvision's RandomResizedCrop); pad_crop pads
    ``augment.pad`` black pixels on each side and crops back to ``hw`` (the re-ID strong baseline's Pad +
    RandomCrop)."""
    import kornia.augmentation as K

    if aug.crop == "rrc" or (aug.crop == "auto" and aug.policy == "hard"):
        scale, ratio = (aug.scale, aug.ratio) if aug.crop == "rrc" else (CROP_SCALE, (3 / 4, 4 / 3))
        return K.RandomResizedCrop(hw, scale=tuple(scale), ratio=tuple(ratio))
    if aug.crop == "pad_crop":
        return K.RandomCrop(hw, padding=aug.pad, fill=0.0)
    return None


def device_ops(aug: AugmentCfg, hw: tuple[int, int]) -> list[nn.Module]:
    """Kornia twins of ``transforms.augment_ops(aug, hw)``, in the same order, on float [B, 3, H, W] in [0, 1]."""
    import kornia.augmentation as K

    crop = crop_op(aug, hw)
    ops: list[nn.Module] = [crop] if crop is not None else []
    if aug.policy == "none":
        return ops
    if aug.hflip:
        ops.append(K.RandomHorizontalFlip(p=aug.hflip))
    if aug.vflip:
        ops.append(K.RandomVerticalFlip(p=aug.vflip))
    # torchvision's RandomAffine: nearest-neighbour sampling, white where the image moved away (fill=255); an rrc /
    # pad_crop crop shifts and zooms already, so the affine only rotates then (as transforms.augment_ops)
    if aug.crop in ("auto", "none"):
        scale, translate = affine_ranges(aug.policy)
        ops.append(K.RandomAffine(degrees=aug.rotate, translate=translate, scale=scale, resample="nearest",
                                  padding_mode="fill", fill_value=torch.ones(3), p=1.0))
    elif aug.rotate:
        ops.append(K.RandomAffine(degrees=aug.rotate, resample="nearest", padding_mode="fill",
                                  fill_value=torch.ones(3), p=1.0))
    if aug.color_jitter or aug.hue:  # hue alone is a colour jitter too, as on the CPU
        cj = aug.color_jitter
        # Kornia's ColorJitter (not ColorJiggle) runs torchvision's four formulas; hue in turns, as torchvision's
        ops.append(K.ColorJitter(brightness=cj, contrast=cj, saturation=cj, hue=aug.hue, p=1.0))
    if aug.policy == "hard":
        ops.append(K.RandomGaussianBlur((BLUR["kernel"],) * 2, BLUR["sigma"], p=BLUR["p"]))
    return ops


class BatchErasing(nn.Module):
    """timm's RandomErasing on a normalised batch [B, C, H, W], each picture its own draw: with probability ``p``,
    1 to ``max_count`` rectangles (sharing the area), filled with 0 (const: the model's mean), one normal colour
    per rectangle (rand) or normal noise per pixel (pixel). Kornia's RandomErasing fills one rectangle with one
    constant; the rest is this small batched op."""

    def __init__(self, p: float, mode: str, max_count: int, area: tuple[float, float] = (0.02, 1 / 3)):
        super().__init__()
        self.p, self.mode, self.max_count, self.area = p, mode, max_count, area

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        erased = torch.rand(b, device=x.device) < self.p
        count = torch.randint(1, self.max_count + 1, (b,), device=x.device)
        rows = torch.arange(h, device=x.device).view(1, h, 1)
        cols = torch.arange(w, device=x.device).view(1, 1, w)
        for k in range(self.max_count):
            top, left, rh, rw, fits = self._rectangles(count, h, w, self.area)
            inside = ((rows >= top) & (rows < top + rh) & (cols >= left) & (cols < left + rw)).unsqueeze(1)
            inside &= (erased & (count > k) & fits).view(b, 1, 1, 1)
            if self.mode == "pixel":
                fill = torch.randn_like(x)
            elif self.mode == "rand":
                fill = torch.randn(b, c, 1, 1, device=x.device, dtype=x.dtype)
            else:
                fill = x.new_zeros(())
            x = torch.where(inside, fill, x)
        return x

    @staticmethod
    def _rectangles(count: torch.Tensor, h: int, w: int, area_range: tuple[float, float]
                    ) -> tuple[torch.Tensor, ...]:
        """One rectangle per picture: (top, left, height, width) [B, 1, 1] each and whether any try fitted [B]."""
        b, dev = count.shape[0], count.device
        area = torch.empty(b, ERASE_TRIES, device=dev).uniform_(*area_range) * (h * w) / count.view(b, 1)
        aspect = torch.exp(torch.empty(b, ERASE_TRIES, device=dev).uniform_(*ERASE_LOG_RATIO))
        rh, rw = torch.sqrt(area * aspect).round(), torch.sqrt(area / aspect).round()
        ok = (rh < h) & (rw < w)
        first = torch.argmax(ok.int(), dim=1, keepdim=True)  # the first try that fits, as timm's loop takes
        rh, rw, fits = rh.gather(1, first), rw.gather(1, first), ok.any(dim=1)
        top = (torch.rand(b, 1, device=dev) * (h - rh + 1)).floor()
        left = (torch.rand(b, 1, device=dev) * (w - rw + 1)).floor()
        return *(t.view(b, 1, 1) for t in (top, left, rh, rw)), fits


def erasing_op(aug: AugmentCfg) -> nn.Module | None:
    """Random erasing on the normalised batch: Kornia's for one mean-filled rectangle (the default, as before),
    ``BatchErasing`` for timm's other modes and several rectangles."""
    import kornia.augmentation as K

    p = erasing_p(aug)
    if not p:
        return None
    if aug.erasing_mode == "const" and aug.erasing_count == 1:
        return K.RandomErasing(p=p, scale=tuple(aug.erasing_area or TORCHVISION_ERASE_AREA), value=0.0)
    return BatchErasing(p, aug.erasing_mode, aug.erasing_count, tuple(aug.erasing_area or TIMM_ERASE_AREA))


class DeviceAugment(nn.Module):
    """uint8 [B, 3, H, W] on any device (the training pixels: ``Preprocessor.load``'s, or the cache's, the same) ->
    augmented, normalised float32 [B, 3, H, W]."""

    def __init__(self, aug: AugmentCfg, pre: Preprocessor):
        super().__init__()
        unsupported = device_supports(aug)
        if unsupported:  # run_setup resolves augment.device to cpu first: reaching here is a wiring mistake
            raise ValueError(unsupported)
        self.ops = nn.Sequential(*device_ops(aug, pre.size))
        self.register_buffer("mean", torch.tensor(pre.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(pre.std).view(1, 3, 1, 1), persistent=False)
        self.erase = erasing_op(aug)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0
        for op in self.ops:  # clamped after each, as the CPU policy's 8-bit pixels saturate after each
            x = op(x).clamp_(0, 1)
        x = (x - self.mean) / self.std
        return self.erase(x) if self.erase is not None else x
