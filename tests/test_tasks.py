"""Task objects: the classification loss with mixup on batches of any size."""

from __future__ import annotations

import torch
from timm.data import Mixup
from torch import nn

from vistrain.engine.tasks import ClassificationTask
from vistrain.models.losses import LOSSES


def test_mixup_accepts_an_odd_last_batch() -> None:
    # timm mixes pairs and rejects odd batches; the last batch of an epoch is often odd.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    task = ClassificationTask(LOSSES["ce"](None, 0.0), Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=3))
    for batch in (4, 3, 1):
        loss, _ = task.training_loss(model, torch.randn(batch, 3, 8, 8), torch.arange(batch) % 3)
        assert torch.isfinite(loss)
        loss.backward()


def test_mixup_targets_are_soft_and_smoothed() -> None:
    seen = {}

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen["targets"] = targets
        return logits.sum() * 0

    mix = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    task = ClassificationTask(criterion, mix)
    task.training_loss(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), torch.randn(6, 3, 4, 4),
                       torch.tensor([0, 1, 2, 0, 1, 2]))
    targets = seen["targets"]
    assert targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert targets.min() > 0  # label smoothing is inside the soft targets
