"""``vistrain audit (--config F | RUN) [--output DIR] [--write-clean F --policy drop|relabel|review]``: what is
wrong with the data — label issues, exact / near duplicates (leakage across splits, groups sharing images),
outliers and broken images, class health — into ``audit/`` (``RUN/audit`` for a run).

With a RUN the label issues come from its held-out probabilities (every fold's out-of-fold logits, or a ratio
split's val / test predictions) and the embeddings from its trained model; with ``--config`` the data is read as
``train`` would and the embeddings come from the configured backbone (no label issues: nothing is trained yet).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.audit import duplicates as dup
from vistrain.audit.clean import check_policy, write_clean
from vistrain.audit.features import centred, config_features, run_features
from vistrain.audit.health import class_health
from vistrain.audit.labels import confused_pairs, label_issues
from vistrain.audit.outliers import COLUMNS as OUTLIER_COLUMNS
from vistrain.audit.outliers import bad_image_rows, embedding_outliers, file_outliers
from vistrain.audit.page import write_page
from vistrain.audit.scan import HASH_BITS, scan_images
from vistrain.config.loader import load_config
from vistrain.config.schema import Config
from vistrain.data.preprocess import size_hw
from vistrain.engine import device as dev
from vistrain.engine.inference import LoadedRun, load_run
from vistrain.errors import UserError
from vistrain.tracking.files import write_csv, write_json

log = logging.getLogger(__name__)


@dataclass
class AuditData:
    """What the findings are computed from."""

    cfg: Config
    items: pd.DataFrame  # readable items: path, id, label, group[, domain], split_name
    bad: pd.DataFrame  # unreadable items of the data pass (id, path, reason[, label])
    classes: list
    run: LoadedRun | None = None
    probs: np.ndarray | None = None  # [M, C] held-out probabilities of the rows ``prob_rows``
    prob_rows: np.ndarray | None = None  # [M] item indices
    prob_source: str = ""


def run_audit(run_dir: Path | None = None, config: Path | None = None, output: Path | None = None,
              clean: Path | None = None, policy: str | None = None, overrides: Sequence[str] = ()
              ) -> dict[str, Any]:
    """Audit a run or a config's data; returns audit.json's content."""
    if (run_dir is None) == (config is None):
        raise UserError("audit: give a run directory (RUN) or --config F, not both" if run_dir else
                        "audit: give a run directory (RUN) or --config F")
    if policy is not None and clean is None:
        raise UserError("--policy: only with --write-clean F (the manifest the policy writes)")
    check_policy(policy or "drop")
    _require_extra()
    data = _from_run(Path(run_dir), overrides) if run_dir is not None else _from_config(Path(config), overrides)
    out = Path(output) if output is not None else (data.run.path / "audit" if data.run else Path("audit"))
    a = data.cfg.audit
    log.info("[AUDIT] %d images, %d classes, %d unreadable | %s", len(data.items), len(data.classes),
             len(data.bad), data.prob_source or _no_probs(data))
    scan = scan_images(data.items["path"].tolist(), workers=max(2, dev.usable_cores()))
    eligible = (scan["error"] == "").to_numpy() & (scan["std"].fillna(0).to_numpy() >= a.constant_std)
    feats, feat_source = _features(data) if a.embeddings else (None, "none (audit.embeddings: false)")
    budget = data.cfg.eval.memory_budget_mb
    pairs = dup.merge_pairs(
        dup.exact_pairs(scan["digest"], eligible),
        dup.near_pairs(scan["phash"].to_numpy(), eligible, int(a.hash_threshold * HASH_BITS), feats,
                       a.near_dup_threshold))
    # groups mean something when the data names them (a group column, {ID}_{seq} files, person IDs)
    meaningful = bool((data.items["group"].astype(str) != data.items["id"].astype(str)).any())
    dups = dup.duplicate_table(data.items, pairs, meaningful)
    outliers = pd.concat([t for t in (
        bad_image_rows(data.bad),
        file_outliers(data.items, scan, size_hw(data.cfg.train.img_size), a.min_size_fraction, a.max_aspect_ratio,
                      a.constant_std),
        embedding_outliers(data.items, feats, eligible, a.knn_k, a.outlier_percentile, budget)
        if feats is not None else None) if t is not None and len(t)] or [pd.DataFrame(columns=OUTLIER_COLUMNS)],
        ignore_index=True)
    issues, confused = _label_findings(data)
    summary = _summary(data, out, dups, outliers, issues, meaningful, feat_source)
    if clean is not None:
        summary["clean"] = write_clean(Path(clean), data.items, policy or "drop", issues, dups, outliers,
                                       keep_split=_manifest_split(data), keep_group=meaningful)
    write_csv(out / "label_issues.csv", issues)
    write_csv(out / "duplicates.csv", dups)
    write_csv(out / "outliers.csv", outliers)
    write_json(out / "audit.json", summary)
    write_page(out / "audit.html", summary, issues, dups, outliers, data.items, confused, a.thumbnails)
    if data.run is not None and (data.run.path / "report.html").is_file():
        from vistrain.viz.report import write_report

        write_report(data.run.path)  # the run's page links the audit now
    _log_summary(summary, out)
    return summary


def _require_extra() -> None:
    import importlib.util

    missing = [m for m in ("cleanlab", "imagehash") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"audit: needs {', '.join(missing)}; install the audit extra: pip install 'vistrain[audit]' "
                        "(make install does)")


# ------------------------------------------------------------------------------------------ reading
def _split_is_data(cfg: Config, items: pd.DataFrame) -> bool:
    """Whether the items' ``split`` column is the split (ratio splits, embedding data) rather than folds."""
    return "split" in items.columns and (cfg.task == "embedding" or cfg.data.split == "ratio")


def _manifest_split(data: AuditData) -> bool:
    """Whether the clean manifest keeps a split column: the data's own train / val / test split (a manifest
    cannot hold re-id query / gallery splits, nor K folds)."""
    from vistrain.data.sources import SPLIT_VALUES

    return _split_is_data(data.cfg, data.items) and set(data.items["split"].astype(str)) <= set(SPLIT_VALUES)


def _with_split_names(cfg: Config, items: pd.DataFrame) -> pd.DataFrame:
    items = items.reset_index(drop=True)
    if _split_is_data(cfg, items):
        items["split_name"] = items["split"].astype(str)
    else:
        items["split_name"] = [f"fold{int(k)}" for k in items["fold"]]
    return items


def _from_config(path: Path, overrides: Sequence[str]) -> AuditData:
    from vistrain.data.prepare import prepare_data
    from vistrain.data.splits import splits_table

    cfg = load_config(path, overrides=list(overrides))
    dev.set_num_threads(dev.env_threads() or dev.usable_cores())
    # What would stop train is what the audit reports: unreadable images and classes under
    # data.min_images_per_class are findings here, not errors.
    lenient = cfg.model_copy(update={"data": cfg.data.model_copy(update={"on_bad_image": "skip",
                                                                         "min_images_per_class": None})})
    data = prepare_data(lenient)
    items = _with_split_names(cfg, splits_table(data.items, data.fold_of))
    return AuditData(cfg, items, data.bad, data.classes)


def _from_run(run_dir: Path, overrides: Sequence[str]) -> AuditData:
    wrong = [o for o in overrides if not o.split("=", 1)[0].startswith("audit.")]
    if wrong:
        raise UserError(f"audit RUN: only audit.* keys can be overridden for a run; got '{wrong[0]}'")
    run = load_run(run_dir, command="audit")
    run.cfg = load_config(run.path / "config.yaml", overrides=list(overrides), run_file=True)
    items = _with_split_names(run.cfg, run.splits())
    bad_file = run.path / "bad_images.csv"
    bad = pd.read_csv(bad_file, dtype=str, keep_default_na=False) if bad_file.is_file() else \
        pd.DataFrame(columns=["id", "path", "reason"])
    data = AuditData(run.cfg, items, bad, run.classes, run)
    if run.cfg.task == "classification":
        data.probs, data.prob_rows, data.prob_source = _held_out_probs(run, items)
    return data


def _no_probs(data: AuditData) -> str:
    """Why there are no label issues."""
    if data.run is not None:
        return "no label issues: an embedding run has no class probabilities"
    return "no label issues: they need held-out predictions of a trained run (vistrain audit RUN)"


def _held_out_probs(run: LoadedRun, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str]:
    """Probabilities no model saw the label of: the out-of-fold logits (all folds), or a ratio split's
    validation logits and its test split's predictions; softmax at the calibration temperature when fitted."""
    import torch

    from vistrain.pipelines.predict import predict_probs

    t = run.temperature or 1.0
    oof = run.path / "oof" / "oof_logits.npy"
    if oof.is_file():
        logits = torch.from_numpy(np.load(oof).astype(np.float64))
        return torch.softmax(logits / t, -1).numpy(), np.arange(len(items)), f"out-of-fold logits ({oof.name})"
    val = run.path / "oof" / "fold0_valid_logits.npy"
    if run.cfg.data.split == "ratio" and val.is_file():
        rows = np.flatnonzero(items["split_name"].to_numpy() == "val")
        probs = torch.softmax(torch.from_numpy(np.load(val).astype(np.float64)) / t, -1).numpy()
        test = np.flatnonzero(items["split_name"].to_numpy() == "test")
        if len(test):
            probs = np.concatenate([probs, predict_probs(run, items["path"].iloc[test].tolist(), run.folds, False)])
            rows = np.concatenate([rows, test])
        return probs, rows, "ratio split: validation logits" + (" and test predictions" if len(test) else "")
    folds = ", ".join(map(str, run.folds))
    raise UserError(f"RUN: {run.path} has no out-of-fold predictions (oof/oof_logits.npy; trained fold(s): {folds} "
                    f"of data.folds={run.cfg.data.folds}); make them by training every fold: vistrain train --config "
                    f"{run.path / 'config.yaml'} data.valid_fold=all")


def _features(data: AuditData) -> tuple[np.ndarray, str]:
    paths = data.items["path"].tolist()
    if data.run is not None:
        feats, source = run_features(data.run, paths)
    else:
        feats, source = config_features(data.cfg, paths, len(data.classes))
    return centred(feats), source


# ------------------------------------------------------------------------------------------ findings
def _label_findings(data: AuditData) -> tuple[pd.DataFrame, list[dict]]:
    if data.probs is None:
        return label_issues(np.zeros((0, 2)), np.zeros(0, dtype=int), data.items.iloc[:0], data.classes), []
    index = {str(c): i for i, c in enumerate(data.classes)}
    rows = data.items.iloc[data.prob_rows].reset_index(drop=True)
    targets = rows["label"].astype(str).map(index).to_numpy(dtype=np.int64)
    issues = label_issues(data.probs, targets, rows, data.classes)
    confused = confused_pairs(data.probs, targets, data.classes)
    for pair in confused:  # example indices into the whole item table, for the page's thumbnails
        pair["examples"] = [int(data.prob_rows[i]) for i in pair["examples"]]
    return issues, confused


def _summary(data: AuditData, out: Path, dups: pd.DataFrame, outliers: pd.DataFrame, issues: pd.DataFrame,
             meaningful: bool, feat_source: str) -> dict[str, Any]:
    a = data.cfg.audit
    by_relation = dups["relation"].value_counts()
    return {
        "name": data.cfg.project.name,
        "source": str(data.run.path) if data.run else "config (before training)",
        "output": str(out),
        "num_images": len(data.items) + len(data.bad),
        "label_issues": {"count": len(issues), "checked": 0 if data.probs is None else len(data.probs),
                         "source": data.prob_source or "none"},
        "duplicates": {
            "total": len(dups), "exact": int((dups["kind"] == "exact").sum()),
            "near": int((dups["kind"] == "near").sum()), "conflicts": int(dups["conflict"].sum()),
            "cross_split": int(by_relation.get("cross_split", 0)),
            "cross_group": int(by_relation.get("cross_group", 0)),
            "within_split": int(by_relation.get("within_split", 0)),
            **_shared(dup.shared_groups(dups) if meaningful else []),
        },
        "outliers": {"total": len(outliers), **{str(k): int(v) for k, v in outliers["reason"].value_counts().items()}},
        "class_health": class_health(data.items, data.classes, data.cfg.data.min_images_per_class),
        "sources": {"probabilities": data.prob_source or "none", "embeddings": feat_source,
                    "note": "" if data.probs is not None else _no_probs(data)},
        "thresholds": a.model_dump(),
    }


def _shared(groups: list[list[str]], listed: int = 50) -> dict[str, Any]:
    """The group pairs holding one image (the split is less leak-free than the group column claims): the count
    and the first ``listed`` (duplicates.csv has every pair)."""
    return {"groups_sharing_images_count": len(groups), "groups_sharing_images": groups[:listed]}


def _log_summary(s: dict[str, Any], out: Path) -> None:
    d = s["duplicates"]
    log.info("[AUDIT] leakage: %d duplicate pair(s) across splits | duplicates %d (exact %d, near %d, conflicts %d, "
             "cross-group %d) | label issues %d | outliers %d", d["cross_split"], d["total"], d["exact"], d["near"],
             d["conflicts"], d["cross_group"], s["label_issues"]["count"], s["outliers"]["total"])
    if "clean" in s:
        c = s["clean"]
        log.info("[AUDIT] %s (--policy %s): %d of %d row(s) changed", c["output"], c["policy"], c["rows_changed"],
                 c["rows_in"])
    log.info("[AUDIT] written to %s (audit.json, label_issues.csv, duplicates.csv, outliers.csv, audit.html)", out)
