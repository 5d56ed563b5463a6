"""``augment.splits``: AugMix's splits as timm makes them (``timm.data.AugMixDataset`` and the batch layout of its
``fast_collate``), for its ``JsdCrossEntropy``: each training image goes to the model as K views, the clean one
first, and the loss asks the model to predict the same for all of them."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch


class SplitViews:
    """Preprocessed pixels (uint8 [H, W, 3]) -> K views [K, 3, H, W]: ``clean`` (the normalisation alone, as
    validation sees the image) first, then K - 1 draws of ``augment`` (the whole training transform). The views
    are drawn one after the other from the item's seeded generators (``dataset.item_rng``), so they differ from
    each other and are the same whichever worker makes them."""

    def __init__(self, clean: Callable[[np.ndarray], torch.Tensor], augment: Callable[[np.ndarray], torch.Tensor],
                 splits: int):
        self.clean, self.augment, self.splits = clean, augment, splits

    def __call__(self, pixels: np.ndarray) -> torch.Tensor:
        return torch.stack([self.clean(pixels), *(self.augment(pixels) for _ in range(self.splits - 1))])


def collate_splits(batch: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B items of ``SplitViews`` -> timm's layout: images [K·B, 3, H, W] where rows k·B .. (k+1)·B - 1 are split k of
    the B images in batch order (``torch.split(images, B)`` gives the splits, the clean one first), and the labels
    and item indices repeated K times to match [K·B]; ``JsdCrossEntropy`` reads the first B labels."""
    views = torch.stack([item[0] for item in batch])  # [B, K, 3, H, W]
    k = views.shape[1]
    labels = torch.as_tensor([item[1] for item in batch], dtype=torch.int64)
    indices = torch.as_tensor([item[2] for item in batch], dtype=torch.int64)
    return views.transpose(0, 1).reshape(-1, *views.shape[2:]), labels.repeat(k), indices.repeat(k)
