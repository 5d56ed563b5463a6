"""Build a timm model from ``model.*`` and resolve its preprocessing (mean, std, interpolation)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from vistrain.errors import UserError
from vistrain.models.backbone import GeM, create_backbone_model

log = logging.getLogger(__name__)


class PooledClassifier(nn.Module):
    """A timm backbone without its pooling, then GeM and a linear head (timm has no GeM global_pool)."""

    def __init__(self, backbone: nn.Module, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.backbone = backbone
        self.pool = GeM()
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(backbone.num_features, num_classes)
        self.pretrained_cfg = getattr(backbone, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.backbone.forward_features(x)
        if feats.ndim != 4:
            raise UserError("model.pooling: gem needs a convolutional backbone with [B, C, H, W] features; "
                            "use avg for transformers")
        return self.head(self.drop(self.pool(feats)))


def build_classifier(name: str, num_classes: int, pooling: str = "avg", **kwargs: Any) -> nn.Module:
    """A classifier [B, 3, H, W] -> logits [B, num_classes] from ``model.*``."""
    if pooling != "gem":
        return create_backbone_model(name, num_classes, pooling=pooling, **kwargs)
    drop_rate = kwargs.pop("drop_rate", 0.0)
    backbone = create_backbone_model(name, 0, pooling="", **kwargs)
    return PooledClassifier(backbone, num_classes, drop_rate)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def build_model(task: str, m: Any, num_classes: int, pretrained: bool = True) -> nn.Module:
    """The model for ``task`` from the ``model`` config section. ``pretrained=False`` skips the timm download
    (inference: the run's own checkpoint is loaded next). Weights from a file (``model.pretrained_path``,
    ``model.init_from``) are not loaded here: ``models.init.init_weights`` does it, and reports it."""
    weights = {"pretrained": m.pretrained and pretrained and m.pretrained_path is None}
    if task == "embedding":
        from vistrain.models.embedding import EmbeddingModel

        return EmbeddingModel(m.name, num_classes, pooling=m.pooling, embedding_dim=m.embedding_dim, head=m.head,
                              s=m.arcface_s, m=m.arcface_m_finetune, drop_path_rate=m.drop_path_rate,
                              last_stride=m.last_stride, neck=m.neck, **weights)
    return build_classifier(m.name, num_classes, pooling=m.pooling, drop_rate=m.drop_rate,
                            drop_path_rate=m.drop_path_rate, **weights)
