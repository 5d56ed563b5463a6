"""Calibration metrics (a public API): expected calibration error, reliability bins, temperature scaling.

Conventions, fixed here so every caller reports the same numbers:

* Confidence is the top-1 probability ``max_c probs[i, c]`` and the prediction is its ``argmax`` (ties go to the
  lowest class index, as ``numpy.argmax``).
* ``probs`` must be probabilities: every value in ``[0, 1]`` (up to 1e-6) and every row summing to 1 (up to 1e-3,
  more for float16 / bfloat16 inputs, whose rounding alone can exceed that). Anything else (logits, scaled or
  negative values) is a ``ValueError`` naming the offending value and row: apply a softmax first.
* ``n_bins`` equal-width bins over ``[0, 1]`` with edges ``numpy.linspace(0, 1, n_bins + 1)`` in float64. Bin ``b``
  holds the confidences in ``(edges[b], edges[b + 1]]``: right-closed, so a confidence of exactly ``1.0`` lands in
  the last bin and one lying exactly on an inner edge lands in the bin below it. The first bin also holds ``0.0``
  (a closed ``[0, edges[1]]``) so no confidence in ``[0, 1]`` is dropped. Values a rounding error outside
  ``[0, 1]`` are clipped into the first / last bin. This is the binning of Guo et al.'s released code
  (``conf > lo and conf <= hi``).
* ECE is ``sum_b (n_b / N) * |accuracy_b - mean_confidence_b|`` over non-empty bins (Guo et al., 2017).

How torchmetrics differs (``MulticlassCalibrationError``, ``norm="l1"``): it bins with ``torch.bucketize(conf,
linspace(0, 1, n_bins + 1), right=True) - 1``, i.e. left-closed bins ``[edges[b], edges[b + 1])`` in the
confidences' dtype (float32). A confidence exactly on an inner edge therefore goes to the bin *above* it there and
to the bin below it here, and a confidence of exactly ``1.0`` gets a bin of its own (index ``n_bins``) instead of
joining ``(1 - 1 / n_bins, 1]``. The two ECEs agree whenever no confidence lies exactly on an edge (as float32),
which is the usual case for a softmax; one-hot or rounded probabilities (e.g. exactly 0.5, 0.6 or 1.0) can differ.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import optimize

from vistrain.metrics._common import ArrayLike, _as_logits_targets, _np, _positive_int

# The temperature search interval. Real networks land in roughly [0.5, 5]; the interval is wide so that logits on
# an unusual scale still find an interior optimum, and finite so that a separable (or hopeless) set of logits,
# whose NLL keeps falling towards T -> 0 (or T -> inf), still gets a deterministic answer: the bound, with a warning.
T_MIN: float = 1e-3
T_MAX: float = 1e3

@dataclass(frozen=True)
class ReliabilityBins:
    """Per-bin statistics behind a reliability diagram; every array has shape [n_bins].

    ``confidence`` and ``accuracy`` are NaN for empty bins (``count == 0``) so a plot skips them.
    """

    lower: np.ndarray  # float64, left edge (open, except the first bin which also holds 0)
    upper: np.ndarray  # float64, right edge (closed)
    count: np.ndarray  # int64, samples whose confidence falls in the bin
    confidence: np.ndarray  # float64, mean top-1 confidence in the bin
    accuracy: np.ndarray  # float64, fraction of the bin's samples whose top-1 prediction is right

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def ece(self) -> float:
        """Expected calibration error: bin gaps weighted by each bin's share of the samples."""
        filled = self.count > 0
        weights = self.count[filled] / self.count.sum()
        return float(np.sum(weights * np.abs(self.accuracy[filled] - self.confidence[filled])))

    def rows(self) -> list[dict[str, float]]:
        """One dict per bin (lo, hi, count, confidence, accuracy): what the reliability diagram draws."""
        return [{"lo": float(lo), "hi": float(hi), "count": int(c), "confidence": float(conf), "accuracy": float(acc)}
                for lo, hi, c, conf, acc in zip(self.lower, self.upper, self.count, self.confidence, self.accuracy)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready lists; empty bins give ``None`` for confidence and accuracy (JSON has no NaN)."""
        def nan_to_none(a: np.ndarray) -> list[float | None]:
            return [None if math.isnan(v) else float(v) for v in a]

        return {"lower": self.lower.tolist(), "upper": self.upper.tolist(), "count": self.count.tolist(),
                "confidence": nan_to_none(self.confidence), "accuracy": nan_to_none(self.accuracy)}


PROB_RANGE_TOL: float = 1e-6  # how far outside [0, 1] a probability may stray by rounding
PROB_SUM_TOL: float = 1e-3  # how far from 1 a row may sum (float32 / float64 inputs)


def _row_sum_tolerance(probs: ArrayLike) -> float:
    """PROB_SUM_TOL, widened to two machine epsilons of a low-precision input (float16: 2e-3, bfloat16: 1.6e-2),
    whose rounding of each value alone can move a row's sum by about half an epsilon."""
    dtype = getattr(probs, "dtype", None)
    if isinstance(dtype, torch.dtype):
        eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    else:
        eps = float(np.finfo(dtype).eps) if dtype is not None and np.dtype(dtype).kind == "f" else 0.0
    return max(PROB_SUM_TOL, 2 * eps)


def _as_probs_targets(probs: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 probabilities [N, C] and int64 targets [N]; values that are not probabilities raise."""
    p, y = _as_logits_targets(probs, targets, name="probs")
    hint = "; probs must be class probabilities (e.g. softmax(logits)), not logits or scores"
    lo, hi = p.min(), p.max()
    if lo < -PROB_RANGE_TOL or hi > 1 + PROB_RANGE_TOL:
        bad = lo if lo < -PROB_RANGE_TOL else hi
        row = int(np.argwhere(p == bad)[0, 0])
        raise ValueError(f"probs: value {bad:.6g} in row {row} is outside [0, 1]{hint}")
    sums = p.sum(axis=1)
    worst = int(np.argmax(np.abs(sums - 1.0)))
    if abs(sums[worst] - 1.0) > _row_sum_tolerance(probs):
        raise ValueError(f"probs: row {worst} sums to {sums[worst]:.6g}, not 1{hint}")
    return p, y


def reliability_bins(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> ReliabilityBins:
    """Bin the top-1 confidences into ``n_bins`` equal-width bins (see the module docstring for the edges).

    probs: [N, C] class probabilities (rows summing to 1, e.g. a softmax; anything else raises ``ValueError``);
    targets: [N] int class indices.
    """
    n_bins = _positive_int(n_bins, "n_bins")
    p, y = _as_probs_targets(probs, targets)
    conf = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # searchsorted(side="left") returns i with edges[i-1] < c <= edges[i], i.e. bin i-1 of a right-closed
    # binning; comparing against the same linspace edges (not ceil(c * n_bins)) keeps values lying exactly on an
    # edge in the bin a plain `lo < c <= hi` loop would choose. The clip puts 0.0 (and rounding strays) in range.
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins).astype(np.int64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    correct_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins become NaN on purpose
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        acc = np.where(count > 0, correct_sum / count, np.nan)
    return ReliabilityBins(lower=edges[:-1].copy(), upper=edges[1:].copy(), count=count,
                           confidence=mean_conf, accuracy=acc)


def expected_calibration_error(probs: ArrayLike, targets: ArrayLike, n_bins: int = 15) -> float:
    """ECE of the top-1 confidence: ``sum_b (n_b / N) * |acc_b - conf_b|`` over ``n_bins`` equal-width bins.

    probs: [N, C] class probabilities (values in [0, 1], rows summing to 1; anything else raises ``ValueError``);
    targets: [N] int. Bins are ``(lo, hi]`` with the first bin also holding 0 (torchmetrics bins ``[lo, hi)``: see
    the module docstring).
    """
    return reliability_bins(probs, targets, n_bins).ece()


def apply_temperature(logits: ArrayLike, temperature: float) -> np.ndarray | torch.Tensor:
    """``logits / T``: [N, C] in, [N, C] out, a tensor for a tensor (same device and dtype), else a numpy array.

    Softmax of the result gives the temperature-scaled probabilities; the argmax (hence accuracy) is unchanged.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(logits, torch.Tensor):
        return logits / temperature
    return np.asarray(_np(logits), dtype=np.float64) / temperature


def softmax(logits: ArrayLike, temperature: float = 1.0) -> np.ndarray:
    """Probabilities [N, C] of ``softmax(logits / T)`` in float64 (row maxima subtracted first)."""
    z = np.asarray(apply_temperature(_np(logits), temperature), dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def nll(logits: ArrayLike, targets: ArrayLike, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)`` against ``targets``."""
    z, y = _as_logits_targets(logits, targets)
    return _nll(z - z.max(axis=1, keepdims=True), y, 1.0 / temperature)


def at_search_bound(temperature: float) -> bool:
    """True when ``fit_temperature`` stopped at a limit of its search (separable or uninformative logits)."""
    return not T_MIN * (1 + 1e-6) < temperature < T_MAX * (1 - 1e-6)


def _nll(z: np.ndarray, y: np.ndarray, beta: float) -> float:
    """Mean cross-entropy of softmax(beta * z) against y. z [N, C] must have row maxima 0 and beta > 0: then every
    exponent is <= 0 with one exactly 0, so the plain log-sum-exp cannot overflow or take log(0) (and is several
    times faster than scipy's general logsumexp, which matters inside the search)."""
    scaled = beta * z
    return float(np.mean(np.log(np.exp(scaled).sum(axis=1)) - scaled[np.arange(len(y)), y]))


def fit_temperature(logits: ArrayLike, targets: ArrayLike) -> float:
    """The temperature ``T > 0`` minimising the mean NLL of ``softmax(logits / T)`` against ``targets``.

    logits: [N, C] float (the model's raw outputs on held-out data); targets: [N] int.

    Why this is robust: with ``beta = 1 / T`` the NLL is ``mean(logsumexp(beta * z) - beta * z_y)``, a convex
    function of ``beta`` (strictly so unless every row's logits are all equal). Hence it is unimodal in ``log T``
    and a bounded Brent search over ``log T in [log T_MIN, log T_MAX]`` finds the global minimum; no starting
    point, learning rate or random state is involved, so the result is deterministic. Searching ``log T`` keeps
    the step sizes relative, so T = 0.01 is found as precisely as T = 10. Everything runs in float64 numpy.

    Degenerate inputs: if every row's logits are constant the NLL does not depend on T and 1.0 is returned; if
    the optimum lies at or beyond the search bounds (e.g. perfectly separated logits, whose NLL falls all the way
    to T -> 0), the bound is returned with a ``RuntimeWarning``.
    """
    z, y = _as_logits_targets(logits, targets)
    z = z - z.max(axis=1, keepdims=True)  # NLL is shift-invariant per row, and _nll needs row maxima of 0
    if np.all(z == 0):
        return 1.0
    lo, hi = math.log(T_MIN), math.log(T_MAX)

    def objective(log_t: float) -> float:
        return _nll(z, y, math.exp(-log_t))

    res = optimize.minimize_scalar(objective, bounds=(lo, hi), method="bounded",
                                   options={"xatol": 1e-10, "maxiter": 500})
    log_t, best = float(res.x), float(res.fun)
    # The bounded method never evaluates the bounds themselves, and when the NLL keeps falling towards a bound it
    # may stop anywhere in a region where the NLL has underflowed to a constant (separable logits: exactly 0).
    # Checking the bounds explicitly makes "the optimum is a bound" an exact, reproducible answer.
    for bound in (lo, hi):
        if objective(bound) <= best:
            log_t, best = bound, objective(bound)
    if log_t in (lo, hi) or min(log_t - lo, hi - log_t) < 1e-4:
        warnings.warn(f"fit_temperature: optimum at the search bound T={math.exp(log_t):.4g} "
                      f"(interval [{T_MIN}, {T_MAX}]); the logits may be separable or uninformative",
                      RuntimeWarning, stacklevel=2)
    return math.exp(log_t)


def cross_fit_temperatures(logits: ArrayLike, targets: ArrayLike, groups: ArrayLike) -> dict[int, float]:
    """For each group g, the temperature fitted (``fit_temperature``) on the rows of every *other* group.

    logits: [N, C]; targets: [N] int; groups: [N] int (a K-fold run's fold of each out-of-fold row). Scoring group
    g's rows at its temperature is an out-of-sample figure: that T never saw them, as a temperature fitted on all
    rows and scored on the same rows would have (in-sample NLL and ECE flatter the fit). A fit at the search bound
    (separable or uninformative rows; see ``at_search_bound``) gives 1.0, as ``calibrate`` keeps T = 1 there.
    Needs at least two groups.
    """
    z, y = _as_logits_targets(logits, targets)
    g = np.asarray(_np(groups)).astype(np.int64).reshape(-1)
    if len(g) != len(y):
        raise ValueError(f"groups: {len(g)} values for {len(y)} rows")
    names = np.unique(g)
    if len(names) < 2:
        raise ValueError(f"groups: cross-fitting needs at least two groups, got {len(names)}")
    out = {}
    for name in names.tolist():
        others = g != name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a bound is replaced by 1.0 just below
            t = fit_temperature(z[others], y[others])
        out[int(name)] = 1.0 if at_search_bound(t) else t
    return out


def row_temperatures(groups: ArrayLike, temperatures: dict[int, float]) -> np.ndarray:
    """[N] float64: each row's group's temperature (``cross_fit_temperatures``' answer), to divide [N, C] logits
    by ``[:, None]``."""
    g = np.asarray(_np(groups)).astype(np.int64).reshape(-1)
    missing = sorted(set(g.tolist()) - set(temperatures))
    if missing:
        raise ValueError(f"temperatures: no temperature for group(s) {missing}")
    return np.array([temperatures[k] for k in g.tolist()], dtype=np.float64)
