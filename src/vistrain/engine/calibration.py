"""``vistrain calibrate RUN`` (and ``train --use-calibration``): one temperature for the run's single models.

The temperature is fitted on the out-of-fold logits (every item scored by a model that never saw it), or on the
validation fold's logits when only one fold was trained. Its figures, and the keep / revert decision, are out of
sample: each fold's rows are scored at a temperature fitted on the other folds' rows only (cross-fitting; with one
fold, on ``CHUNKS`` interleaved parts of its rows), because a temperature scored on the rows it was fitted on
always looks at least as good as it is.

A fold ensemble (K models averaged) is already softer than any one of them, so the single-model temperature does
not carry over to it; its own temperature needs labelled images outside every fold's training data, which a K-fold
run does not have: ``calibration.json``'s ``ensemble`` says so, and predictions averaging several folds stay at
T = 1. A run with one model (a ratio split, or one trained fold) is its own ensemble.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from vistrain.engine.inference import LoadedRun, load_run
from vistrain.errors import UserError
from vistrain.metrics.calibration import (
    at_search_bound,
    cross_fit_temperatures,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    row_temperatures,
    softmax,
)
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)
CHUNKS = 5  # cross-fitting parts of a single validation fold's rows (row i in part i % CHUNKS)


def calibration_logits(run: LoadedRun) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """(logits [N, C], targets [N], fold of each row [N], where they came from) for fitting the temperature."""
    oof = run.path / "oof" / "oof_logits.npy"
    if oof.is_file():
        folds = run.splits()["fold"].to_numpy(dtype=np.int64)
        return np.load(oof), np.load(run.path / "oof" / "oof_targets.npy"), folds, "oof"
    fold_files = sorted((run.path / "oof").glob("fold*_valid_logits.npy"))
    if not fold_files:
        raise UserError(f"RUN: {run.path} has no validation logits to calibrate on; train it first")
    splits, class_to_idx = run.splits(), run.class_index()
    logits, targets, folds = [], [], []
    for f in fold_files:
        fold = int(f.stem.removeprefix("fold").split("_")[0])
        labels = splits.loc[splits["fold"] == fold, "label"]
        logits.append(np.load(f))
        targets.append(labels.map(class_to_idx).to_numpy(dtype=np.int64))
        folds.append(np.full(len(labels), fold, dtype=np.int64))
    names = sorted({int(f[0]) for f in folds if len(f)})
    return np.concatenate(logits), np.concatenate(targets), np.concatenate(folds), f"validation fold(s) {names}"


def cross_fit_groups(folds: np.ndarray) -> tuple[np.ndarray, str]:
    """The cross-fitting group of each row and what the groups are: the folds when the rows come from several,
    else ``CHUNKS`` interleaved parts of the rows in their stored order (``evaluate --split val`` rebuilds the
    same parts from the same order)."""
    if len(np.unique(folds)) > 1:
        return folds, "fold"
    return np.arange(len(folds)) % CHUNKS, f"{CHUNKS} interleaved parts of the rows"


def run_calibrate(run_dir: Path) -> dict[str, Any]:
    run = load_run(run_dir)
    if run.cfg.task != "classification":
        raise UserError(f"RUN: {run.path} is an {run.cfg.task} run; temperature scaling is for classifiers")
    logits, targets, folds, source = calibration_logits(run)
    groups, by = cross_fit_groups(folds)
    if len(np.unique(groups)) < 2:
        raise UserError(f"RUN: {run.path} has {len(targets)} held-out row(s) in {source}: too few to fit a "
                        "temperature and score it on rows it was not fitted on")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fit at the search bound is handled below
        fitted = fit_temperature(logits, targets)
    # At a search bound T is not identifiable (separable or uninformative logits): T -> 0 would make every
    # prediction a certainty, which no new data would justify.
    at_bound = at_search_bound(fitted)
    crossed = cross_fit_temperatures(logits, targets, groups)
    t_rows = row_temperatures(groups, crossed)[:, None]
    probs_before, probs_crossed = softmax(logits), softmax(logits / t_rows)
    ece_before = expected_calibration_error(probs_before, targets)
    ece_crossed = expected_calibration_error(probs_crossed, targets)
    # Temperature scaling minimises NLL; on a near-perfect model that can nudge ECE up. Decide on rows the
    # temperature never saw: keep T = 1 when scaling them made ECE worse, and say so.
    applied = ece_crossed <= ece_before + 1e-12 and not at_bound
    temperature = fitted if applied else 1.0
    nll_before, nll_crossed = nll(logits, targets), nll(logits / t_rows, targets)
    single = len(run.folds) == 1
    result = {
        "temperature": temperature, "fitted_temperature": fitted, "applied": applied, "source": source,
        "n": int(len(targets)),
        # out of sample: before = T 1 (nothing fitted); after = each group at the T fitted without it
        "nll_before": nll_before, "nll_after": nll_crossed if applied else nll_before,
        "ece_before": ece_before, "ece_after": ece_crossed if applied else ece_before,
        "nll_cross_fitted": nll_crossed, "ece_cross_fitted": ece_crossed,
        "cross_fit": {"by": by, "temperatures": {str(k): v for k, v in crossed.items()}},
        # for reference only, never for a decision: the fitted T scored on the rows it was fitted on
        "in_sample": {"nll": nll(logits, targets, fitted),
                      "ece": expected_calibration_error(softmax(logits, fitted), targets)},
        "calibration": {"fitted_on": source, "evaluated_on": f"{source}, cross-fitted by {by}", "in_sample": False},
        "ensemble": ({"temperature": temperature if applied else None, "fitted": applied, "fitted_on": source,
                      "note": "one trained model: it is the ensemble, and its temperature is the run's"}
                     if single else
                     {"temperature": None, "fitted": False, "fitted_on": None,
                      "note": f"not fitted: the {len(run.folds)}-fold ensemble is softer than any one fold model, "
                              "and no labelled images lie outside every fold's training data to fit it on; "
                              "predictions averaging several folds are left at T = 1"}),
    }
    write_json(run.path / "calibration.json", result)
    from vistrain.viz.plots import reliability_diagram_png

    after = probs_crossed if applied else probs_before
    reliability_diagram_png({"before": reliability_bins(probs_before, targets).rows(),
                             "after": reliability_bins(after, targets).rows()},
                            run.path / "calibration_reliability.png", ece_before=result["ece_before"],
                            ece_after=result["ece_after"])
    log.info("[CALIB] T=%.4f (fitted %.4f on %s, n=%d) | out of sample (cross-fitted by %s): NLL %.4f -> %.4f | "
             "ECE %.4f -> %.4f%s", temperature, fitted, source, result["n"], by, nll_before, nll_crossed, ece_before,
             ece_crossed, "" if applied else " (T at its search bound: the logits are separable; kept T=1)"
             if at_bound else " (T fitted without them made ECE worse; kept T=1)")
    if not single:
        log.info("[CALIB] fold ensemble: %s", result["ensemble"]["note"])
    from vistrain.viz.model_card import refresh_model_card

    refresh_model_card(run.path)  # the card's calibration section
    return result
