"""Classification metrics (a public API). scikit-learn computes them; this module fixes the conventions:
every class index ``0..C-1`` counts, a class never predicted scores F1 0 rather than a warning.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

ArrayLike = np.ndarray | torch.Tensor | Sequence


def _np(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def topk_accuracy(logits: ArrayLike, targets: ArrayLike, k: int = 1) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores. logits [N, C], targets [N]."""
    scores, y = _np(logits), _np(targets).astype(int)
    n_classes = scores.shape[1]
    if k >= n_classes:
        return 1.0
    if n_classes == 2:  # scikit-learn wants a 1-d score for two classes
        return float(skm.top_k_accuracy_score(y, scores[:, 1] - scores[:, 0], k=k, labels=[0, 1]))
    return float(skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(n_classes)))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Unweighted mean of the per-class F1 over the classes present in ``y_true`` or ``y_pred``."""
    return float(skm.f1_score(_np(y_true), _np(y_pred), average="macro", zero_division=0))


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    return float(skm.accuracy_score(_np(y_true), _np(y_pred)))


def epoch_metrics(logits: ArrayLike, targets: ArrayLike) -> dict[str, float]:
    """What the training loop logs each epoch for a classifier."""
    scores, y = _np(logits), _np(targets).astype(int)
    pred = scores.argmax(axis=1)
    return {"macro_f1": macro_f1(y, pred), "accuracy": accuracy(y, pred)}
