"""Losses named in the config. A new loss is one function plus one line in ``LOSSES``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def cross_entropy(
    class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0
) -> nn.Module:
    """Cross-entropy on logits [B, C]; targets are class indices [B] or soft targets [B, C] (mixup)."""
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)


LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": cross_entropy,
}
