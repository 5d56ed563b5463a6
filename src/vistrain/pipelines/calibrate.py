"""``vistrain calibrate RUN`` (and ``train --use-calibration``): one temperature for the run.

The temperature is fitted on the out-of-fold logits (every item scored by a model that never saw it),
or on the validation fold's logits when only one fold was trained.
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
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_bins,
    softmax,
)
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)


def calibration_logits(run: LoadedRun) -> tuple[np.ndarray, np.ndarray, str]:
    """(logits [N, C], targets [N], where they came from) for fitting the temperature."""
    oof = run.path / "oof" / "oof_logits.npy"
    if oof.is_file():
        return np.load(oof), np.load(run.path / "oof" / "oof_targets.npy"), "oof"
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
        folds.append(fold)
    return np.concatenate(logits), np.concatenate(targets), f"validation fold(s) {folds}"


def run_calibrate(run_dir: Path) -> dict[str, Any]:
    run = load_run(run_dir)
    if run.cfg.task != "classification":
        raise UserError(f"RUN: {run.path} is an {run.cfg.task} run; temperature scaling is for classifiers")
    run_dir = run.path
    logits, targets, source = calibration_logits(run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a fit at the search bound is handled below
        fitted = fit_temperature(logits, targets)
    # At a search bound T is not identifiable (separable or uninformative logits): T -> 0 would make every
    # prediction a certainty, which no new data would justify.
    at_bound = at_search_bound(fitted)
    probs_before, probs_after = softmax(logits), softmax(logits, fitted)
    ece_before = expected_calibration_error(probs_before, targets)
    ece_after = expected_calibration_error(probs_after, targets)
    # Temperature scaling minimises NLL; on a near-perfect model that can nudge ECE up. Never ship a
    # calibration that is worse on the very data it was fitted on: keep T = 1 then, and say so.
    applied = ece_after <= ece_before + 1e-12 and not at_bound
    temperature = fitted if applied else 1.0
    result = {
        "temperature": temperature, "fitted_temperature": fitted, "applied": applied, "source": source,
        "n": int(len(targets)), "nll_before": nll(logits, targets), "nll_after": nll(logits, targets, temperature),
        "ece_before": ece_before, "ece_after": ece_after if applied else ece_before,
        # what the fitted temperature itself gave, also when it was not applied
        "nll_at_fitted": nll(logits, targets, fitted), "ece_at_fitted": ece_after,
    }
    write_json(run_dir / "calibration.json", result)
    from vistrain.viz.plots import reliability_diagram_png

    reliability_diagram_png({"before": reliability_bins(probs_before, targets).rows(),
                             "after": reliability_bins(softmax(logits, temperature), targets).rows()},
                            run_dir / "calibration_reliability.png", ece_before=result["ece_before"],
                            ece_after=result["ece_after"])
    log.info("[CALIB] T=%.4f (fitted %.4f on %s, n=%d) | NLL %.4f -> %.4f | ECE %.4f -> %.4f%s", temperature, fitted,
             source, result["n"], result["nll_before"], result["nll_after"], result["ece_before"], result["ece_after"],
             "" if applied else " (T at its search bound: the logits are separable; kept T=1)" if at_bound
             else " (fitted T made ECE worse; kept T=1)")
    return result
