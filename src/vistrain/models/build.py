"""Build a timm model from ``model.*`` and resolve its preprocessing (mean, std, interpolation)."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import nn

from vistrain.errors import UserError
from vistrain.models.backbone import GeM, create_backbone_model

log = logging.getLogger(__name__)


def is_convolutional(name: str) -> bool:
    """Whether the timm model ``name`` is mostly convolutions (more than a stem or patch embedding: a ViT's one
    Conv2d does not count); built on the meta device, so it costs no memory and no weights."""
    with torch.device("meta"):
        model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0)
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


def compile_model(model: nn.Module, setting: bool | str) -> None:
    """``train.compile``: ``torch.compile`` the module in place (``nn.Module.compile``: its state_dict keys and the
    checkpoints stay as without it). Where compiling is not possible here the model trains as it is and the log
    says why; a graph that fails to compile later, at the first steps, runs eagerly (torch warns)."""
    if setting is False:
        return
    mode = "max-autotune" if setting == "max-autotune" else None
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that cannot compile runs eagerly, not crash the run
        model.compile(mode=mode)
    except Exception as err:  # noqa: BLE001 - any failure here means: train without compile
        log.warning("[MODEL] train.compile=%s: torch.compile is not available here (%s: %s); training without it",
                    setting, type(err).__name__, err)
        return
    log.info("[MODEL] train.compile=%s: torch.compile(mode=%s); the first steps compile the model", setting,
             mode or "default")


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
