"""Task objects: what the shared loop asks of a task (its loss, its eval outputs, its metrics)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.metrics.classification import epoch_metrics


class ClassificationTask:
    """Logits [B, C] from the model; CE (optionally on mixup/cutmix soft targets) for training."""

    def __init__(self, criterion: nn.Module, mixup: object | None = None):
        self.criterion = criterion
        self.mixup = mixup  # timm.data.Mixup: images, labels [B] -> mixed images, soft targets [B, C]

    def training_loss(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        return self.criterion(model(images), targets), {}

    def eval_outputs(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        return model(images)

    def eval_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # Plain NLL on the validation set: comparable across label smoothing and class weight settings.
        return F.cross_entropy(outputs, targets)

    def metrics(self, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        return epoch_metrics(outputs, targets)
