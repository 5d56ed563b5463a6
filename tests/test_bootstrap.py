"""Bootstrap confidence intervals (issue 20 item 11): the vectorised replicates equal a plain loop over the same
index matrix scored by scikit-learn (and a hand-written ECE / cluster mean), and the intervals cover a known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import special
from sklearn import metrics as skm

from vistrain.metrics.bootstrap import (
    bootstrap_indices,
    classification_intervals,
    cluster_ratio_intervals,
    format_interval,
    macro_f1_intervals,
)


def _hand_ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Guo et al.'s ECE with right-closed bins (0 in the first), one bin at a time."""
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    return total


def _loop_intervals(logits: np.ndarray, y: np.ndarray, idx: np.ndarray, classes: str) -> dict[str, list[float]]:
    """One replicate at a time, each figure by scikit-learn on the resampled rows."""
    n_classes = logits.shape[1]
    labels = np.arange(n_classes)
    reps: dict[str, list[float]] = {}
    for rows in idx:
        z, t = logits[rows], y[rows]
        p = special.softmax(z, axis=1)
        pred = z.argmax(axis=1)
        f1_labels = labels if classes == "all" else np.unique(t)
        values = {
            "top1": skm.top_k_accuracy_score(t, z, k=1, labels=labels),
            "top5": skm.top_k_accuracy_score(t, z, k=min(5, n_classes), labels=labels)
            if n_classes > 5 else 1.0,
            "macro_f1": skm.f1_score(t, pred, labels=f1_labels, average="macro", zero_division=0),
            "weighted_f1": skm.f1_score(t, pred, labels=labels, average="weighted", zero_division=0),
            "balanced_accuracy": skm.recall_score(t, pred, labels=np.unique(t), average="macro", zero_division=0),
            "nll": skm.log_loss(t, p, labels=labels),
            "ece": _hand_ece(p, t),
        }
        for key, v in values.items():
            reps.setdefault(key, []).append(v)
    return {k: list(np.percentile(v, [2.5, 97.5])) for k, v in reps.items()}


@pytest.mark.parametrize("classes", ["all", "present"])
@pytest.mark.parametrize("n_classes", [3, 7])
def test_vectorised_intervals_equal_a_loop_with_scikit_learn(classes: str, n_classes: int) -> None:
    rng = np.random.default_rng(3)
    n = 40
    y = rng.integers(0, n_classes, n)
    y[y == n_classes - 1] = 0  # one class never in the targets: "all" and "present" differ
    logits = rng.normal(size=(n, n_classes)) + 2.0 * np.eye(n_classes)[y] * rng.random((n, 1))
    idx = bootstrap_indices(n, 60, seed=11)
    got = classification_intervals(logits, y, idx, macro_f1_classes=classes)
    want = _loop_intervals(logits, y, idx, classes)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12), key
        assert got[key][0] < got[key][1] or key == "top5", key  # a real spread, not a constant


def test_binary_top1_follows_the_strict_rule_and_macro_f1_helper_matches_scikit_learn() -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 30)
    logits = np.stack([np.zeros(30), rng.integers(-1, 2, 30).astype(float)], axis=1)  # ties predict class 0
    idx = bootstrap_indices(30, 40, seed=1)
    reps = [np.mean((logits[r, 1] > logits[r, 0]).astype(int) == y[r]) for r in idx]
    assert classification_intervals(logits, y, idx)["top1"] == pytest.approx(list(np.percentile(reps, [2.5, 97.5])))
    pred = logits.argmax(axis=1)
    f1 = [skm.f1_score(y[r], pred[r], labels=[0, 1, 2], average="macro", zero_division=0) for r in idx]
    assert macro_f1_intervals(y, pred, 3, idx) == pytest.approx(list(np.percentile(f1, [2.5, 97.5])))


def test_cluster_intervals_equal_a_loop_over_resampled_identities() -> None:
    """Re-id: a replicate draws identities; its mAP is the mean AP of all the drawn identities' valid queries."""
    rng = np.random.default_rng(5)
    person = rng.integers(0, 12, 80)  # 80 queries of 12 people
    valid = rng.random(80) > 0.1
    ap = np.where(valid, rng.random(80), np.nan)
    ids = np.unique(person)
    num = np.array([np.nansum(ap[person == p]) for p in ids])
    den = np.array([valid[person == p].sum() for p in ids])
    idx = bootstrap_indices(len(ids), 50, seed=2)
    reps = []
    for rows in idx:
        chosen = np.concatenate([np.flatnonzero((person == ids[i]) & valid) for i in rows])
        reps.append(ap[chosen].mean())
    got = cluster_ratio_intervals({"mAP": num}, den, idx)["mAP"]
    assert got == pytest.approx(list(np.percentile(reps, [2.5, 97.5])), abs=1e-12)


def test_interval_covers_a_known_accuracy_about_95_percent_of_the_time() -> None:
    """Correctness ~ Bernoulli(0.8) on 200 images, 200 independent test sets: the top1 interval holds 0.8 in about
    95% of them (binomial sd 1.5 points over 200 sets; a percentile bootstrap on n = 200 sits near 94%)."""
    rng = np.random.default_rng(0)
    n, hits = 200, 0
    for repeat in range(200):
        y = rng.integers(0, 4, n)
        right = rng.random(n) < 0.8
        pred = np.where(right, y, (y + 1) % 4)
        logits = np.eye(4)[pred] * 3.0
        lo, hi = classification_intervals(logits, y, bootstrap_indices(n, 400, seed=repeat))["top1"]
        hits += lo <= 0.8 <= hi
    assert 0.90 <= hits / 200 <= 0.99, hits


def test_same_seed_same_indices_and_format() -> None:
    assert np.array_equal(bootstrap_indices(50, 10, 7), bootstrap_indices(50, 10, 7))
    assert not np.array_equal(bootstrap_indices(50, 10, 7), bootstrap_indices(50, 10, 8))
    assert format_interval(0.912, [0.897, 0.926], 3) == "0.912 [0.897, 0.926]"
    assert format_interval(0.5, None) == "0.5000"
