"""``vistrain calibrate RUN`` (and ``train --use-calibration``): one temperature for the run.

The temperature is fitted on the out-of-fold logits (every item scored by a model that never saw it),
or on the validation fold's logits when only one fold was trained.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.errors import UserError
from vistrain.metrics.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from vistrain.tracking.files import write_json

log = logging.getLogger(__name__)


def calibration_logits(run_dir: Path) -> tuple[np.ndarray, np.ndarray, str]:
    """(logits [N, C], targets [N], where they came from) for fitting the temperature."""
    oof = run_dir / "oof" / "oof_logits.npy"
    if oof.is_file():
        return np.load(oof), np.load(run_dir / "oof" / "oof_targets.npy"), "oof"
    fold_files = sorted((run_dir / "oof").glob("fold*_valid_logits.npy"))
    if not fold_files:
        raise UserError(f"RUN: {run_dir} has no validation logits to calibrate on; train it first")
    splits = pd.read_csv(run_dir / "splits.csv", dtype={"id": str}, keep_default_na=False)
    class_to_idx = json.loads((run_dir / "class_map.json").read_text())["class_to_idx"]
    logits, targets, folds = [], [], []
    for f in fold_files:
        fold = int(f.stem.removeprefix("fold").split("_")[0])
        labels = splits.loc[splits["fold"] == fold, "label"].astype(str)
        logits.append(np.load(f))
        targets.append(labels.map(class_to_idx).to_numpy(dtype=np.int64))
        folds.append(fold)
    return np.concatenate(logits), np.concatenate(targets), f"validation fold(s) {folds}"


def _nll(logits: np.ndarray, targets: np.ndarray) -> float:
    import torch

    return float(torch.nn.functional.cross_entropy(torch.from_numpy(logits).double(), torch.from_numpy(targets)))


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _bins(b: Any) -> list[dict[str, float]]:
    """ReliabilityBins -> the list of per-bin dicts the reliability diagram draws."""
    return [{"lo": float(lo), "hi": float(hi), "count": int(c), "confidence": float(conf), "accuracy": float(acc)}
            for lo, hi, c, conf, acc in zip(b.lower, b.upper, b.count, b.confidence, b.accuracy)]


def run_calibrate(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir).resolve()
    logits, targets, source = calibration_logits(run_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fitted = fit_temperature(logits, targets)
    # At a search bound T is not identifiable (separable or uninformative logits): T -> 0 would make every
    # prediction a certainty, which no new data would justify.
    at_bound = any(issubclass(w.category, RuntimeWarning) for w in caught)
    probs_before, probs_after = _softmax(logits), _softmax(logits / fitted)
    ece_before = expected_calibration_error(probs_before, targets)
    ece_after = expected_calibration_error(probs_after, targets)
    # Temperature scaling minimises NLL; on a near-perfect model that can nudge ECE up. Never ship a
    # calibration that is worse on the very data it was fitted on: keep T = 1 then, and say so.
    applied = ece_after <= ece_before + 1e-12 and not at_bound
    temperature = fitted if applied else 1.0
    result = {
        "temperature": temperature, "fitted_temperature": fitted, "applied": applied, "source": source,
        "n": int(len(targets)), "nll_before": _nll(logits, targets), "nll_after": _nll(logits / temperature, targets),
        "ece_before": ece_before, "ece_after": ece_after if applied else ece_before,
        # what the fitted temperature itself gave, also when it was not applied
        "nll_at_fitted": _nll(logits / fitted, targets), "ece_at_fitted": ece_after,
    }
    write_json(run_dir / "calibration.json", result)
    from vistrain.viz.plots import reliability_diagram_png

    reliability_diagram_png({"before": _bins(reliability_bins(probs_before, targets)),
                             "after": _bins(reliability_bins(_softmax(logits / temperature), targets))},
                            run_dir / "calibration_reliability.png", ece_before=result["ece_before"],
                            ece_after=result["ece_after"])
    log.info("[CALIB] T=%.4f (fitted %.4f on %s, n=%d) | NLL %.4f -> %.4f | ECE %.4f -> %.4f%s", temperature, fitted,
             source, result["n"], result["nll_before"], result["nll_after"], result["ece_before"], result["ece_after"],
             "" if applied else " (T at its search bound: the logits are separable; kept T=1)" if at_bound
             else " (fitted T made ECE worse; kept T=1)")
    return result
