"""Classification heads for metric learning: plain linear, ArcFace and CosFace, plus the margin schedule.

Every head maps features [B, D] (and optionally the labels [B]) to logits [B, C] and has ``set_margin(m)``,
so the training loop can warm the margin up without knowing which head it drives. The margin heads only
change the target logit, so their logits feed a plain cross-entropy.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vistrain.registry import HEADS

# Keeps sqrt(1 - cos^2) and its gradient finite: at cos = +-1 the derivative of sqrt is infinite.
_COS_EPS = 1e-7


@HEADS.register("linear")
class LinearHead(nn.Module):
    """A bias-free linear classifier: feat [B, D] -> logits [B, C]. Labels are ignored; there is no margin."""

    def __init__(self, in_features: int, num_classes: int):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        # Small weights (the strong ReID baseline's classifier init): logits start near 0, the CE near log C.
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """feat [B, D], labels [B] (unused) -> logits [B, C]."""
        return F.linear(feat, self.weight)

    def set_margin(self, m: float) -> None:
        """No margin to set; present so every head has the same API."""


class _CosineHead(nn.Module):
    """Shared part of the margin heads: a weight [C, D] and the cosines between features and class weights."""

    def __init__(self, in_features: int, num_classes: int, s: float, m: float):
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.s = float(s)
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        nn.init.xavier_uniform_(self.weight)
        self.set_margin(m)

    def set_margin(self, m: float) -> None:
        self.m = float(m)

    def cosine(self, feat: torch.Tensor) -> torch.Tensor:
        """feat [B, D] -> cos θ [B, C] in float32 (call inside a disabled autocast)."""
        return F.linear(F.normalize(feat.float(), dim=1), F.normalize(self.weight.float(), dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, num_classes={self.num_classes}, s={self.s}, m={self.m}"


@HEADS.register("arcface")
class ArcFaceHead(_CosineHead):
    """Additive angular margin (Deng et al. 2019): s·cos(θ_y + m) for the target class, s·cos θ_j for the others.

    Computed in float32 whatever the autocast dtype: fp16 cosines near ±1 make sqrt(1 - cos²) 0 or negative
    and the logit NaN. Past θ = π − m, cos(θ + m) would rise again (θ + m > π), rewarding a *larger* angle; the
    usual non-easy-margin substitute cos θ − m·sin(π − m) keeps the target logit decreasing in θ there.
    """

    def __init__(self, in_features: int, num_classes: int, s: float = 64.0, m: float = 0.5):
        super().__init__(in_features, num_classes, s, m)

    def set_margin(self, m: float) -> None:
        """Set the margin m (radians) and its cached terms; m = 0 gives a normalised softmax (s·cos θ)."""
        self.m = float(m)
        self.cos_m = math.cos(self.m)
        self.sin_m = math.sin(self.m)
        self.th = math.cos(math.pi - self.m)  # cos θ > th  <=>  θ + m < π
        self.mm = math.sin(math.pi - self.m) * self.m

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """feat [B, D], labels [B] (class indices) or None -> float32 logits [B, C]; None gives s·cos θ."""
        with torch.autocast(device_type=feat.device.type, enabled=False):
            cos = self.cosine(feat)
            if labels is None or self.m == 0.0:
                return self.s * cos
            cos = cos.clamp(-1.0 + _COS_EPS, 1.0 - _COS_EPS)
            sin = torch.sqrt(1.0 - cos * cos)
            phi = cos * self.cos_m - sin * self.sin_m  # cos(θ + m)
            phi = torch.where(cos > self.th, phi, cos - self.mm)
            target = F.one_hot(labels.long(), self.num_classes).bool()
            return self.s * torch.where(target, phi, cos)


@HEADS.register("cosface")
class CosFaceHead(_CosineHead):
    """Additive cosine margin (Wang et al. 2018): logits = s·(cos θ − m·onehot(y)), computed in float32."""

    def __init__(self, in_features: int, num_classes: int, s: float = 30.0, m: float = 0.35):
        super().__init__(in_features, num_classes, s, m)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """feat [B, D], labels [B] (class indices) or None -> float32 logits [B, C]; None gives s·cos θ."""
        with torch.autocast(device_type=feat.device.type, enabled=False):
            cos = self.cosine(feat)
            if labels is None or self.m == 0.0:
                return self.s * cos
            target = F.one_hot(labels.long(), self.num_classes).to(cos.dtype)
            return self.s * (cos - self.m * target)


def margin_at_epoch(epoch: int, warmup_epochs: int, m_warmup: float, m_finetune: float,
                    ramp_epochs: int = 0) -> float:
    """The margin for 0-based ``epoch``: ``m_warmup`` for the first ``warmup_epochs`` epochs, then ``m_finetune``.

    With ``ramp_epochs`` > 0 the margin instead moves linearly from ``m_warmup`` and reaches ``m_finetune``
    after ``ramp_epochs`` epochs: epoch ``warmup_epochs + r - 1`` has m_warmup + (m_finetune - m_warmup)·r /
    ramp_epochs, capped at m_finetune. A large margin from the first step can keep a fresh head from
    converging, hence the warm-up at a small one.
    """
    if epoch < 0 or warmup_epochs < 0 or ramp_epochs < 0:
        raise ValueError(f"margin_at_epoch: epoch, warmup_epochs and ramp_epochs must be >= 0; "
                         f"got {epoch}, {warmup_epochs}, {ramp_epochs}")
    if epoch < warmup_epochs:
        return float(m_warmup)
    if ramp_epochs == 0:
        return float(m_finetune)
    r = min(epoch - warmup_epochs + 1, ramp_epochs)
    return float(m_warmup + (m_finetune - m_warmup) * r / ramp_epochs)
