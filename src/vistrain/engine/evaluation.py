"""``vistrain evaluate RUN --split val|test|oof``: metrics (overall and per domain), per-class table, predictions,
confusion matrix, failures and top losses into ``RUN/eval/<split>/``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from vistrain.data.images import ImageIndex
from vistrain.data.sources import read_csv, require_dir, require_file
from vistrain.engine import device as dev
from vistrain.engine.inference import (
    LoadedRun,
    ensemble_probs,
    infer_logits,
    load_fold_model,
    load_run,
    require_readable,
    select_folds,
)
from vistrain.engine.prediction import predict_probs, tta_wanted, warn_untrained_views
from vistrain.errors import UserError
from vistrain.metrics.bootstrap import LEVEL, bootstrap_indices, classification_intervals, format_interval
from vistrain.metrics.calibration import row_temperatures
from vistrain.metrics.classification import DOMAIN_METRICS, ECE_BINS, classification_report, per_domain_metrics
from vistrain.tracking.files import write_csv, write_json

log = logging.getLogger(__name__)
SPLITS = ("val", "test", "oof")
DOMAIN_KEYS = ("top1", "top5", "macro_f1", "balanced_accuracy")  # the console's per-domain table (metrics.json has all)


def _targets(run: LoadedRun, labels: pd.Series, key: str) -> np.ndarray:
    index = run.class_index()
    unknown = sorted({str(v) for v in labels} - set(index))
    if unknown:
        raise UserError(f"{key}: label(s) not seen in training: {', '.join(unknown[:5])}; "
                        f"classes: {', '.join(map(str, run.classes))}")
    return np.array([index[str(v)] for v in labels], dtype=np.int64)


def held_out_temperatures(run: LoadedRun, folds: np.ndarray, split: str) -> tuple[np.ndarray | None, dict[str, Any]]:
    """Each row's temperature [N, 1] (None: no temperature) for rows scored by their own fold's model (``oof``,
    ``val``; ``folds``: each row's fold, rows in splits.csv order), and the metrics.json ``calibration`` entry.

    The run's temperature was fitted on these very rows, so scoring them at it would flatter it; each row is
    scored at the temperature ``calibrate`` fitted without its fold (or its part of a single fold's rows)."""
    cal, info = run.calibration, {"fitted_on": None, "evaluated_on": split, "in_sample": False}
    if run.temperature is None or not cal.get("applied", True):
        return None, {"temperature": None, **info, "note": "uncalibrated" if run.temperature is None
                      else "calibrate kept T = 1 (a temperature fitted without the scored rows made ECE worse)"}
    cross = cal.get("cross_fit")
    if not isinstance(cross, dict):  # a calibration.json written before cross-fitting
        return np.full((len(folds), 1), run.temperature), {
            "temperature": run.temperature, "fitted_on": cal.get("source"), "evaluated_on": split,
            "in_sample": True, "note": "calibration.json predates cross-fitting: run vistrain calibrate RUN again"}
    from vistrain.engine.calibration import CHUNKS

    temps = {int(k): float(v) for k, v in cross["temperatures"].items()}
    by_fold = cross["by"] == "fold"
    groups = folds if by_fold else np.arange(len(folds)) % CHUNKS
    missing = sorted(set(groups.tolist()) - set(temps))
    if missing:
        raise UserError(f"RUN: {run.path / 'calibration.json'} has no cross-fitted temperature for "
                        f"{'fold' if by_fold else 'part'} {missing[0]}; run vistrain calibrate {run.path} again")
    what = "folds" if by_fold else f"{CHUNKS - 1} parts of {CHUNKS}"
    info["fitted_on"] = (f"{cal['source']} of the other {what} (cross-fitted: "
                         f"{'fold' if by_fold else 'part'} k's rows at the T fitted without them)")
    return row_temperatures(groups, temps)[:, None], {"temperature": "cross-fitted", "temperatures": {
        str(k): temps[k] for k in sorted(set(groups.tolist()))}, **info}


def ensemble_calibration(run: LoadedRun, folds: list[int], split: str) -> dict[str, Any]:
    """The metrics.json ``calibration`` entry for ``folds``' predictions averaged: their temperature
    (``LoadedRun.temperature_for``), fitted on the OOF / validation logits, never on the ``split`` scored here."""
    t = run.temperature_for(folds)
    which = f"fold {folds[0]}'s model" if len(folds) == 1 else f"the ensemble of folds {','.join(map(str, folds))}"
    info = {"temperature": t, "applies_to": which, "fitted_on": run.calibration.get("source") if t else None,
            "evaluated_on": split, "in_sample": False}
    if t is None and run.temperature is not None and len(folds) > 1:
        info["note"] = "the fold ensemble's temperature is not fitted (calibration.json ensemble): T = 1"
    return info


def oof_outputs(run: LoadedRun) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The stored out-of-fold logits (untempered), their targets and splits.csv (same rows, same order)."""
    oof = run.path / "oof" / "oof_logits.npy"
    if not oof.is_file() and run.cfg.data.split == "ratio":
        raise UserError(f"--split oof: {run.path} has a ratio split: one model, no out-of-fold logits; use --split val "
                        "or --split test")
    if not oof.is_file():
        raise UserError(f"--split oof: {run.path} has no out-of-fold logits (train with data.valid_fold=all); "
                        "use --split val")
    items = run.splits()
    return np.load(oof), np.load(run.path / "oof" / "oof_targets.npy"), items


def _log_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities averaged over models or views, as logits (their softmax gives them back)."""
    return np.log(np.clip(probs, 1e-12, 1.0))


def val_outputs(run: LoadedRun, folds: list[int], tta: bool = False
                ) -> tuple[np.ndarray, np.ndarray, pd.DataFrame, dict[str, Any]]:
    """Each fold's best model on its own validation part (no ensembling: these are held-out scores), each row at
    the temperature fitted without it (``held_out_temperatures``); ``tta``: the log of the mean probability over
    the plain image and the ``eval.tta`` views. Also the metrics.json ``calibration`` entry."""
    items = run.splits()
    device = dev.pick_device(run.cfg.train.device)
    views = run.cfg.eval.tta if tta else []
    parts, logits, infos = [], [], []
    for fold in folds:
        part = items[items["fold"] == fold]
        model, pre = load_fold_model(run, fold, device)
        out = infer_logits(run, model, part["path"].tolist(), pre, device, views, desc=f"fold {fold}")
        t_rows, info = held_out_temperatures(run, part["fold"].to_numpy(dtype=np.int64), "val")
        out = out if t_rows is None else out / t_rows[None]
        logits.append(_log_probs(ensemble_probs([out])) if tta else out[0])
        parts.append(part)
        infos.append(info)
    table = pd.concat(parts, ignore_index=True)
    calibration = infos[0]
    if "temperatures" in calibration:
        calibration["temperatures"] = {k: v for i in infos for k, v in i["temperatures"].items()}
    return np.concatenate(logits), _targets(run, table["label"], "splits.csv"), table, calibration


def ratio_test_items(run: LoadedRun) -> pd.DataFrame | None:
    """A ratio-split run's test items (splits.csv rows with split == test), unless ``data.test_csv`` was given
    for this evaluation; None for other runs."""
    if run.cfg.data.split != "ratio" or "data.test_csv" in run.overrides:
        return None
    items = run.splits()
    if "split" not in items.columns or not (items["split"] == "test").any():
        raise UserError(f"--split test: the ratio split of {run.path} has no test images (data.test_ratio=0 or the "
                        "data's split column has no test rows); give data.test_csv=CSV")
    return items[items["split"] == "test"].reset_index(drop=True)


def test_outputs(run: LoadedRun, folds: list[int], tta: bool = False) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The fold ensemble (with ``tta``: and the ``eval.tta`` views) on the run's test split (data.split: ratio) or
    ``data.test_csv``, at ``LoadedRun.temperature_for(folds)``; log of the mean probabilities serve as logits."""
    table = ratio_test_items(run)
    if table is not None:
        require_readable(table["path"].tolist(), "splits.csv (test)")
        probs = predict_probs(run, table["path"].tolist(), folds, tta)  # temperature applied inside
        return _log_probs(probs), _targets(run, table["label"], "splits.csv"), table
    d = run.cfg.data
    csv = require_file(d.test_csv, "data.test_csv")
    folder = require_dir(d.image_dir_test, "data.image_dir_test")
    df = read_csv(csv, "data.test_csv", [(d.id_col, "data.id_col"), (d.target_col, "data.target_col")])
    index = ImageIndex(folder, d.image_ext)
    paths = [index.find(i) for i in df[d.id_col]]
    missing = [i for i, p in zip(df[d.id_col], paths) if p is None]
    if missing:
        raise UserError(f"data.test_csv: no image for ID '{missing[0]}' in {folder} ({len(missing)} missing)")
    table = pd.DataFrame({"id": df[d.id_col], "path": [str(p) for p in paths], "label": df[d.target_col]})
    if "domain" in df.columns:
        table["domain"] = df["domain"]
    targets = _targets(run, table["label"], "data.test_csv")
    require_readable(table["path"].tolist(), "data.test_csv")
    probs = predict_probs(run, table["path"].tolist(), folds, tta)  # temperature applied inside
    return _log_probs(probs), targets, table


def failure_table(report: dict[str, Any], threshold: float) -> pd.DataFrame:
    """Classes with F1 under ``threshold``, worst first, each with its real confusion partners: the class its
    images are most often predicted as (``most_confused_with``) and the class most often predicted as it
    (``most_confused_from``); empty, with a count of 0, when there is no such error."""
    cm = np.asarray(report["confusion_matrix"])
    off = cm - np.diag(np.diag(cm))  # errors only: off[i, j] = images of class i predicted as j

    def partner(counts: np.ndarray) -> tuple[str, int]:
        j = int(counts.argmax())
        return (str(report["per_class"][j]["class"]), int(counts[j])) if counts[j] > 0 else ("", 0)

    rows = []
    for i, c in enumerate(report["per_class"]):
        if c["support"] > 0 and c["f1"] < threshold:
            (to, n_to), (src, n_from) = partner(off[i]), partner(off[:, i])
            rows.append({"class": c["class"], "f1": c["f1"], "recall": c["recall"], "precision": c["precision"],
                         "support": c["support"], "most_confused_with": to, "confused_count": n_to,
                         "most_confused_from": src, "confused_from_count": n_from})
    cols = ["class", "f1", "recall", "precision", "support", "most_confused_with", "confused_count",
            "most_confused_from", "confused_from_count"]
    return pd.DataFrame(rows, columns=cols).sort_values("f1", kind="stable").reset_index(drop=True)


def _scalars(report: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in report.items() if k not in ("per_class", "confusion_matrix")}


def per_class_table(report: dict[str, Any], by_domain: dict[str, dict[str, Any]],
                    display: Sequence[str | None] = ()) -> pd.DataFrame:
    """per_class.csv: the overall per-class metrics, the display name when class_map.json gives any, then
    ``recall@<d>`` (the class's accuracy on that domain's images), ``f1@<d>`` and ``support@<d>`` per domain.

    A class without images (overall, or in a domain) has no recall, accuracy or F1 there: those cells are NaN
    (empty in the CSV), not the 0 that scikit-learn's ``zero_division`` puts in; no images is not zero recall."""
    table = pd.DataFrame(report["per_class"])
    _undefined_without_support(table, ("recall", "accuracy", "f1"), "support")
    if any(display):
        table.insert(2, "display_name", [name or "" for name in display])
    for dom, rep in by_domain.items():
        for key in ("recall", "f1", "support"):
            table[f"{key}@{dom}"] = [c[key] for c in rep["per_class"]]
        _undefined_without_support(table, (f"recall@{dom}", f"f1@{dom}"), f"support@{dom}")
    return table


def _undefined_without_support(table: pd.DataFrame, columns: Sequence[str], support: str) -> None:
    absent = table[support] == 0
    for column in columns:
        table[column] = table[column].astype(float).mask(absent)


def predictions_table(logits: np.ndarray, targets: np.ndarray, table: pd.DataFrame, classes: list) -> pd.DataFrame:
    """predictions.csv: one row per evaluated image in evaluation order: id, path, domain (when the data has
    one), true and predicted class, the predicted class's probability and every class's (``prob_<class>``)."""
    probs = torch.softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    pred = logits.argmax(axis=1)
    out = pd.DataFrame({"id": table["id"].to_numpy(), "path": table["path"].to_numpy()})
    if "domain" in table.columns:
        out["domain"] = table["domain"].fillna("").astype(str).to_numpy()
    out["true"] = [classes[t] for t in targets]
    out["pred"] = [classes[p] for p in pred]
    out["p_pred"] = probs[np.arange(len(pred)), pred]
    prob_cols = pd.DataFrame(probs, columns=[f"prob_{c}" for c in classes])
    return pd.concat([out, prob_cols], axis=1)


def _top_losses(logits: np.ndarray, targets: np.ndarray, table: pd.DataFrame, classes: list, n: int) -> pd.DataFrame:
    logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=1).numpy()
    loss = -logp[np.arange(len(targets)), targets]
    order = np.argsort(-loss, kind="stable")[:n]
    pred = logits.argmax(axis=1)
    return pd.DataFrame({
        "id": table["id"].to_numpy()[order], "path": table["path"].to_numpy()[order],
        "true": [classes[targets[i]] for i in order], "pred": [classes[pred[i]] for i in order],
        "p_true": np.exp(-loss[order]), "loss": loss[order],
    })


def _tta(run: LoadedRun, split: str, flag: bool) -> bool:
    """Whether this evaluation averages the ``eval.tta`` views (``predict``'s rule), with its warnings."""
    if flag and run.cfg.task == "embedding":
        raise UserError("--tta: an embedding run averages each embedding with its mirror image's with "
                        "eval.flip_feats=true")
    if not (tta_wanted(run, flag) and run.cfg.eval.tta):  # eval.tta=false: the plain image only
        return False
    if split == "oof":
        raise UserError("eval.tta: --split oof scores the out-of-fold logits stored by training (no image is run "
                        "again); use --split val for the same held-out images with TTA")
    warn_untrained_views(run.cfg, run.cfg.eval.tta, "evaluate (eval.tta)")
    return True


def run_evaluate(run_dir: Path, split: str = "val", folds: str | None = None, overrides: Sequence[str] = (),
                 echo: bool = True, tta: bool = False, strict: bool = False) -> dict[str, Any]:
    """``overrides``: ``key=value`` evaluation options (``data.test_csv``, ``eval.*`` ...) for this evaluation
    only; their effective values are recorded in metrics.json. ``echo``: print the console table. ``tta``
    (``--tta``; also when ``eval.tta`` is among the overrides): average the plain image and the ``eval.tta``
    views, as ``predict --tta`` does; metrics.json records the views under ``tta``. ``strict``: a fallback (a
    checkpoint's preprocessing assumed; metrics.json's ``fallbacks``) is an error."""
    if split not in SPLITS:
        raise UserError(f"--split: unknown split '{split}'; valid: {', '.join(SPLITS)}")
    run = load_run(run_dir, overrides, "evaluate", strict)
    tta = _tta(run, split, tta)
    if run.cfg.task == "embedding":
        from vistrain.engine.embedding_eval import evaluate_embedding

        metrics = evaluate_embedding(run, split)
    else:
        metrics = _evaluate_classifier(run, split, folds, tta, echo)
    from vistrain.viz.model_card import refresh_model_card

    refresh_model_card(run.path)  # the card's results: this split's figures with their intervals
    return metrics


def _evaluate_classifier(run: LoadedRun, split: str, folds: str | None, tta: bool, echo: bool) -> dict[str, Any]:
    """A classifier's outputs on ``split`` -> RUN/eval/<split>/ (metrics.json, per_class.csv, predictions.csv,
    confusion matrix, failures, top losses)."""
    chosen = select_folds(run, folds)
    if split == "oof":
        logits, targets, table = oof_outputs(run)
        t_rows, calibration = held_out_temperatures(run, table["fold"].to_numpy(dtype=np.int64), "oof")
        logits = logits if t_rows is None else logits / t_rows
    elif split == "val":
        logits, targets, table, calibration = val_outputs(run, chosen, tta)
    else:
        logits, targets, table = test_outputs(run, chosen, tta)
        calibration = ensemble_calibration(run, chosen, "test")
    names = [str(c) for c in run.classes]
    report = classification_report(logits, targets, names)
    domains = table["domain"].fillna("").astype(str).to_numpy() if "domain" in table.columns else None
    by_domain = {dom: classification_report(logits[domains == dom], targets[domains == dom], names, "present")
                 for dom in sorted(set(domains) - {""})} if domains is not None else {}
    metrics = _scalars(report)
    if domains is not None:
        metrics.update(per_domain_metrics(logits, targets, domains))  # top1@<d> ...: the training row's keys
    metrics.update(split=split, folds=chosen if split != "oof" else run.folds, calibration=calibration,
                   tta=list(run.cfg.eval.tta) if tta else [], overrides=run.overrides, fallbacks=run.fallbacks.entries)
    if domains is not None:
        metrics["per_domain"] = {dom: _scalars(r) for dom, r in by_domain.items()}
    add_intervals(metrics, logits, targets, domains, run.cfg.eval.bootstrap, run.cfg.project.seed)
    out = run.path / "eval" / split
    write_json(out / "metrics.json", metrics)
    write_csv(out / "per_class.csv", per_class_table(report, by_domain, run.display_names()))
    write_csv(out / "predictions.csv", predictions_table(logits, targets, table, run.classes))
    cm = np.asarray(report["confusion_matrix"])
    write_csv(out / "confusion_matrix.csv", pd.DataFrame(cm, index=names, columns=names).reset_index(names="true"))
    write_csv(out / "failures.csv", failure_table(report, run.cfg.eval.failure_threshold))
    write_csv(out / "top_losses.csv", _top_losses(logits, targets, table, run.classes, run.cfg.eval.top_losses))
    from vistrain.viz.plots import confusion_matrix_png

    confusion_matrix_png(cm, names, out / "confusion_matrix.png", normalize=True, title=f"{split} (row-normalised)")
    if echo:
        _print_table(metrics, report, out)
    return metrics


def add_intervals(metrics: dict[str, Any], logits: np.ndarray, targets: np.ndarray, domains: np.ndarray | None,
                  replicates: int, seed: int) -> None:
    """95% percentile-bootstrap intervals beside the figures, leaving every figure as it is: ``intervals``
    ({figure: [lo, hi]} for the overall figures and ``<metric>@<d>``), each ``per_domain`` block's own
    ``intervals``, and ``bootstrap`` (how they were made). Images are resampled ``replicates`` times (0: no
    intervals) from a generator seeded by the run's ``seed``; a domain's figures resample that domain's images
    (its own seeded draw), so each domain's interval reflects its own size."""
    if replicates == 0:
        return
    intervals = classification_intervals(logits, targets, bootstrap_indices(len(targets), replicates, seed),
                                         ece_bins=ECE_BINS)
    for k, (dom, block) in enumerate(metrics.get("per_domain", {}).items(), start=1):
        rows = domains == dom
        block["intervals"] = classification_intervals(
            logits[rows], targets[rows], bootstrap_indices(int(rows.sum()), replicates, [seed, k]),
            macro_f1_classes="present", ece_bins=ECE_BINS)
        intervals.update({f"{key}@{dom}": block["intervals"][key] for key in DOMAIN_METRICS
                          if f"{key}@{dom}" in metrics})
    metrics["intervals"] = intervals
    metrics["bootstrap"] = {"replicates": replicates, "seed": seed, "level": LEVEL, "method": "percentile",
                            "unit": "image"}


def _print_table(metrics: dict[str, Any], report: dict[str, Any], out: Path) -> None:
    keys = ["n", "top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece"]
    intervals = metrics.get("intervals", {})
    print(f"{'metric':<18} value" + (" [95% interval]" if intervals else ""))
    for k in keys:
        v = metrics.get(k)
        print(f"{k:<18} {format_interval(v, intervals.get(k))}" if isinstance(v, float) else f"{k:<18} {v}")
    if metrics.get("per_domain"):
        width = {k: max(24 if intervals else 10, len(k)) for k in DOMAIN_KEYS}
        print(f"\n{'domain':<18} {'n':>6} " + " ".join(f"{k:>{width[k]}}" for k in DOMAIN_KEYS))
        for dom, m in metrics["per_domain"].items():
            cells = (format_interval(m[k], m.get("intervals", {}).get(k)) for k in DOMAIN_KEYS)
            print(f"{dom:<18} {m['n']:>6} " + " ".join(f"{c:>{width[k]}}" for k, c in zip(DOMAIN_KEYS, cells)))
        print()
    if metrics["overrides"]:
        print("overrides: " + " ".join(f"{k}={v}" for k, v in metrics["overrides"].items()))
    worst = sorted(report["per_class"], key=lambda c: c["f1"])[:5]
    print("weakest classes: " + ", ".join(f"{c['class']} (F1 {c['f1']:.3f})" for c in worst))
    print(f"[DONE] evaluation written to {out}")
