"""Task objects: the classification loss with mixup on batches of any size; the embedding metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from timm.data import Mixup
from torch import nn

from vistrain.engine.tasks import ClassificationTask, RetrievalEval, embedding_metrics
from vistrain.models.losses import LOSSES


def test_mixup_accepts_an_odd_last_batch() -> None:
    # timm mixes pairs and rejects odd batches; the last batch of an epoch is often odd.
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))
    task = ClassificationTask(LOSSES["ce"](None, 0.0), Mixup(mixup_alpha=0.2, cutmix_alpha=1.0, num_classes=3))
    for batch in (4, 3, 1):
        loss, _ = task.training_loss(model, torch.randn(batch, 3, 8, 8), torch.arange(batch) % 3)
        assert torch.isfinite(loss)
        loss.backward()


def test_mixup_targets_are_soft_and_smoothed() -> None:
    seen = {}

    def criterion(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        seen["targets"] = targets
        return logits.sum() * 0

    mix = Mixup(mixup_alpha=0.4, cutmix_alpha=0.0, label_smoothing=0.1, num_classes=3)
    task = ClassificationTask(criterion, mix)
    task.training_loss(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), torch.randn(6, 3, 4, 4),
                       torch.tensor([0, 1, 2, 0, 1, 2]))
    targets = seen["targets"]
    assert targets.shape == (6, 3)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(6))
    assert targets.min() > 0  # label smoothing is inside the soft targets


# ------------------------------------------------------------------------------------- embedding metrics

def test_embedding_metrics_report_recall_at_each_configured_k() -> None:
    # Cosine ranking of the gallery: query 0 (class 0) finds its class first; query 1 (class 1) second.
    feats = np.array([[1.0, 0.0], [0.0, 1.0],  # queries: class 0, class 1
                      [0.9, 0.1], [0.8, 0.3], [0.7, 0.5], [0.1, 0.9]], np.float32)  # gallery: 0, 2, 1, 0
    labels = np.array([0, 1, 0, 2, 1, 0])
    ev = RetrievalEval(n_query=2, labels=labels, cameras=None, knn_k=1, recall_ks=(1, 3))
    got = embedding_metrics(feats, ev)
    assert [k for k in got if k.startswith("recall@")] == ["recall@1", "recall@3"]
    assert got["recall@1"] == 0.5 and got["recall@3"] == 1.0


def test_knn_macro_f1_averages_over_query_and_gallery_classes() -> None:
    # Classes 0, 1 in the queries; class 2 only in the gallery and never predicted: it counts (F1 0), as a
    # class of the run that a classifier's macro_f1 counts too.
    rng = np.random.default_rng(0)
    centres = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
    ql = np.array([0, 0, 1, 1, 0])
    gl = np.array([0, 0, 1, 1, 2, 2])
    q = centres[ql] + 0.05 * rng.standard_normal((5, 3)).astype(np.float32)
    g = centres[gl] + 0.05 * rng.standard_normal((6, 3)).astype(np.float32)
    q[4] = centres[1]  # a class-0 query that looks like class 1: one error
    ev = RetrievalEval(n_query=5, labels=np.concatenate([ql, gl]), cameras=None, knn_k=1)
    got = embedding_metrics(np.concatenate([q, g]), ev)
    pred = np.array([0, 0, 1, 1, 1])
    assert got["knn_acc"] == pytest.approx(0.8)
    assert got["knn_macro_f1"] == pytest.approx(
        f1_score(ql, pred, labels=[0, 1, 2], average="macro", zero_division=0))
    assert got["knn_macro_f1"] < f1_score(ql, pred, average="macro")  # not the mean over classes 0, 1 only
