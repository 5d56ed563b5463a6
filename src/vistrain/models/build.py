"""Build a timm model from ``model.*`` and resolve its preprocessing (mean, std, interpolation)."""

from __future__ import annotations

import logging
from typing import Any

import timm
import torch
from torch import nn

from vistrain.errors import UserError, did_you_mean

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """A timm model name, with or without a pretrained tag (``resnet18.a1_in1k``), or a one-line UserError."""
    known = timm.list_models()
    if name.split(".")[0] not in known:
        raise UserError(f"model.name: unknown timm model '{name}'{did_you_mean(name, known)}")


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


def create_backbone_model(
    name: str,
    num_classes: int,
    pooling: str = "avg",
    pretrained: bool = False,
    drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
) -> nn.Module:
    """``timm.create_model`` with one-line errors. ``pretrained`` downloads timm's weights; a local file
    (``model.pretrained_path``, ``model.init_from``) is loaded afterwards by ``models.init.init_weights``."""
    check_model_name(name)
    kwargs: dict[str, Any] = {
        "num_classes": num_classes,
        "global_pool": pooling,
        "drop_rate": drop_rate,
        # timm drops None kwargs, so models without stochastic depth still build.
        "drop_path_rate": drop_path_rate or None,
    }
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as err:
        raise UserError(f"model.name: {name} does not accept these options ({err}); "
                        "try model.drop_path_rate=0 or model.pooling=avg") from err
    except (OSError, RuntimeError) as err:
        if pretrained:
            raise UserError(f"model.pretrained: could not fetch weights for {name} ({type(err).__name__}); "
                            "download them once and set model.pretrained_path=FILE") from err
        raise


class GeM(nn.Module):
    """Generalised-mean pooling, [B, C, H, W] -> [B, C]: (mean x^p)^(1/p) with a learnable p (3 at start)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float().clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p).to(x.dtype)


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
