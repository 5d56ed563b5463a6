"""The timm backbone every model starts from, and GeM pooling: what the classifier (models/build.py) and the
embedding model (models/embedding.py) share, below both."""

from __future__ import annotations

from typing import Any

import timm
import torch
from torch import nn

from vistrain.errors import UserError, did_you_mean


def check_model_name(name: str) -> None:
    """A timm model name, with or without a pretrained tag (``resnet18.a1_in1k``), or a one-line UserError."""
    known = timm.list_models()
    if name.split(".")[0] not in known:
        raise UserError(f"model.name: unknown timm model '{name}'{did_you_mean(name, known)}")


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
