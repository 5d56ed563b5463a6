"""What a run reports once its folds are trained: each fold's best epoch, the mean and spread over folds, the
out-of-fold logits of a K-fold classifier, timings and environment -> ``summary.json``, plots, trackers."""

from __future__ import annotations

import math
import platform
import time
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch

from vistrain._version import __version__
from vistrain.config.schema import Config
from vistrain.data.prepare import Prepared
from vistrain.engine.distributed import DistInfo
from vistrain.engine.hooks.base import FoldRun
from vistrain.engine.run_setup import Machine
from vistrain.fallbacks import Fallbacks
from vistrain.metrics.classification import epoch_metrics, per_domain_metrics
from vistrain.tracking.files import write_csv, write_json, write_npy
from vistrain.tracking.rundir import RunDir
from vistrain.tracking.writers import Trackers
from vistrain.viz.plots import training_plots

# Row fields that are not results: the row's coordinates, the rate and the timings.
NOT_RESULTS = ("fold", "epoch", "lr", "time_s", "mem_MiB", "fold_time_s", "img_per_s", "data_wait_frac")


def fold_result(fold: FoldRun, elapsed: float) -> dict[str, Any]:
    """summary.json's entry of one fold: its best epoch's results, the epochs run, whether it stopped early."""
    best = next(r for r in fold.state.history if r["epoch"] == fold.best_epoch)
    return {"fold": fold.fold, "best_epoch": fold.best_epoch, "epochs_run": fold.state.epoch,
            "stopped_early": fold.stop, "best": {k: v for k, v in best.items() if k not in NOT_RESULTS},
            "time_s": round(elapsed, 2)}


def summarise(cfg: Config, run: RunDir, data: Prepared, results: list[dict[str, Any]], folds: list[int],
              machine: Machine, started: float, info: DistInfo, fallbacks: Fallbacks | None = None) -> dict[str, Any]:
    """summary.json's content (``fallbacks``: what this run did instead of what was asked, ``fallbacks.py``);
    rank 0 also writes the OOF files of a classifier trained on every fold."""
    # Over the folds that report a metric: a domain absent from one fold's validation part has no value there.
    names = list(dict.fromkeys(n for r in results for n in r["best"]))
    values = {n: np.array([r["best"][n] for r in results if r["best"].get(n) is not None], dtype=np.float64)
              for n in names}
    summary: dict[str, Any] = {
        "run_id": run.run_id, "task": cfg.task, "monitor": cfg.train.monitor, "folds": results,
        "mean": {n: float(v.mean()) if len(v) else math.nan for n, v in values.items()},
        "std": {n: float(v.std(ddof=1)) if len(v) > 1 else 0.0 for n, v in values.items()},
    }
    if data.ratio_split:
        sizes = data.items["split"].value_counts()
        summary["split"] = {"type": "ratio", **{k: int(sizes.get(k, 0)) for k in ("train", "val", "test")},
                            "oof": "none: a ratio split trains one model on split=train (no out-of-fold logits); "
                                   "the test split is scored into eval/test/"}
    elif info.is_main and cfg.task == "classification" and sorted(folds) == list(range(cfg.data.folds)):
        summary["oof"] = write_oof(run, data)
    summary["timings"] = {"total_s": round(time.time() - started, 2),
                          "per_fold_s": {str(r["fold"]): r["time_s"] for r in results}}
    summary["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "timm": timm.__version__, "vistrain": __version__,
                              "device": machine.name(), "precision": machine.precision.name,
                              "processes": info.world, "platform": platform.platform()}
    summary["fallbacks"] = list(fallbacks.entries) if fallbacks else []
    return summary


def write_oof(run: RunDir, data: Prepared) -> dict[str, float]:
    """Out-of-fold logits [N, C] in splits.csv order, from each fold's best epoch."""
    logits = np.zeros((len(data.items), len(data.classes)), dtype=np.float32)
    for fold in np.unique(data.fold_of):
        logits[data.fold_of == fold] = np.load(run / "oof" / f"fold{fold}_valid_logits.npy")
    write_npy(run / "oof" / "oof_logits.npy", logits)
    write_npy(run / "oof" / "oof_targets.npy", data.targets)
    write_csv(run / "oof" / "oof_ids.csv", pd.DataFrame({
        "id": data.items["id"], "fold": data.fold_of, "target": data.items["label"],
        "pred": [data.classes[i] for i in logits.argmax(axis=1)]}))
    out = epoch_metrics(logits, data.targets)
    if "domain" in data.items.columns:  # top1@<d> ... over every fold's held-out items of domain d
        out.update(per_domain_metrics(logits, data.targets, data.items["domain"].fillna("").astype(str).to_numpy()))
    return out


def write_summary(run: RunDir, summary: dict[str, Any], trackers: Trackers) -> None:
    """summary.json, the training plots, and both to the trackers."""
    write_json(run / "summary.json", summary)
    trackers.log_images(training_plots(run.path))
    trackers.log_summary(summary)


def summary_line(summary: dict[str, Any]) -> str:
    """``macro_f1=0.9000±0.0100 over 5 folds | oof macro_f1=... accuracy=...`` for the [DONE] line; one fold has
    no spread to give (summary.json's std is 0.0 there), and the line says so."""
    mon, n = summary["monitor"], len(summary["folds"])
    if n == 1:
        out = f"{mon}={summary['mean'][mon]:.4f} on 1 fold (no spread over folds)"
    else:
        out = f"{mon}={summary['mean'][mon]:.4f}±{summary['std'][mon]:.4f} over {n} folds"
    if "oof" in summary:
        out += f" | oof macro_f1={summary['oof']['macro_f1']:.4f} accuracy={summary['oof']['accuracy']:.4f}"
    return out
