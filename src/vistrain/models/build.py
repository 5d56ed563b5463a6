"""Build a timm model from ``model.*`` and resolve its preprocessing (mean, std, interpolation)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import timm
import torch
from torch import nn

from vistrain.errors import UserError, describe
from vistrain.fallbacks import Fallbacks
from vistrain.models.backbone import GeM, create_backbone_model

log = logging.getLogger(__name__)


def is_convolutional(name: str) -> bool:
    """Whether the timm model ``name`` is mostly convolutions (more than a stem or patch embedding: a ViT's one
    Conv2d does not count); built on the meta device, so it costs no memory and no weights."""
    with torch.device("meta"):
        model = timm.create_model(name.split(".")[0], pretrained=False, num_classes=0)
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 2


COMPILE_AVOID = ("set train.compile: false, or give this machine what torch.compile needs (a C++ compiler; Triton on "
                 "a GPU)")
# Where torch logs a frame it runs eagerly after all: a compile error it suppressed (with the exception) or its
# recompile limit reached.
DYNAMO_LOGGER = "torch._dynamo.convert_frame"


def compile_model(model: nn.Module, setting: bool | str, fallbacks: Fallbacks | None = None) -> None:
    """``train.compile``: ``torch.compile`` the module in place (``nn.Module.compile``: its state_dict keys and the
    checkpoints stay as without it). Where compiling is not possible here the model trains as it is, a fallback
    (``fallbacks``: noted, or refused when strict); a graph that fails to compile later, at the first steps, runs
    eagerly, which ``compile_fallbacks`` notes."""
    if setting is False:
        return
    mode = "max-autotune" if setting == "max-autotune" else None
    try:
        import torch._dynamo

        torch._dynamo.config.suppress_errors = True  # a graph that cannot compile runs eagerly, not crash the run
        model.compile(mode=mode)
    except Exception as err:  # noqa: BLE001 - any failure here means: train without compile
        (fallbacks or Fallbacks()).note("train.compile", "torch.compile", "eager", describe(err), COMPILE_AVOID, log)
        return
    log.info("[MODEL] train.compile=%s: torch.compile(mode=%s); the first steps compile the model", setting,
             mode or "default")


@contextlib.contextmanager
def compile_fallbacks(setting: bool | str, fallbacks: Fallbacks) -> Iterator[None]:
    """While training with ``train.compile``: a graph torch runs eagerly after all (its compile error suppressed at
    the first step, or the recompile limit reached) is a fallback in ``fallbacks``; strict, the step raises
    ``FallbackRefused`` there. torch.compile is lazy, so this, not ``compile_model``, is where a compiler missing on
    the machine shows."""
    if setting is False:
        yield
        return
    handler = _EagerFrames(fallbacks)
    logger = logging.getLogger(DYNAMO_LOGGER)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


class _EagerFrames(logging.Handler):
    """torch's warning that a frame runs eagerly, as a fallback (raising from here stops the step: strict)."""

    def __init__(self, fallbacks: Fallbacks):
        super().__init__(logging.WARNING)
        self.fallbacks = fallbacks

    def emit(self, record: logging.LogRecord) -> None:
        err = record.exc_info[1] if record.exc_info else None
        if err is not None:
            cause = getattr(err, "inner_exception", None) or err  # BackendCompilerFailed wraps the compiler's error
            reason = f"a graph failed to compile at its first step: {describe(cause)}"
        elif record.getMessage().startswith("torch._dynamo hit config."):
            reason = record.getMessage().splitlines()[0]
        else:
            return
        self.fallbacks.note("train.compile", "torch.compile", "eager", reason, COMPILE_AVOID, log)


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
