"""vistrain.metrics.classification against scikit-learn: top-k, macro F1, and the metrics.json report."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.special import softmax
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

from vistrain.metrics.calibration import expected_calibration_error
from vistrain.metrics.classification import (
    accuracy,
    classification_report,
    epoch_metrics,
    macro_f1,
    topk_accuracy,
)

SETTINGS = settings(max_examples=75, deadline=None)


@st.composite
def logits_targets(draw: st.DrawFn, min_c: int = 2, max_c: int = 8,
                   integer: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """logits [N, C] float64 and targets [N] drawn from a random subset of the classes (so some are absent).

    ``integer=True`` draws logits from {-3..3}: many exact ties, and any two distinct values differ by >= 1.
    """
    c = draw(st.integers(min_c, max_c))
    n = draw(st.integers(1, 40))
    if integer:
        z = draw(arrays(np.int64, (n, c), elements=st.integers(-3, 3))).astype(np.float64)
    else:
        z = draw(arrays(np.float64, (n, c), elements=st.floats(-50, 50, allow_nan=False, allow_infinity=False)))
    present = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    y = draw(arrays(np.int64, n, elements=st.sampled_from(sorted(present))))
    return z, y


def sk_topk(z: np.ndarray, y: np.ndarray, k: int) -> float:
    """scikit-learn's top-k accuracy with every class counted. For C == 2 it only takes a 1-d score; the sign of
    s1 - s0 is exact (a softmax probability would round near-ties to 0.5) and its rule "score > 0, or > 0.5 when
    every score lies in [0, 1]" reads the same on {-1, 0, 1}."""
    c = z.shape[1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # k >= C: "perfect score" warning
        if c == 2:
            return skm.top_k_accuracy_score(y, np.sign(z[:, 1] - z[:, 0]), k=k, labels=[0, 1])
        return skm.top_k_accuracy_score(y, z, k=k, labels=np.arange(c))


# ---------------------------------------------------------------- top-k


@SETTINGS
@given(data=logits_targets(integer=True), k=st.integers(1, 10))
def test_topk_matches_sklearn_with_ties(data: tuple[np.ndarray, np.ndarray], k: int) -> None:
    z, y = data
    assert topk_accuracy(z, y, k) == pytest.approx(sk_topk(z, y, k), abs=1e-12)


@SETTINGS
@given(data=logits_targets(min_c=3), k=st.integers(1, 10))
def test_topk_matches_sklearn_float_logits(data: tuple[np.ndarray, np.ndarray], k: int) -> None:
    z, y = data
    assert topk_accuracy(z, y, k) == pytest.approx(sk_topk(z, y, k), abs=1e-12)


@SETTINGS
@given(data=logits_targets(min_c=2, max_c=2), k=st.integers(1, 3))
def test_topk_binary_is_argmax_with_ties_to_class_0(data: tuple[np.ndarray, np.ndarray], k: int) -> None:
    z, y = data
    expected = 1.0 if k >= 2 else float(np.mean((z[:, 1] > z[:, 0]).astype(int) == y))
    assert topk_accuracy(z, y, k) == pytest.approx(expected, abs=1e-12)


def test_topk_binary_scores_inside_unit_interval() -> None:
    # A 1-d score s1 - s0 lying in [0, 1] would make scikit-learn threshold at 0.5; the columns decide here.
    z = np.array([[0.0, 0.3], [0.0, 0.9], [0.5, 0.5], [0.2, 0.1]])
    y = np.array([1, 1, 0, 0])
    assert topk_accuracy(z, y, 1) == 1.0


def test_topk_torch_inputs_and_k_at_least_c() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 6))
    y = rng.integers(0, 6, 64)
    for k in (1, 3, 5):
        ref = sk_topk(z, y, k)
        assert topk_accuracy(torch.from_numpy(z), torch.from_numpy(y), k) == pytest.approx(ref, abs=1e-12)
        assert topk_accuracy(torch.from_numpy(z).float(), torch.from_numpy(y), k) == pytest.approx(ref, abs=1e-12)
    assert topk_accuracy(z, y, 6) == 1.0
    assert topk_accuracy(z, y, 60) == 1.0
    assert topk_accuracy(z[:, :1], np.zeros(64, dtype=int), 1) == 1.0  # a single class


@pytest.mark.parametrize(("z", "y", "k", "match"), [
    (np.zeros((3, 4)), np.array([0, 1, 4]), 1, "targets must lie"),
    (np.zeros((3, 4)), np.array([0, -1, 2]), 1, "targets must lie"),
    (np.array([[0.0, np.nan], [1.0, 0.0]]), np.array([0, 1]), 1, "NaN"),
    (np.zeros((3, 4)), np.array([0, 1]), 1, "targets must have shape"),
    (np.zeros((0, 4)), np.zeros(0, dtype=int), 1, "N, C >= 1"),
    (np.zeros((3, 4)), np.array([0.5, 1, 2]), 1, "whole numbers"),
    (np.zeros((3, 4)), np.array([0, 1, 2]), 0, "k must be"),
])
def test_topk_rejects_bad_input(z: np.ndarray, y: np.ndarray, k: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        topk_accuracy(z, y, k)


# ---------------------------------------------------------------- F1


@st.composite
def label_pairs(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    c = draw(st.integers(2, 8))
    n = draw(st.integers(1, 50))
    labels = st.integers(0, c - 1)
    return draw(arrays(np.int64, n, elements=labels)), draw(arrays(np.int64, n, elements=labels)), c


@settings(max_examples=50, deadline=None)
@given(data=label_pairs())
def test_macro_f1_matches_sklearn(data: tuple[np.ndarray, np.ndarray, int]) -> None:
    y_true, y_pred, c = data
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        ref = skm.f1_score(y_true, y_pred, average="macro")
    assert macro_f1(y_true, y_pred) == pytest.approx(ref, abs=1e-12)
    assert macro_f1(torch.from_numpy(y_true), torch.from_numpy(y_pred)) == pytest.approx(ref, abs=1e-12)
    ref_all = skm.f1_score(y_true, y_pred, labels=np.arange(c), average="macro", zero_division=0)
    assert macro_f1(y_true, y_pred, n_classes=c) == pytest.approx(ref_all, abs=1e-12)


def test_macro_f1_binary_and_absent_classes() -> None:
    assert macro_f1([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(skm.f1_score([0, 1, 1, 0], [0, 1, 0, 0],
                                                                              average="macro"))
    # Class 2 never appears nor is predicted: it counts only when asked for, and then scores 0.
    assert macro_f1([0, 1], [0, 1]) == 1.0
    assert macro_f1([0, 1], [0, 1], n_classes=3) == pytest.approx(2 / 3)


@pytest.mark.parametrize(("y_true", "y_pred", "match"), [
    ([0, 5], [0, 1], "y_true must lie in \\[0, 1\\].*5"),
    ([0, 1], [0, -1], "y_pred must lie in \\[0, 1\\].*-1"),
    ([0, 1], [0, 2], "y_pred must lie in \\[0, 1\\].*n_classes=2"),
])
def test_macro_f1_rejects_labels_outside_n_classes(y_true: list, y_pred: list, match: str) -> None:
    # scikit-learn would silently leave label 5 out of the mean over labels=[0, 1].
    with pytest.raises(ValueError, match=match):
        macro_f1(y_true, y_pred, n_classes=2)
    with pytest.raises(ValueError, match="n_classes must be a positive integer"):
        macro_f1([0], [0], n_classes=0)


def test_epoch_metrics_macro_f1_counts_every_class() -> None:
    # The example from the issue: class 2 is neither present nor predicted; it still counts (F1 0), as in
    # evaluate's metrics.json, so the training log and evaluate agree.
    z, y = np.array([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), np.array([0, 1])
    assert epoch_metrics(z, y)["macro_f1"] == pytest.approx(2 / 3)
    assert epoch_metrics(z, y)["macro_f1"] == classification_report(z, y)["macro_f1"]


@settings(max_examples=50, deadline=None)
@given(data=logits_targets(min_c=2, max_c=9))
def test_epoch_metrics_match_sklearn_over_all_classes(data: tuple[np.ndarray, np.ndarray]) -> None:
    z, y = data
    c = z.shape[1]
    m = epoch_metrics(torch.from_numpy(z).float(), torch.from_numpy(y))
    pred = z.astype(np.float32).argmax(axis=1)
    assert m["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, labels=range(c), average="macro", zero_division=0), abs=1e-12)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred), abs=1e-12)
    if c >= 5:  # top-5 is logged only where it is not trivially 1
        assert m["top5"] == pytest.approx(sk_topk(z.astype(np.float32).astype(np.float64), y, 5), abs=1e-12)
    else:
        assert "top5" not in m


def test_epoch_metrics_non_finite_logits_do_not_crash() -> None:
    # A diverged evaluation must reach the loop's DivergedError / monitor check, not a ValueError here.
    z = np.full((3, 6), np.nan)
    m = epoch_metrics(z, np.array([0, 1, 2]))
    assert np.isnan(m["top5"]) and 0.0 <= m["macro_f1"] <= 1.0


@pytest.mark.parametrize("k", [1.5, True, "1", 0, -2])
def test_topk_k_must_be_a_positive_int(k: object) -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        topk_accuracy(np.zeros((2, 6)), np.array([0, 1]), k)


def test_topk_accepts_numpy_int_k() -> None:
    z, y = np.array([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), np.array([1, 1])
    assert topk_accuracy(z, y, np.int64(2)) == 1.0


def test_epoch_metrics_unchanged() -> None:
    z = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [2.0, 0.0, 0.0]], dtype=torch.bfloat16)
    y = torch.tensor([0, 1, 1, 0])
    m = epoch_metrics(z, y)
    assert set(m) == {"macro_f1", "accuracy"}
    assert m["accuracy"] == accuracy([0, 1, 1, 0], [0, 1, 2, 0]) == 0.75
    assert m["macro_f1"] == pytest.approx(skm.f1_score([0, 1, 1, 0], [0, 1, 2, 0], average="macro",
                                                       zero_division=0))


# ---------------------------------------------------------------- report


def _check_report(z: np.ndarray, y: np.ndarray) -> dict:
    c = z.shape[1]
    labels = np.arange(c)
    names = [f"class_{i}" for i in range(c)]
    rep = classification_report(z, y, names)
    pred = z.argmax(axis=1)

    assert rep["n"] == len(y) and rep["n_classes"] == c
    assert rep["top1"] == pytest.approx(sk_topk(z, y, 1), abs=1e-12)
    assert rep["top5_k"] == min(5, c)
    assert rep["top5"] == pytest.approx(sk_topk(z, y, min(5, c)), abs=1e-12)
    assert rep["macro_f1"] == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="macro", zero_division=0), abs=1e-12)
    assert rep["weighted_f1"] == pytest.approx(
        skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assert rep["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-12)
    assert rep["ece"] == pytest.approx(expected_calibration_error(softmax(z, axis=1), y, 15), abs=1e-12)

    p, r, f, s = skm.precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    assert [row["class"] for row in rep["per_class"]] == names
    assert [row["index"] for row in rep["per_class"]] == list(range(c))
    for i, row in enumerate(rep["per_class"]):
        assert row["precision"] == pytest.approx(p[i], abs=1e-12)
        assert row["recall"] == pytest.approx(r[i], abs=1e-12)
        assert row["accuracy"] == row["recall"]
        assert row["f1"] == pytest.approx(f[i], abs=1e-12)
        assert row["support"] == s[i] == int(np.sum(y == i))

    cm = np.array(rep["confusion_matrix"])
    assert cm.shape == (c, c)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=labels))
    np.testing.assert_array_equal(cm.sum(axis=1), np.bincount(y, minlength=c))  # rows are the true class
    json.dumps(rep, allow_nan=False)  # metrics.json must be plain JSON
    return rep


@settings(max_examples=25, deadline=None)
@given(data=logits_targets(max_c=9))
def test_report_matches_sklearn(data: tuple[np.ndarray, np.ndarray]) -> None:
    z, y = data
    rep = _check_report(z, y)
    assert rep["nll"] == pytest.approx(-np.mean(np.log(softmax(z, axis=1))[np.arange(len(y)), y]), rel=1e-6)


def test_report_nll_matches_log_loss_and_absent_class() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(300, 7))
    y = rng.integers(0, 6, 300)  # class 6 never occurs
    rep = _check_report(z, y)
    assert rep["nll"] == pytest.approx(skm.log_loss(y, softmax(z, axis=1), labels=np.arange(7)), rel=1e-9)
    assert rep["per_class"][6]["support"] == 0
    assert rep["confusion_matrix"][6] == [0] * 7
    assert 0.0 <= rep["ece"] <= 1.0


def test_report_extreme_logits_nll_is_not_clipped() -> None:
    z = np.array([[0.0, 1000.0, 0.0], [5.0, 0.0, 0.0]])
    y = np.array([0, 0])
    rep = classification_report(z, y, ["a", "b", "c"])
    assert rep["nll"] == pytest.approx((1000.0 + np.log1p(2 * np.exp(-5.0))) / 2 + 0.0, rel=1e-9)


def test_report_torch_inputs_defaults_and_errors() -> None:
    rng = np.random.default_rng(2)
    z = rng.normal(size=(40, 3))
    y = rng.integers(0, 3, 40)
    rep_np = classification_report(z, y, ["x", "y", "z"])
    rep_t = classification_report(torch.from_numpy(z), torch.from_numpy(y), ["x", "y", "z"])
    assert rep_np == rep_t
    assert rep_np["top5_k"] == 3 and rep_np["top5"] == 1.0
    assert [r["class"] for r in classification_report(z, y, None)["per_class"]] == ["0", "1", "2"]
    with pytest.raises(ValueError, match="class names"):
        classification_report(z, y, ["x", "y"])
