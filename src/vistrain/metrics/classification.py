"""Classification metrics (a public API). scikit-learn computes them; this module fixes the conventions:
every class index ``0..C-1`` counts, a class never predicted scores F1 0 rather than a warning.

``macro_f1`` means one thing in every vistrain output (the epoch log, ``train.monitor``, the OOF summary and
``evaluate``'s metrics.json): the unweighted mean of the per-class F1 over **all C classes of the run**, a class
neither present in the targets nor predicted scoring 0 (scikit-learn's
``f1_score(y, pred, labels=range(C), average="macro", zero_division=0)``). A domain's ``macro_f1@<d>`` is the one
exception (:func:`present_classes_macro_f1`): the mean over the classes present in that domain's targets, so a
domain holding 2 of 10 classes can reach 1.0.

Shapes: ``logits`` [N, C] float scores (any monotone transform of the probabilities gives the same top-k),
``targets`` / ``y_true`` / ``y_pred`` [N] int class indices in ``0..C-1``. numpy arrays, torch tensors (any device)
and sequences are accepted.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from scipy import special
from sklearn import metrics as skm

from vistrain.metrics._common import ArrayLike, _as_logits_targets, _as_targets, _np, _positive_int
from vistrain.metrics.calibration import expected_calibration_error
from vistrain.registry import domain_metrics

ECE_BINS: int = 15  # bins used for the ECE in classification_report
DOMAIN_METRICS = domain_metrics()  # what per_domain_metrics reports for each domain, as "<metric>@<d>"


def topk_accuracy(logits: ArrayLike, targets: ArrayLike, k: int = 1) -> float:
    """Fraction of rows whose target is among the ``k`` highest scores. logits [N, C], targets [N].

    Equals ``sklearn.metrics.top_k_accuracy_score(targets, logits, k=k, labels=range(C))``, ties included
    (scikit-learn ranks tied scores so the higher class index wins). ``k >= C`` gives 1.0. For C == 2, where
    scikit-learn only takes a 1-d score, the result equals its binary rule on ``softmax(logits)[:, 1]``: class 1 is
    predicted iff ``logits[:, 1] > logits[:, 0]``, so a tie predicts class 0.
    """
    k = _positive_int(k, "k")
    scores, y = _as_logits_targets(logits, targets)
    n_classes = scores.shape[1]
    if k >= n_classes:  # every class is in the top k; scikit-learn returns 1.0 too, with a warning
        return 1.0
    if n_classes == 2:
        # Compare the two columns directly: passing scikit-learn a 1-d score (e.g. s1 - s0) would make it
        # threshold at 0.5 whenever every score happens to lie in [0, 1], which is wrong for a difference.
        pred = (scores[:, 1] > scores[:, 0]).astype(np.int64)
        return float(np.mean(pred == y))
    return float(skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(n_classes)))


def macro_f1(y_true: ArrayLike, y_pred: ArrayLike, *, n_classes: int | None = None) -> float:
    """Unweighted mean of the per-class F1. y_true [N], y_pred [N] int.

    ``n_classes`` (what every vistrain output uses, see the module docstring): every class ``0..n_classes-1``
    counts, a class neither present nor predicted scoring 0; a label outside that range is a ``ValueError``
    (scikit-learn would silently leave it out of the mean). Without it the mean runs over the classes present in
    ``y_true`` or ``y_pred`` (scikit-learn's ``f1_score(average="macro")``), so a run missing a class in its
    validation part would score higher than one over all classes.
    """
    if n_classes is None:
        return float(skm.f1_score(_np(y_true), _np(y_pred), average="macro", zero_division=0))
    n_classes = _positive_int(n_classes, "n_classes")
    t = _as_targets(y_true, len(_np(y_true)), n_classes, name="y_true")
    p = _as_targets(y_pred, len(t), n_classes, name="y_pred")
    return float(skm.f1_score(t, p, labels=np.arange(n_classes), average="macro", zero_division=0))


def present_classes_macro_f1(y_true: ArrayLike, y_pred: ArrayLike, *, n_classes: int) -> float:
    """Unweighted mean of the F1 of the classes present in ``y_true``. y_true [N], y_pred [N] int in 0..C-1.

    The per-domain figure: a domain often holds some of the classes only (studio renders of a few products), and
    over all C classes its absent classes would each score 0, capping a perfect domain at (classes present) / C.
    Predictions of an absent class still count, as misses of the true class (scikit-learn's
    ``f1_score(y, pred, labels=np.unique(y), average="macro", zero_division=0)``).
    """
    n_classes = _positive_int(n_classes, "n_classes")
    t = _as_targets(y_true, len(_np(y_true)), n_classes, name="y_true")
    p = _as_targets(y_pred, len(t), n_classes, name="y_pred")
    if len(t) == 0:
        raise ValueError("y_true is empty: no class is present")
    return float(skm.f1_score(t, p, labels=np.unique(t), average="macro", zero_division=0))


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of equal entries. y_true [N], y_pred [N]."""
    return float(skm.accuracy_score(_np(y_true), _np(y_pred)))


def epoch_metrics(logits: ArrayLike, targets: ArrayLike) -> dict[str, float]:
    """What the training loop logs each epoch for a classifier (and the OOF summary). logits [N, C], targets [N].

    ``macro_f1`` over all C classes (as ``classification_report``), ``accuracy`` of the argmax, and ``top5``
    (:func:`topk_accuracy`, k = 5) when C >= 5 (below that it is always 1). Non-finite logits (a diverged model)
    are not an error here: ``top5`` is then NaN, and the loop's own checks report the divergence.
    """
    scores = np.asarray(_np(logits), dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"logits must have shape [N, C] with C >= 1, got {scores.shape}")
    n_classes = scores.shape[1]
    y = _as_targets(targets, len(scores), n_classes)
    pred = scores.argmax(axis=1)
    out = {"macro_f1": macro_f1(y, pred, n_classes=n_classes), "accuracy": accuracy(y, pred)}
    if n_classes >= 5:
        out["top5"] = topk_accuracy(scores, y, k=5) if np.all(np.isfinite(scores)) else math.nan
    return out


def per_domain_metrics(logits: ArrayLike, targets: ArrayLike, domains: ArrayLike) -> dict[str, float]:
    """``top1@<d>``, ``top5@<d>`` and ``macro_f1@<d>`` on the rows of each domain ``d``, keyed in sorted domain order.
    logits [N, C], targets [N], domains [N] (strings; rows with an empty domain count overall only).

    ``top1`` and ``top5`` are the overall definitions restricted to the domain's rows (:func:`topk_accuracy`,
    k = 1, 5; ``top5`` only when C >= 5, as in :func:`epoch_metrics`); ``macro_f1`` averages the F1 of the classes
    present in the domain's targets (:func:`present_classes_macro_f1`), as the domain's ``balanced_accuracy`` does
    its recalls. Non-finite logits give NaN top-k values, as in :func:`epoch_metrics`.
    """
    scores = np.asarray(_np(logits), dtype=np.float64)
    if scores.ndim != 2 or scores.shape[1] == 0:
        raise ValueError(f"logits must have shape [N, C] with C >= 1, got {scores.shape}")
    n_classes = scores.shape[1]
    y = _as_targets(targets, len(scores), n_classes)
    dom = np.asarray(_np(domains)).astype(str)
    if dom.shape != y.shape:
        raise ValueError(f"domains must have shape [{len(y)}], got {dom.shape}")
    finite = bool(np.all(np.isfinite(scores)))
    out: dict[str, float] = {}
    for d in sorted(set(dom.tolist()) - {""}):
        rows = dom == d
        z, t = scores[rows], y[rows]
        out[f"top1@{d}"] = topk_accuracy(z, t, k=1) if finite else math.nan
        if n_classes >= 5:
            out[f"top5@{d}"] = topk_accuracy(z, t, k=5) if finite else math.nan
        out[f"macro_f1@{d}"] = present_classes_macro_f1(t, z.argmax(axis=1), n_classes=n_classes)
    return out


def classification_report(logits: ArrayLike, targets: ArrayLike, class_names: Sequence[str] | None = None,
                          macro_f1_classes: Literal["all", "present"] = "all") -> dict[str, Any]:
    """Everything an evaluation writes to metrics.json for a classifier, as JSON-ready Python scalars / lists.

    logits [N, C] float, targets [N] int, class_names [C] (``None``: ``"0" .. "C-1"``). All C classes count, also
    those absent from ``targets``, except in ``macro_f1`` when ``macro_f1_classes`` is ``"present"`` (a domain's
    report, see :func:`per_domain_metrics`). Keys:

    * ``n``, ``n_classes``;
    * ``top1``, ``top5`` (:func:`topk_accuracy` with k = 1 and k = ``top5_k`` = min(5, C));
    * ``macro_f1`` (``"all"``: mean over all C classes, a class neither present nor predicted scoring 0;
      ``"present"``: :func:`present_classes_macro_f1`), ``weighted_f1`` (weighted by support, so absent classes
      weigh nothing);
    * ``balanced_accuracy``: mean recall over the classes present in ``targets`` (scikit-learn's definition; the
      recall of an absent class is undefined, not 0);
    * ``nll``: mean cross-entropy of ``softmax(logits)``, from a float64 log-softmax (no probability clipping);
    * ``ece``: :func:`~vistrain.metrics.calibration.expected_calibration_error` of ``softmax(logits)`` with
      ``ece_n_bins`` bins;
    * ``per_class``: one dict per class in index order: ``index``, ``class``, ``precision``, ``recall``, ``f1``,
      ``support``, ``accuracy`` (= recall: the accuracy on that class's samples); undefined ratios are 0;
    * ``confusion_matrix``: C x C list of lists, rows = true class, columns = predicted class.

    Per-class values and the confusion matrix use the argmax prediction (ties: lowest index); ``top1`` uses
    scikit-learn's top-k tie rule, so the two can differ only on rows with exactly tied top scores.
    """

    z, y = _as_logits_targets(logits, targets)
    n, n_classes = z.shape
    names = [str(i) for i in range(n_classes)] if class_names is None else [str(c) for c in class_names]
    if len(names) != n_classes:
        raise ValueError(f"{len(names)} class names for {n_classes} logit columns")
    labels = np.arange(n_classes)
    pred = z.argmax(axis=1)
    log_probs = special.log_softmax(z, axis=1)
    top5_k = min(5, n_classes)

    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average=None, zero_division=0)
    with warnings.catch_warnings():
        # Both are expected and harmless here: absent classes are left out of the mean by design, and the
        # internal confusion matrix over the labels seen is all balanced accuracy needs.
        warnings.filterwarnings("ignore", message=".*y_pred contains classes not in y_true.*")
        warnings.filterwarnings("ignore", message=".*A single label was found in 'y_true' and 'y_pred'.*")
        balanced = skm.balanced_accuracy_score(y, pred)

    per_class = [{"index": i, "class": names[i], "precision": float(precision[i]), "recall": float(recall[i]),
                  "f1": float(f1[i]), "support": int(support[i]), "accuracy": float(recall[i])}
                 for i in range(n_classes)]
    return {
        "n": int(n),
        "n_classes": int(n_classes),
        "top1": topk_accuracy(z, y, k=1),
        "top5": topk_accuracy(z, y, k=top5_k),
        "top5_k": top5_k,
        "macro_f1": macro_f1(y, pred, n_classes=n_classes) if macro_f1_classes == "all"
        else present_classes_macro_f1(y, pred, n_classes=n_classes),
        "weighted_f1": float(skm.f1_score(y, pred, labels=labels, average="weighted", zero_division=0)),
        "balanced_accuracy": float(balanced),
        "nll": float(-np.mean(log_probs[np.arange(n), y])),
        "ece": expected_calibration_error(np.exp(log_probs), y, n_bins=ECE_BINS),
        "ece_n_bins": ECE_BINS,
        "per_class": per_class,
        "confusion_matrix": skm.confusion_matrix(y, pred, labels=labels).tolist(),
    }
