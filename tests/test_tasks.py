"""Task objects: the classification loss with mixup on batches of any size; the embedding metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score
from sklearn.neighbors import NearestNeighbors
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

def test_closed_set_embedding_metrics_are_named_knn_recall_at_each_configured_k() -> None:
    # Validation queries against the training images of the same classes: kNN recall on seen classes, which is
    # named knn_recall@K so that it is never read as the class-disjoint recall@K of published retrieval numbers.
    # Cosine ranking of the gallery: query 0 (class 0) finds its class first; query 1 (class 1) second.
    feats = np.array([[1.0, 0.0], [0.0, 1.0],  # queries: class 0, class 1
                      [0.9, 0.1], [0.8, 0.3], [0.7, 0.5], [0.1, 0.9]], np.float32)  # gallery: 0, 2, 1, 0
    labels = np.array([0, 1, 0, 2, 1, 0])
    ev = RetrievalEval(n_query=2, labels=labels, cameras=None, knn_k=1, recall_ks=(1, 3))
    got = embedding_metrics(feats, ev)
    assert [k for k in got if "recall@" in k] == ["knn_recall@1", "knn_recall@3"]
    assert got["knn_recall@1"] == 0.5 and got["knn_recall@3"] == 1.0


def _leave_one_out_recall_reference(feats: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Recall@k by the CUB / SOP protocol, with scikit-learn: every image with another image of its class queries
    all the other images (itself left out) by cosine distance."""
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    nn_index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(unit)
    _, idx = nn_index.kneighbors(unit)
    hits = []
    for i, row in enumerate(idx):
        others = [j for j in row if j != i][:k]
        if (labels == labels[i]).sum() > 1:  # a class of one image has nothing to retrieve: not a query
            hits.append(bool((labels[others] == labels[i]).any()))
    return float(np.mean(hits))


def test_class_disjoint_recall_is_leave_one_out_within_the_validation_images() -> None:
    # data.split_classes: the validation classes are unseen; each validation image queries the others.
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(6), [5, 4, 4, 3, 2, 1])  # the last class has a single image
    centres = rng.standard_normal((6, 8)).astype(np.float32)
    feats = centres[labels] + 0.9 * rng.standard_normal((len(labels), 8)).astype(np.float32)
    ev = RetrievalEval(n_query=len(labels), labels=labels, cameras=None, recall_ks=(1, 2, 4), leave_one_out=True)
    got = embedding_metrics(feats, ev, counts=True)
    assert [k for k in got if "recall" in k] == ["recall@1", "recall@2", "recall@4"], got
    for k in (1, 2, 4):
        assert got[f"recall@{k}"] == pytest.approx(_leave_one_out_recall_reference(feats, labels, k))
    assert 0 < got["recall@1"] < 1  # the reference can tell a wrong implementation from a right one
    assert got["num_valid_queries"] == len(labels) - 1 and got["num_skipped"] == 1


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
