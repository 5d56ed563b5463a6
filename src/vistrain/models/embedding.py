"""An embedding model for metric learning / re-identification: timm backbone -> pooling -> (projection) ->
BNNeck -> classification head (the "strong baseline" layout of Luo et al. 2019).

Training mode returns the pre-BN feature (for triplet / center losses), the BN feature and the head's
logits (for the classification loss); eval mode returns the BN feature, the retrieval embedding.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vistrain.errors import UserError, lookup
from vistrain.models.backbone import GeM, create_backbone_model
from vistrain.models.heads import HEADS

POOLINGS = ("avg", "max", "gem")
NECKS = ("bnneck", "none")


def _pool(pooling: str) -> nn.Module:
    """[B, C, H, W] -> [B, C]."""
    if pooling == "avg":
        return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
    if pooling == "max":
        return nn.Sequential(nn.AdaptiveMaxPool2d(1), nn.Flatten(1))
    return GeM()


def _is_stride2(stride: Any) -> bool:
    return stride == 2 or (isinstance(stride, tuple) and tuple(stride) == (2, 2))


def set_last_stride_1(backbone: nn.Module, name: str) -> None:
    """Make the first block of ``backbone.layer4`` keep the resolution, so the final feature map is 2x larger.

    A finer last feature map helps retrieval (the strong ReID baseline's "last stride = 1") for the cost of
    4x the layer4 activations. Strided convolutions get stride 1; a stride-2 pooling (the 'd'/'t' variants'
    AvgPool2d in the shortcut, anti-aliasing or ResNeSt's avd pooling) becomes an identity. The weights are
    unchanged, so pretrained weights still load and apply.
    """
    layer4 = getattr(backbone, "layer4", None)
    if not isinstance(layer4, nn.Sequential) or len(layer4) == 0:
        raise UserError(f"model.last_stride: only supported for ResNet-family backbones (with layer4); got {name}")
    block = layer4[0]
    changed = 0
    for parent in block.modules():
        for child_name, child in list(parent.named_children()):
            stride = getattr(child, "stride", None)
            if not _is_stride2(stride):
                continue
            if isinstance(child, nn.Conv2d):
                child.stride = (1, 1)
            else:  # a pooling layer whose only job here is the downsampling
                setattr(parent, child_name, nn.Identity())
            changed += 1
    if changed == 0:
        raise UserError(f"model.last_stride: the first block of layer4 in {name} has no stride-2 layer to change")


class EmbeddingModel(nn.Module):
    """images [B, 3, H, W] -> {"feat", "bn_feat", "logits"} (train mode) or the embedding [B, D] (eval mode).

    D (``num_features``) is ``embedding_dim`` when set (a bias-free linear projection after the pooling),
    otherwise the backbone's channel count. The BNNeck is a BatchNorm1d(D) with its bias frozen at 0, as in
    the strong baseline: the shift would only move every embedding by the same vector, and keeping the BN
    feature centred on the origin suits the cosine distance used for retrieval.
    """

    def __init__(
        self,
        name: str,
        num_classes: int,
        pooling: str = "avg",
        embedding_dim: int | None = None,
        head: str = "linear",
        s: float = 64.0,
        m: float = 0.5,
        pretrained: bool = False,
        drop_path_rate: float = 0.0,
        last_stride: int | None = None,
        neck: str = "bnneck",
    ):
        super().__init__()
        if pooling not in POOLINGS:
            lookup(dict.fromkeys(POOLINGS), pooling, "model.pooling")  # raises the one-line UserError
        if neck not in NECKS:
            lookup(dict.fromkeys(NECKS), neck, "model.neck")
        head_cls = HEADS.lookup(head)
        if last_stride not in (None, 1, 2):
            raise UserError(f"model.last_stride: must be 1, 2 or null; got {last_stride}")
        if embedding_dim is not None and embedding_dim < 1:
            raise UserError(f"model.embedding_dim: must be a positive integer or null; got {embedding_dim}")

        self.backbone = create_backbone_model(name, 0, pooling="", pretrained=pretrained, drop_path_rate=drop_path_rate)
        if last_stride == 1:
            set_last_stride_1(self.backbone, name)
        # Swin-style backbones return channels-last [B, H, W, C] features; the pooling wants [B, C, H, W].
        self._nhwc = getattr(self.backbone, "output_fmt", "NCHW") == "NHWC"
        self.pool = _pool(pooling)
        channels = int(self.backbone.num_features)
        self.proj: nn.Module = nn.Identity()
        if embedding_dim is not None:
            self.proj = nn.Linear(channels, embedding_dim, bias=False)
        dim = embedding_dim or channels
        self.neck: nn.Module = nn.Identity()
        if neck == "bnneck":
            bn = nn.BatchNorm1d(dim)
            nn.init.ones_(bn.weight)
            nn.init.zeros_(bn.bias)
            bn.bias.requires_grad_(False)
            self.neck = bn
        self.head = head_cls(dim, num_classes) if head == "linear" else head_cls(dim, num_classes, s=s, m=m)

        self.name = name
        self.num_classes = num_classes
        self.num_features = dim
        # timm.data.resolve_data_config({}, model=self) reads the preprocessing from here.
        self.pretrained_cfg = getattr(self.backbone, "pretrained_cfg", {})
        self._backbone_frozen = False

    # ------------------------------------------------------------------------------------------ forward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> pooled (and projected) feature [B, D], before the BNNeck."""
        maps = self.backbone.forward_features(x)
        if maps.ndim != 4:
            raise UserError("model.name: embedding models need a convolutional backbone with [B, C, H, W] "
                            f"features; {self.name} gives shape {tuple(maps.shape)}")
        if self._nhwc:
            maps = maps.permute(0, 3, 1, 2)
        return self.proj(self.pool(maps))

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor] | torch.Tensor:
        """Train mode: {"feat": [B, D] pre-BN, "bn_feat": [B, D], "logits": [B, C]}; labels [B] feed the margin.

        Eval mode: the BN feature [B, D] (not L2-normalised; the caller normalises for cosine retrieval).
        """
        feat = self.features(x)
        bn_feat = self.neck(feat)
        if not self.training:
            return bn_feat
        return {"feat": feat, "bn_feat": bn_feat, "logits": self.head(bn_feat, labels)}

    # ---------------------------------------------------------------------------------------- training

    def set_margin(self, m: float) -> None:
        """Set the head's margin (a no-op for the linear head)."""
        self.head.set_margin(m)

    def freeze_backbone(self, frozen: bool) -> None:
        """Stop (or restart) training the backbone, e.g. to warm a fresh head up on a pretrained backbone.

        While frozen, the backbone's BatchNorm layers also stay in eval mode (``train()`` included): otherwise
        their running statistics would keep drifting to the new data under weights that no longer adapt to
        them. The pooling (GeM's p), projection, BNNeck and head keep training.
        """
        self._backbone_frozen = bool(frozen)
        for p in self.backbone.parameters():
            p.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> EmbeddingModel:
        super().train(mode)
        if mode and self._backbone_frozen:
            for module in self.backbone.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        return self

    def param_groups(self, lr: float, backbone_lr_mult: float, weight_decay: float) -> list[dict[str, Any]]:
        """Optimiser parameter groups: the backbone at ``lr * backbone_lr_mult``, everything else at ``lr``.

        Biases, norm weights and other 1-d (or 0-d: GeM's p) parameters get no weight decay. The neck/head
        groups come first so that ``optimizer.param_groups[0]["lr"]``, which the loop logs, is the base lr.
        Frozen backbone parameters are included (they get no gradient, so the optimiser skips them), so
        unfreezing later needs no new optimiser; the BNNeck bias, fixed at 0 for good, is left out. Empty
        groups are dropped. Each group has a ``name`` for logging.
        """
        frozen_for_good = {id(self.neck.bias)} if isinstance(self.neck, nn.BatchNorm1d) else set()
        buckets: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for pname, p in self.named_parameters():
            if id(p) in frozen_for_good:
                continue
            part = "backbone" if pname.startswith("backbone.") else "head"
            buckets.setdefault((part, p.ndim <= 1), []).append(p)
        groups = []
        for part, part_lr in (("head", lr), ("backbone", lr * backbone_lr_mult)):
            for no_decay in (False, True):
                params = buckets.get((part, no_decay), [])
                if params:
                    groups.append({"params": params, "lr": part_lr, "weight_decay": 0.0 if no_decay else weight_decay,
                                   "name": f"{part}{'_no_decay' if no_decay else ''}"})
        return groups
