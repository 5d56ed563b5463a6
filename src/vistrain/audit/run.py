"""``vistrain audit (--config F | RUN) [--output DIR] [--write-clean F --policy drop|relabel|review]``: what is
wrong with the data — label issues, exact / near duplicates (leakage across splits, groups sharing images),
outliers and broken images, class health — into ``audit/`` (``RUN/audit`` for a run).

With a RUN the label issues come from its held-out probabilities (every fold's out-of-fold logits, a ratio
split's val / test predictions, or the validation predictions of the folds it trained) and the embeddings from its
trained model; with ``--config`` the data is read as ``train`` would and the embeddings come from the configured
backbone (no label issues: nothing is trained yet). Every split the config names is audited: the folds or the
ratio split, and the test images of ``data.test_csv`` / ``data.image_dir_test``.
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
from vistrain.audit.clean import CleanPlan, check_policy, plan_clean, refusals
from vistrain.audit.crops import crop_pairs
from vistrain.audit.features import centred, config_features, run_features
from vistrain.audit.health import class_health
from vistrain.audit.labels import confused_pairs, label_issues
from vistrain.audit.outliers import COLUMNS as OUTLIER_COLUMNS
from vistrain.audit.outliers import bad_image_rows, embedding_outliers, file_outliers
from vistrain.audit.page import write_page
from vistrain.audit.scan import scan_images
from vistrain.config.loader import load_config
from vistrain.config.schema import Config
from vistrain.data.images import load_rgb
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
    items: pd.DataFrame  # readable items: path, id, label, group[, domain], split_name, external (test images the
    # training data does not hold: data.test_csv / data.image_dir_test)
    bad: pd.DataFrame  # unreadable items of the data pass (id, path, reason[, label])
    classes: list
    run: LoadedRun | None = None
    probs: np.ndarray | None = None  # [M, C] held-out probabilities of the rows ``prob_rows``
    prob_rows: np.ndarray | None = None  # [M] item indices
    prob_source: str = ""
    prob_scope: str = ""  # which images have held-out probabilities, when not all training images


def run_audit(run_dir: Path | None = None, config: Path | None = None, output: Path | None = None,
              clean: Path | None = None, policy: str | None = None, overrides: Sequence[str] = (),
              force: bool = False) -> dict[str, Any]:
    """Audit a run or a config's data; returns audit.json's content. ``force`` writes a clean manifest that
    drops more than ``audit.max_drop_frac`` or leaves a class under ``data.min_images_per_class``."""
    if (run_dir is None) == (config is None):
        raise UserError("audit: give a run directory (RUN) or --config F, not both" if run_dir else
                        "audit: give a run directory (RUN) or --config F")
    if (policy is not None or force) and clean is None:
        raise UserError(f"{'--policy' if policy is not None else '--force'}: only with --write-clean F (the manifest "
                        "it writes)")
    check_policy(policy or "drop")
    _require_extra()
    data = _from_run(Path(run_dir), overrides) if run_dir is not None else _from_config(Path(config), overrides)
    out = Path(output) if output is not None else (data.run.path / "audit" if data.run else Path("audit"))
    a = data.cfg.audit
    log.info("[AUDIT] %d images (%s), %d classes, %d unreadable | %s", len(data.items), _split_counts_text(data),
             len(data.classes), len(data.bad), data.prob_source or _no_probs(data))
    scan, thumbs = scan_images(data.items["path"].tolist(), workers=max(2, dev.usable_cores()))
    eligible = (scan["error"] == "").to_numpy() & (scan["std"].fillna(0).to_numpy() >= a.constant_std)
    feats, feat_source, votes = _features(data) if a.embeddings else (None, "none (audit.embeddings: false)", False)
    # groups mean something when the data names them (a group column, {ID}_{seq} files, person IDs)
    meaningful = bool((data.items["group"].astype(str) != data.items["id"].astype(str)).any())
    dups, rule = _duplicates(data, scan, thumbs, eligible, feats if votes else None, a.near_dup_z, meaningful)
    del thumbs  # 3 KB per image, no longer needed: the outliers and the page read the files
    outliers = pd.concat([t for t in (
        bad_image_rows(data.bad),
        file_outliers(data.items, scan, size_hw(data.cfg.train.img_size), a.min_size_fraction, a.max_aspect_ratio,
                      a.constant_std),
        embedding_outliers(data.items, feats, eligible & ~data.items["external"].to_numpy(), a.knn_k,
                           a.outlier_percentile) if feats is not None else None)
        if t is not None and len(t)] or [pd.DataFrame(columns=OUTLIER_COLUMNS)], ignore_index=True)
    issues, confused = _label_findings(data)
    summary = _summary(data, out, dups, outliers, issues, meaningful, feat_source, rule)
    plan = None
    if clean is not None:
        plan = plan_clean(data.items, policy or "drop", issues, dups, outliers,
                          keep_split=_manifest_split(data), keep_group=meaningful)
        plan.refused = refusals(plan, a.max_drop_frac, data.cfg.data.min_images_per_class)
        summary["clean"] = plan.summary(Path(clean), force)
        write_csv(out / "clean_changes.csv", plan.changes)
    write_csv(out / "label_issues.csv", issues)
    dup.write_table(out / "duplicates.csv", dups)
    write_csv(out / "outliers.csv", outliers)
    write_json(out / "audit.json", summary)
    write_page(out / "audit.html", summary, issues, dups, outliers, data.items, confused, a.thumbnails)
    if data.run is not None and (data.run.path / "report.html").is_file():
        from vistrain.viz.report import write_report

        write_report(data.run.path)  # the run's page links the audit now
    _log_summary(summary, out)
    if plan is not None:
        _finish_clean(Path(clean), plan, force, out)
    return summary


def _finish_clean(path: Path, plan: CleanPlan, force: bool, out: Path) -> None:
    """Write the clean manifest, or refuse (exit 2) when it drops too much and --force was not given."""
    if plan.refused and not force:
        raise UserError(f"--write-clean {path}: not written: {'; and '.join(plan.refused)}. The audit is in {out} "
                        f"(clean_changes.csv lists the {len(plan.changes)} row(s) it would change, each with its "
                        "reason); review them, raise audit.max_drop_frac, or pass --force to write it anyway")
    write_csv(path, plan.table)
    changed = 0 if plan.policy == "review" else len(plan.changes)
    detail = f"; {int((plan.table['review'] != '').sum())} flagged in its review column" if plan.policy == "review" \
        else f", each with its reason in {out / 'clean_changes.csv'}"
    log.info("[AUDIT] %s (--policy %s): %d of %d row(s) changed%s", path, plan.policy, changed, plan.rows_in, detail)


def _duplicates(data: AuditData, scan: pd.DataFrame, thumbs: np.ndarray, eligible: np.ndarray,
                feats: np.ndarray | None, z_min: float, meaningful: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """duplicates.csv (one row per group member beside its representative) and the rule's figures."""
    ea, eb, unique = dup.exact_links(scan["digest"], eligible)
    nodes = np.flatnonzero(unique)
    near, typical_nodes, rule = dup.near_pairs(thumbs, nodes, z_min)
    paths = data.items["path"].to_numpy()
    cut, rule["crops"] = crop_pairs(thumbs, scan["width"].to_numpy(), scan["height"].to_numpy(), nodes,
                                    lambda i: np.asarray(load_rgb(paths[i]), dtype=np.uint8))
    na, nb = np.concatenate([near["a"].to_numpy(), cut["a"].to_numpy()]).astype(np.int64), \
        np.concatenate([near["b"].to_numpy(), cut["b"].to_numpy()]).astype(np.int64)
    if feats is not None and len(na):
        agree = dup.embedding_agrees(feats, np.flatnonzero(eligible), na, nb)
        rule["vetoed_by_embeddings"] = int((~agree).sum())
        na, nb = na[agree], nb[agree]
    typical = np.full(len(data.items), np.nan)
    typical[nodes] = typical_nodes
    typical[eb] = typical[ea]  # an exact copy has its original's neighbours
    members = dup.groups(len(data.items), np.concatenate([ea, na]), np.concatenate([eb, nb]),
                         data.items["split_name"].to_numpy())
    table = dup.duplicate_table(data.items, members, scan["digest"], scan["phash"].to_numpy(), thumbs, typical,
                                meaningful)
    rule |= {"near_dup_z": z_min, "embeddings_vote": feats is not None}
    return table, rule


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
    """The training items with ``split_name`` (their fold, or the data's own split) and ``external`` False, then
    the test images the config names beside the training data (``split_name`` test, ``external`` True)."""
    items = items.reset_index(drop=True)
    if _split_is_data(cfg, items):
        items["split_name"] = items["split"].astype(str)
    else:
        items["split_name"] = [f"fold{int(k)}" for k in items["fold"]]
    items["external"] = False
    test = _test_items(cfg)
    if not len(test):
        return items
    known = set(items["path"].astype(str))
    test = test[~test["path"].isin(known)]  # an image listed in both is a training image (its leakage is its split)
    return pd.concat([items, test], ignore_index=True)


def _test_items(cfg: Config) -> pd.DataFrame:
    """The test images of ``data.test_csv`` (labelled, in ``data.image_dir_test``) or, without it, every image of
    ``data.image_dir_test``: path, id, label ('' when unlabelled), group (the ID), split_name test, external."""
    from vistrain.data.images import ImageIndex, list_images
    from vistrain.data.sources import read_csv, require_dir

    d = cfg.data
    if cfg.task != "classification" or d.image_dir_test is None:
        return pd.DataFrame()
    folder = require_dir(d.image_dir_test, "data.image_dir_test")
    if d.test_csv is not None:
        df = read_csv(d.test_csv, "data.test_csv", [(d.id_col, "data.id_col")])
        index = ImageIndex(folder, d.image_ext)
        found = [index.find(i) for i in df[d.id_col]]
        missing = [i for i, p in zip(df[d.id_col], found) if p is None]
        if missing:
            raise UserError(f"data.test_csv: no image for ID '{missing[0]}' in {folder} ({len(missing)} missing)")
        ids, paths = df[d.id_col].astype(str).tolist(), [str(p) for p in found]
        labels = df[d.target_col].astype(str).tolist() if d.target_col in df.columns else [""] * len(df)
    else:
        files = list_images(folder)
        ids, paths, labels = [p.stem for p in files], [str(p) for p in files], [""] * len(files)
    return pd.DataFrame({"id": ids, "path": paths, "label": labels, "group": [f"test:{i}" for i in ids],
                         "split_name": "test", "external": True})


def _from_config(path: Path, overrides: Sequence[str]) -> AuditData:
    from vistrain.data.prepare import prepare_data
    from vistrain.data.splits import splits_table

    cfg = load_config(path, overrides=list(overrides))
    dev.set_num_threads(dev.env_threads() or dev.usable_cores())
    # What would stop train is what the audit reports: unreadable images and classes under
    # data.min_images_per_class are findings here, not errors. No decode-once cache: the audit reads each image
    # for its scan and its features, and a memory cache would only hold pixels nobody reads.
    lenient = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "on_bad_image": "skip", "min_images_per_class": None, "cache": "off"})})
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
        data.probs, data.prob_rows, data.prob_source, data.prob_scope = _held_out_probs(run, items)
    return data


def _no_probs(data: AuditData) -> str:
    """Why there are no label issues."""
    if data.run is not None:
        return "no label issues: an embedding run has no class probabilities"
    return "no label issues: they need held-out predictions of a trained run (vistrain audit RUN)"


def _softmax(logits: np.ndarray, t: float) -> np.ndarray:
    import torch

    return torch.softmax(torch.from_numpy(logits.astype(np.float64)) / t, -1).numpy()


def _held_out_probs(run: LoadedRun, items: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Probabilities no model saw the label of, their item rows, their source and (when they cover only part of
    the training data) their scope: the out-of-fold logits (all folds); a ratio split's validation logits and its
    test split's predictions; or the validation logits of the folds a run trained (``data.valid_fold=0``: fold 0's
    part only). Softmax at the calibration temperature when fitted."""
    from vistrain.engine.prediction import predict_probs

    t = run.temperature or 1.0
    own = int((~items["external"]).sum())
    oof = run.path / "oof" / "oof_logits.npy"
    if oof.is_file():
        return _softmax(np.load(oof), t), np.arange(own), f"out-of-fold logits ({oof.name})", ""
    val = run.path / "oof" / "fold0_valid_logits.npy"
    split = items["split_name"].to_numpy()
    if run.cfg.data.split == "ratio" and val.is_file():
        rows, probs = np.flatnonzero(split == "val"), _softmax(np.load(val), t)
        test = np.flatnonzero((split == "test") & ~items["external"].to_numpy())
        if len(test):
            probs = np.concatenate([probs, predict_probs(run, items["path"].iloc[test].tolist(), run.folds, False)])
            rows = np.concatenate([rows, test])
        return probs, rows, "ratio split: validation logits" + (" and test predictions" if len(test) else ""), ""
    files = {k: run.path / "oof" / f"fold{k}_valid_logits.npy" for k in run.folds}
    have = [k for k, f in files.items() if f.is_file()]
    if not have:
        folds = ", ".join(map(str, run.folds)) or "none"
        raise UserError(f"RUN: {run.path} has no held-out predictions (oof/oof_logits.npy or "
                        f"oof/fold<k>_valid_logits.npy; trained fold(s): {folds} of data.folds={run.cfg.data.folds}); "
                        f"train a fold to completion, or every fold: vistrain train --config "
                        f"{run.path / 'config.yaml'} data.valid_fold=all")
    rows = np.concatenate([np.flatnonzero(split == f"fold{k}") for k in have])
    probs = np.concatenate([_softmax(np.load(files[k]), t) for k in have])
    names = ", ".join(map(str, have))
    scope = (f"label issues checked on {len(rows)} of {own} training images: the validation part of fold(s) {names}, "
             f"the only fold(s) this run trained; train every fold (data.valid_fold=all) to check them all")
    return probs, rows, f"validation logits of fold(s) {names}", scope


def _features(data: AuditData) -> tuple[np.ndarray, str, bool]:
    """[N, D] centred unit features, what they are, and whether they come from trained weights (only then do
    they vote on near duplicates)."""
    paths = data.items["path"].tolist()
    if data.run is not None:
        feats, source = run_features(data.run, paths)
        trained = True
    else:
        feats, source = config_features(data.cfg, paths, len(data.classes))
        trained = data.cfg.model.init_from is not None or data.cfg.model.pretrained_path is not None
    if not trained:
        source += "; not used for near duplicates (untrained weights), pixel evidence only"
    return centred(feats), source, trained


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
             meaningful: bool, feat_source: str, rule: dict[str, Any]) -> dict[str, Any]:
    a = data.cfg.audit
    return {
        "name": data.cfg.project.name,
        "source": str(data.run.path) if data.run else "config (before training)",
        "output": str(out),
        "num_images": len(data.items) + len(data.bad),
        "images_per_split": _split_counts(data),
        "label_issues": {"count": len(issues), "checked": 0 if data.probs is None else len(data.probs),
                         "source": data.prob_source or "none", "scope": data.prob_scope or (
                             "every training image" if data.probs is not None else "none")},
        "duplicates": {**dup.counts(dups), **_shared(dup.shared_groups(dups) if meaningful else []), "rule": rule},
        "outliers": {"total": len(outliers), **{str(k): int(v) for k, v in outliers["reason"].value_counts().items()}},
        "class_health": class_health(data.items, data.classes, data.cfg.data.min_images_per_class),
        "sources": {"probabilities": data.prob_source or "none", "embeddings": feat_source,
                    "note": "" if data.probs is not None else _no_probs(data)},
        "thresholds": a.model_dump(),
    }


def _split_counts(data: AuditData) -> dict[str, int]:
    """Readable images per audited split (folds, train / val / test, the config's test images)."""
    return {str(k): int(v) for k, v in data.items["split_name"].value_counts().sort_index().items()}


def _split_counts_text(data: AuditData) -> str:
    return ", ".join(f"{k} {v}" for k, v in _split_counts(data).items())


def _shared(groups: list[list[str]], listed: int = 50) -> dict[str, Any]:
    """The group pairs holding one image (the split is less leak-free than the group column claims): the count
    and the first ``listed`` (duplicates.csv has every pair)."""
    return {"groups_sharing_images_count": len(groups), "groups_sharing_images": groups[:listed]}


def _log_summary(s: dict[str, Any], out: Path) -> None:
    d = s["duplicates"]
    log.info("[AUDIT] leakage: %d duplicate image(s) across splits in %d group(s) | duplicates: %d group(s), %d "
             "image(s) beside their representative (exact %d, near %d, label conflicts %d, cross-group %d) | label "
             "issues %d | outliers %d", d["cross_split"], d["cross_split_groups"], d["groups"], d["total"],
             d["exact"], d["near"], d["conflicts"], d["cross_group"], s["label_issues"]["count"],
             s["outliers"]["total"])
    if s["label_issues"]["scope"] not in ("every training image", "none"):
        log.info("[AUDIT] %s", s["label_issues"]["scope"])
    log.info("[AUDIT] written to %s (audit.json, label_issues.csv, duplicates.csv, outliers.csv, audit.html%s)", out,
             ", clean_changes.csv" if "clean" in s else "")
