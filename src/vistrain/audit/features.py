"""Image embeddings for the duplicate and outlier searches: a run's trained model (a classifier's pre-logits
features, an embedding model's embeddings) or, before any training, the configured backbone."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vistrain.config.schema import Config
from vistrain.data.preprocess import Preprocessor
from vistrain.engine import device as dev
from vistrain.engine.inference import LoadedRun, infer_logits, load_fold_model
from vistrain.models.build import PooledClassifier, build_model

log = logging.getLogger(__name__)


class PreLogits(nn.Module):
    """A classifier's pooled features before its last linear layer: [B, 3, H, W] -> [B, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        if isinstance(m, PooledClassifier):
            return m.pool(m.backbone.forward_features(x))
        return m.forward_head(m.forward_features(x), pre_logits=True)


def _feature_model(task: str, model: nn.Module) -> nn.Module:
    return PreLogits(model).eval() if task == "classification" else model  # embedding models embed in eval mode


def centred(feats: np.ndarray) -> np.ndarray:
    """Features minus their mean, L2-normalised: ReLU features all share one large positive direction that would
    make every cosine similarity high; what is left tells images apart."""
    x = feats.astype(np.float32) - feats.mean(axis=0, keepdims=True, dtype=np.float64).astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def run_features(run: LoadedRun, paths: Sequence[str]) -> tuple[np.ndarray, str]:
    """[N, D] features of the run's first trained fold's best model, and what they are (for audit.json)."""
    device = dev.pick_device(run.cfg.train.device)
    fold = run.folds[0]
    model, pre = load_fold_model(run, fold, device)
    feats = infer_logits(run, _feature_model(run.cfg.task, model), paths, pre, device, desc="audit features")[0]
    return feats, f"{run.cfg.model.name} of the run (fold {fold} best checkpoint)"


def config_features(cfg: Config, paths: Sequence[str], n_classes: int) -> tuple[np.ndarray, str]:
    """[N, D] features of the configured backbone, from ``model.init_from`` / ``model.pretrained_path`` when
    given, else randomly initialised (nothing is downloaded), through the config's preprocessing."""
    from vistrain.models.init import init_weights

    device = dev.pick_device(cfg.train.device)
    torch.manual_seed(cfg.project.seed)
    model = build_model(cfg.task, cfg.model, max(n_classes, 2), pretrained=False)
    source = init_weights(model, cfg.model, 0)
    if cfg.model.pretrained and cfg.model.pretrained_path is None and cfg.model.init_from is None:
        source = "random init (model.pretrained_path not set; nothing is downloaded)"
    holder = LoadedRun(Path("."), cfg, [], [], None)
    feats = infer_logits(holder, _feature_model(cfg.task, model.to(device).eval()), paths,
                         Preprocessor.from_config(cfg), device, desc="audit features")[0]
    return feats, f"{cfg.model.name}: {source}"
