"""``vistrain compare RUN_A RUN_B [RUN_C ...] [--split test|oof]``: is run B really better than run A?

Reads each run's scores on the same images (``test``: ``eval/test/predictions.csv`` written by ``evaluate --split
test``; ``oof``: the untempered out-of-fold logits in ``RUN/oof/`` with splits.csv's folds), refuses runs whose
scored images or labels differ, and writes ``compare.json``, ``compare.html`` and ``curves.png`` into ``--output``:
every figure per run with its 95% bootstrap interval, each run's paired difference to the first run (the same
resampled images for both: :mod:`vistrain.metrics.paired`) with a p-value, McNemar's exact test for top-1, the
fold-by-fold differences of K-fold OOF scores, the config keys that differ and the validation curves overlaid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from vistrain.errors import UserError
from vistrain.metrics.bootstrap import (
    LEVEL,
    bootstrap_indices,
    classification_replicates,
    format_interval,
    percentile_interval,
)
from vistrain.metrics.classification import ECE_BINS, classification_report
from vistrain.metrics.paired import mcnemar_exact, paired_figures
from vistrain.tracking.files import write_json

SPLITS = ("test", "oof")
METRICS = ("top1", "top5", "macro_f1", "weighted_f1", "balanced_accuracy", "nll", "ece")
FOLD_METRICS = ("top1", "macro_f1", "nll")  # the fold-by-fold table's figures
DEFAULT_REPLICATES = 1000


@dataclass
class Scored:
    """One run's scores on the compared split: rows in the first run's image order once aligned."""

    run: Path
    ids: np.ndarray  # str [N]
    logits: np.ndarray  # [N, C]
    labels: np.ndarray  # str [N]: the true class names
    classes: list[str]
    folds: np.ndarray | None  # int [N], OOF only
    source: str


def _require_run(run: Path) -> Path:
    run = Path(run).resolve()
    if not (run / "config.yaml").is_file():
        raise UserError(f"RUN: {run} is not a vistrain run directory (no config.yaml)")
    task = (yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}).get("task", "classification")
    if task != "classification":
        raise UserError(f"RUN: {run} has task: {task}; compare scores classifiers (task: classification) only")
    return run


def choose_split(runs: Sequence[Path], split: str | None) -> tuple[str, str]:
    """``--split`` or the default (test when every run has ``eval/test/predictions.csv``, else oof), with why."""
    if split is not None:
        if split not in SPLITS:
            raise UserError(f"--split: unknown split '{split}'; valid: {', '.join(SPLITS)}")
        return split, "--split " + split
    missing = [str(r) for r in runs if not (r / "eval" / "test" / "predictions.csv").is_file()]
    if not missing:
        return "test", "test: every run has eval/test/predictions.csv"
    return "oof", f"oof: no eval/test/predictions.csv in {missing[0]} (run vistrain evaluate RUN --split test)"


def read_test(run: Path) -> Scored:
    """``eval/test/predictions.csv``: the fold ensemble's probabilities (their log serves as logits, as evaluate's)."""
    path = run / "eval" / "test" / "predictions.csv"
    if not path.is_file():
        raise UserError(f"--split test: {path} not found; run vistrain evaluate {run} --split test first")
    df = pd.read_csv(path, dtype={"id": str, "true": str, "pred": str}, keep_default_na=False)
    prob_cols = [c for c in df.columns if c.startswith("prob_")]
    probs = df[prob_cols].to_numpy(dtype=np.float64)
    return Scored(run, df["id"].to_numpy(dtype=str), np.log(np.clip(probs, 1e-12, 1.0)),
                  df["true"].to_numpy(dtype=str), [c[len("prob_"):] for c in prob_cols], None, str(path))


def read_oof(run: Path) -> Scored:
    """``oof/oof_logits.npy`` (untempered: each image scored by the fold model that did not train on it), its
    targets and splits.csv's ids and folds (same rows, same order)."""
    logits_path = run / "oof" / "oof_logits.npy"
    if not logits_path.is_file():
        raise UserError(f"--split oof: {logits_path} not found (train with data.valid_fold=all, or evaluate "
                        f"--split test and compare --split test)")
    logits, targets = np.load(logits_path), np.load(run / "oof" / "oof_targets.npy")
    items = pd.read_csv(run / "splits.csv", dtype={"id": str, "label": str}, keep_default_na=False)
    classes = _class_names(run, items, targets)
    return Scored(run, items["id"].to_numpy(dtype=str), logits.astype(np.float64),
                  np.array([classes[t] for t in targets], dtype=str), classes,
                  items["fold"].to_numpy(dtype=np.int64), str(logits_path))


def _class_names(run: Path, items: pd.DataFrame, targets: np.ndarray) -> list[str]:
    from vistrain.viz.plots import class_names

    names = class_names(run)
    if names:
        return names
    by_index = dict(zip(targets.tolist(), items["label"].tolist()))  # class_map.json missing: splits.csv's labels
    return [str(by_index.get(i, i)) for i in range(int(targets.max()) + 1)]


def align(scored: list[Scored]) -> list[Scored]:
    """Every run's rows in the first run's image order; refuses runs scored on other images, with other labels or
    other classes (a paired comparison needs the same items)."""
    first = scored[0]
    if len(set(first.ids)) != len(first.ids):
        raise UserError(f"RUN: {first.run} scores some image ID more than once; cannot pair images by ID")
    out = [first]
    for s in scored[1:]:
        differ = len(set(first.ids) ^ set(s.ids))
        if differ or len(s.ids) != len(first.ids):
            raise UserError(f"RUN: {s.run} and {first.run} were scored on different images ({differ} image IDs in "
                            f"only one of them; {len(first.ids)} vs {len(s.ids)}); compare needs the same items")
        if s.classes != first.classes:
            raise UserError(f"RUN: {s.run} has classes {s.classes[:5]}, {first.run} {first.classes[:5]}; "
                            "compare needs the same classes in the same order")
        order = pd.Series(np.arange(len(s.ids)), index=s.ids)[first.ids].to_numpy()
        s = Scored(s.run, s.ids[order], s.logits[order], s.labels[order], s.classes,
                   None if s.folds is None else s.folds[order], s.source)
        relabelled = int(np.sum(s.labels != first.labels))
        if relabelled:
            raise UserError(f"RUN: {s.run} and {first.run} label {relabelled} image(s) differently; compare needs "
                            "the same items")
        out.append(s)
    return out


def run_figures(s: Scored, targets: np.ndarray, idx: np.ndarray) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The run's figures with intervals, and its bootstrap replicates (paired through the shared ``idx``)."""
    report = classification_report(s.logits, targets, s.classes)
    reps = classification_replicates(s.logits, targets, idx, ece_bins=ECE_BINS)
    figures = {k: {"value": report[k], "interval": percentile_interval(reps[k])} for k in METRICS}
    return {"run": str(s.run), "source": s.source, "n": report["n"], "metrics": figures}, reps


def differences(a: Scored, b: Scored, targets: np.ndarray, reps_a: dict[str, np.ndarray],
                reps_b: dict[str, np.ndarray], fig_a: dict[str, Any], fig_b: dict[str, Any]) -> dict[str, Any]:
    """``B - A`` per figure (value, paired-bootstrap interval, p-value, B better / worse / inconclusive by the figure's
    direction) and McNemar's test on top-1."""
    out = paired_figures({k: fig_a["metrics"][k]["value"] for k in METRICS},
                         {k: fig_b["metrics"][k]["value"] for k in METRICS}, reps_a, reps_b)
    correct_a, correct_b = a.logits.argmax(1) == targets, b.logits.argmax(1) == targets
    return {"run": str(b.run), "versus": str(a.run), "metrics": out,
            "mcnemar_top1": mcnemar_exact(correct_a, correct_b)}


def fold_differences(a: Scored, b: Scored, targets: np.ndarray) -> dict[str, Any] | None:
    """Per fold of the first run's K-fold OOF split: both runs' figures on that fold's images and ``B - A``, plus
    the mean and standard deviation (ddof 1) of the differences over folds; None when the runs' folds differ."""
    if a.folds is None or b.folds is None or len(np.unique(a.folds)) < 2:
        return None
    if not np.array_equal(a.folds, b.folds):
        return {"note": "the runs assign images to different folds: no fold-by-fold pairing"}
    rows = []
    for fold in np.unique(a.folds).tolist():
        m = a.folds == fold
        ra, rb = (classification_report(s.logits[m], targets[m], s.classes) for s in (a, b))
        rows.append({"fold": fold, "n": int(m.sum()), **{f"{k}_diff": rb[k] - ra[k] for k in FOLD_METRICS},
                     "mcnemar_top1_p": mcnemar_exact(a.logits[m].argmax(1) == targets[m],
                                                     b.logits[m].argmax(1) == targets[m])["p_value"]})
    summary = {k: {"mean": float(np.mean([r[f"{k}_diff"] for r in rows])),
                   "std": float(np.std([r[f"{k}_diff"] for r in rows], ddof=1))} for k in FOLD_METRICS}
    return {"folds": rows, "over_folds": summary}


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def config_differences(runs: Sequence[Path]) -> dict[str, list[Any]]:
    """The flattened config.yaml keys whose values are not the same in every run: ``{key: [value per run]}``
    (None where a run's config lacks the key)."""
    flat = [flatten(yaml.safe_load((r / "config.yaml").read_text(encoding="utf-8")) or {}) for r in runs]
    keys = sorted(set().union(*flat))
    return {k: [f.get(k) for f in flat] for k in keys if any(f.get(k) != flat[0].get(k) for f in flat[1:])}


def _bootstrap_settings(run: Path) -> tuple[int, int]:
    """Replicates and seed: the first run's ``eval.bootstrap`` (1000 when it is 0: a comparison needs the
    replicates) and ``project.seed``."""
    cfg = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    replicates = int((cfg.get("eval") or {}).get("bootstrap") or DEFAULT_REPLICATES)
    return replicates, int((cfg.get("project") or {}).get("seed") or 0)


def run_compare(runs: Sequence[Path], split: str | None = None, output: Path | None = None,
                echo: bool = True) -> dict[str, Any]:
    """Compare ``runs`` (2 or more) on the same images; writes ``compare.json``, ``compare.html`` and
    ``curves.png`` into ``output`` (default ``./compare``) and returns compare.json's content."""
    if len(runs) < 2:
        raise UserError(f"RUN: compare needs at least two run directories, got {len(runs)}")
    paths = [_require_run(r) for r in runs]
    split, why = choose_split(paths, split)
    scored = align([read_test(r) if split == "test" else read_oof(r) for r in paths])
    first = scored[0]
    targets = np.array([first.classes.index(c) if c in first.classes else -1 for c in first.labels])
    if (targets < 0).any():
        raise UserError(f"RUN: {first.source} has a true label that is not one of its classes")
    replicates, seed = _bootstrap_settings(paths[0])
    idx = bootstrap_indices(len(targets), replicates, seed)  # one draw: every run scored on the same resamples
    figures, reps = zip(*(run_figures(s, targets, idx) for s in scored))
    result = {
        "split": split, "split_reason": why, "n": len(targets), "runs": list(figures),
        "bootstrap": {"replicates": replicates, "seed": seed, "level": LEVEL, "method": "paired percentile",
                      "unit": "image"},
        "differences": [differences(first, s, targets, reps[0], reps[i], figures[0], figures[i])
                        for i, s in enumerate(scored[1:], start=1)],
        "fold_differences": [fold_differences(first, s, targets) for s in scored[1:]] if split == "oof" else [],
        "config_differences": config_differences(paths),
    }
    out = Path(output) if output is not None else Path("compare")
    write_json(out / "compare.json", result)
    _write_extras(paths, result, out)
    if echo:
        print_table(result)
        print(f"[DONE] comparison written to {out.resolve()}")
    return result


def _write_extras(paths: list[Path], result: dict[str, Any], out: Path) -> None:
    from vistrain.viz.compare_page import curves_png, write_compare_html

    curves = curves_png(paths, out / "curves.png")
    write_compare_html(result, curves, out / "compare.html")


def print_table(result: dict[str, Any]) -> None:
    """Each figure per run (value [95% interval]), then each run's difference to the first with p-values."""
    runs = result["runs"]
    print(f"split: {result['split_reason']}; {result['n']} images; "
          f"{result['bootstrap']['replicates']} paired bootstrap replicates")
    for i, r in enumerate(runs):
        print(f"  [{i}] {r['run']}")
    print(f"{'metric':<18} " + " ".join(f"{'[' + str(i) + ']':<26}" for i in range(len(runs))))
    for k in METRICS:
        cells = (format_interval(r["metrics"][k]["value"], r["metrics"][k]["interval"]) for r in runs)
        print(f"{k:<18} " + " ".join(f"{c:<26}" for c in cells))
    for i, d in enumerate(result["differences"], start=1):
        print(f"\n[{i}] - [0] (paired on the same images)")
        for k in METRICS:
            m = d["metrics"][k]
            print(f"{k:<18} {format_interval(m['value'], m['interval']):<30} p={m['p_value']:.4f}  {m['verdict']}")
        mc = d["mcnemar_top1"]
        print(f"McNemar top1: only [0] right {mc['a_only']}, only [{i}] right {mc['b_only']}, p={mc['p_value']:.4f}")
    for i, folds in enumerate(result["fold_differences"], start=1):
        if folds and "folds" in folds:
            print(f"\n[{i}] - [0] per fold: " + "; ".join(
                f"fold {r['fold']} top1 {r['top1_diff']:+.4f} (McNemar p={r['mcnemar_top1_p']:.3f})"
                for r in folds["folds"]))
            print("  over folds: " + ", ".join(f"{k} {m['mean']:+.4f} ± {m['std']:.4f}"
                                               for k, m in folds["over_folds"].items()))
        elif folds:
            print(f"\n[{i}] - [0] per fold: {folds['note']}")
    if result["config_differences"]:
        print("\nconfig differences:")
        for key, values in result["config_differences"].items():
            print(f"  {key}: " + " | ".join(map(str, values)))
