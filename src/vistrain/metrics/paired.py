"""Paired comparisons of two models scored on the same images (``vistrain compare``).

Two runs evaluated on the same N images are not independent samples: the images that are hard for one are hard
for the other. The paired bootstrap resamples the images once per replicate and scores both runs on that same
resample (the same index matrix for both), so the spread of ``figure_B - figure_A`` over the replicates is the
spread of the difference, far narrower than two separate intervals suggest. McNemar's exact test looks only at the
images where exactly one of the two runs is right (the discordant pairs). Whether a difference is a gain follows
the figure's direction in the metric registry (``vistrain.registry.METRICS``: a lower ``nll`` is better).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats

from vistrain.metrics.bootstrap import LEVEL, percentile_interval
from vistrain.registry import higher_is_better


def paired_difference(reps_a: np.ndarray, reps_b: np.ndarray, level: float = LEVEL) -> dict[str, Any]:
    """The bootstrap distribution of ``B - A`` from paired replicates [R] (same resampled images for both).

    ``interval``: its percentile interval; ``p_value``: the two-sided percentile-bootstrap p-value
    ``min(1, 2 * min(P(d <= 0), P(d >= 0)))`` over the replicates d, i.e. the smallest 1 - level at which the
    percentile interval would still hold 0 (1.0 when every replicate difference is 0, identical predictions)."""
    d = np.asarray(reps_b, dtype=np.float64) - np.asarray(reps_a, dtype=np.float64)
    d = d[~np.isnan(d)]
    p = min(1.0, 2.0 * min(float(np.mean(d <= 0)), float(np.mean(d >= 0))))
    return {"interval": percentile_interval(d, level), "p_value": p}


def paired_figures(values_a: dict[str, float], values_b: dict[str, float], reps_a: dict[str, np.ndarray],
                   reps_b: dict[str, np.ndarray], level: float = LEVEL) -> dict[str, dict[str, Any]]:
    """``B - A`` for every figure of ``values_a``: the value, the paired-bootstrap interval and p-value
    (:func:`paired_difference` of the replicates [R]), the figure's direction and the verdict on B: "better" or
    "worse" when the interval lies wholly on one side of 0 (which side is better: the direction), else
    "inconclusive"."""
    out = {}
    for key in values_a:
        diff = {"value": values_b[key] - values_a[key], **paired_difference(reps_a[key], reps_b[key], level)}
        up = higher_is_better(key)
        lo, hi = diff["interval"]
        gain, loss = (lo > 0, hi < 0) if up else (hi < 0, lo > 0)
        out[key] = {**diff, "higher_is_better": up,
                    "verdict": "better" if gain else "worse" if loss else "inconclusive"}
    return out


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of equal top-1 accuracy: under the null an image on which exactly one run is right is
    A's or B's with probability 1/2, so A-only wins ``a_only`` ~ Binomial(a_only + b_only, 1/2); two-sided p-value
    from ``scipy.stats.binomtest`` (1.0 without discordant pairs). correct_a, correct_b: bool [N], same images."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    n = a_only + b_only
    p = float(stats.binomtest(a_only, n, 0.5).pvalue) if n else 1.0
    return {"a_only": a_only, "b_only": b_only, "both": int(np.sum(a & b)), "neither": int(np.sum(~a & ~b)),
            "p_value": p, "test": "McNemar exact (binomial on the discordant pairs)"}
