"""``vistrain predict``: the fold ensemble's class for every image -> ``ID,target`` CSV.

The prediction is the mean of softmax(logits / T) over the chosen folds' best checkpoints and the TTA
views; T comes from calibration.json when the run was calibrated: one fold model's temperature for one fold, the
fold ensemble's own (``ensemble.temperature``, unfitted for a K-fold run: T = 1) for several.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vistrain.config.schema import Config
from vistrain.data.images import IMAGE_EXTS, ImageIndex, list_images
from vistrain.data.sources import read_csv, require_dir
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
from vistrain.errors import UserError
from vistrain.tracking.files import write_csv

log = logging.getLogger(__name__)


@dataclass
class Inputs:
    ids: list[str]
    paths: list[str]


def resolve_inputs(run: LoadedRun, input_path: Path, image_dir: Path | None, sample: Path | None) -> Inputs:
    """IDs and image paths, in output order: the sample submission's order when given.

    IDs read from a CSV (``--input`` or ``--sample``) are written exactly as given; a folder's images get the IDs
    the run's training data would give them (see ``folder_ids``)."""
    d = run.cfg.data
    ids: list | None = None
    if input_path.is_dir():
        folder = input_path
    elif input_path.is_file():
        folder = require_dir(image_dir or d.image_dir_test, "--image-dir")
        ids = read_csv(input_path, "--input", [(d.id_col, "data.id_col")])[d.id_col].tolist()
    else:
        raise UserError(f"--input: not found: {input_path}")
    if sample is not None:
        if not sample.is_file():
            raise UserError(f"--sample: file not found: {sample}")
        ids = read_csv(sample, "--sample", [(d.id_col, "data.id_col")])[d.id_col].tolist()
    elif ids is None:
        files = list_images(folder)
        if not files:
            raise UserError(f"--input: no images in {input_path}")
        return Inputs(folder_ids(run, files), [str(p) for p in files])
    if not ids:
        raise UserError(f"--input: no images in {input_path}")
    index = ImageIndex(folder, d.image_ext)
    paths = []
    for image_id in ids:
        found = index.find(image_id)
        if found is None:
            raise UserError(f"--input: no image for ID '{image_id}' in {folder} "
                            f"(tried it as given and with {', '.join(index.exts[:4])}, ...)")
        paths.append(str(found))
    return Inputs([str(i) for i in ids], paths)


def folder_ids(run: LoadedRun, files: list[Path]) -> list[str]:
    """The ID of each file as the run's training data names images: its file name, without the extension when
    no training ID has one (a train.csv of bare IDs, whose sample submission has bare IDs too)."""
    if any(Path(i).suffix.lower() in IMAGE_EXTS for i in run.splits()["id"]):
        return [p.name for p in files]
    seen: dict[str, str] = {}
    for p in files:
        if p.stem in seen:
            raise UserError(f"--input: {seen[p.stem]} and {p.name} in {p.parent} would share the ID '{p.stem}' "
                            "(the run's training IDs have no extension); rename one, or list the IDs in a CSV")
        seen[p.stem] = p.name
    return list(seen)


def untrained_views(cfg: Config, views: Sequence[str]) -> list[str]:
    """The TTA views ("hflip", "vflip") that the run's training augmentation never produced."""
    a = cfg.augment
    prob = {"hflip": a.hflip, "vflip": a.vflip}
    return [v for v in views if a.policy == "none" or not prob[v]]


def warn_untrained_views(cfg: Config, views: Sequence[str], command: str = "predict --tta") -> None:
    seen = {"hflip": "mirrored", "vflip": "upside-down (vertically flipped)"}
    for view in untrained_views(cfg, views):
        why = "augment.policy=none" if cfg.augment.policy == "none" else f"augment.{view}=0"
        log.warning("[WARN] %s: the %s view, but with %s the model never saw %s images during training; "
                    "TTA may lower accuracy", command, view, why, seen[view])


def tta_wanted(run: LoadedRun, flag: bool) -> bool:
    """Whether a command averages the ``eval.tta`` views: ``--tta``, or ``eval.tta=...`` given on its command line
    (naming views for this command is asking for them; ``eval.tta=false`` asks for none)."""
    given = "eval.tta" in run.overrides
    if given and run.cfg.task == "embedding":
        raise UserError("eval.tta: a classifier's views; an embedding run averages each embedding with its mirror "
                        "image's: use --tta (predict) or eval.flip_feats=true")
    return flag or given


def predict_probs(run: LoadedRun, paths: list[str], folds: list[int], tta: bool) -> np.ndarray:
    """Ensemble probabilities [N, C] over ``folds`` (and the TTA views of ``eval.tta`` when ``tta``)."""
    device = dev.pick_device(run.cfg.train.device)
    views = run.cfg.eval.tta if tta else []
    logits = []
    for fold in folds:
        model, pre = load_fold_model(run, fold, device)
        logits.append(infer_logits(run, model, paths, pre, device, views, desc=f"fold {fold}"))
    return ensemble_probs(logits, run.temperature_for(folds))


def run_predict(run_dir: Path, input_path: Path, output: Path | None = None, image_dir: Path | None = None,
                sample: Path | None = None, tta: bool = False, folds: str | None = None, probs: bool = False,
                overrides: Sequence[str] = (), strict: bool = False) -> pd.DataFrame:
    """``overrides``: ``key=value`` evaluation options (``eval.tta``, ``data.image_dir_test`` ...) for this call.
    ``strict``: a fallback (a checkpoint's preprocessing assumed) is an error."""
    run = load_run(run_dir, overrides, "predict", strict)
    if run.overrides:
        log.info("[PREDICT] overrides: %s", " ".join(f"{k}={v}" for k, v in run.overrides.items()))
    chosen = select_folds(run, folds)
    inputs = resolve_inputs(run, input_path, image_dir, sample)
    require_readable(inputs.paths)
    d = run.cfg.data
    tta = tta_wanted(run, tta)
    if tta:  # embedding runs average with the mirror image only
        warn_untrained_views(run.cfg, ["hflip"] if run.cfg.task == "embedding" else run.cfg.eval.tta)
    if run.cfg.task == "embedding":
        from vistrain.engine.embedding_eval import knn_predict

        labels, top1 = knn_predict(run, inputs.paths, flip=tta or None)
        table = pd.DataFrame({d.id_col: inputs.ids, d.target_col: labels})
        if probs:
            table["top1_similarity"] = top1
        return _write(_with_display_names(run, table), output or run.path / "predictions.csv")
    log.info("[PREDICT] %d images | folds=%s | tta=%s | temperature=%s", len(inputs.ids), chosen,
             run.cfg.eval.tta if tta else "off", _temperature_note(run, chosen))
    p = predict_probs(run, inputs.paths, chosen, tta)
    table = pd.DataFrame({d.id_col: inputs.ids, d.target_col: [run.classes[i] for i in p.argmax(axis=1)]})
    if probs:
        for i, c in enumerate(run.classes):
            table[f"prob_{c}"] = p[:, i]
    return _write(_with_display_names(run, table), output or run.path / "predictions.csv")


def predict_table(run_dir: Path, names: Sequence[str], items: Sequence[Any], folds: str | Sequence[int] = "all",
                  tta: bool = False, top_k: int = 5) -> pd.DataFrame:
    """``Run.predict``: the answer of ``run_predict`` for files or images in memory (``items``), one row each with
    ``input`` (``names``), ``target``, ``confidence``, the ``top_k`` classes and probabilities, ``prob_<class>``
    (classifiers) or ``top1_similarity`` (embedding runs); nothing is written."""
    run = load_run(run_dir, (), "Run.predict")
    chosen = select_folds(run, folds if isinstance(folds, str) else list(folds), key="folds")
    files = [i for i in items if isinstance(i, str)]
    if files:
        require_readable(files, "inputs")
    if tta:
        warn_untrained_views(run.cfg, ["hflip"] if run.cfg.task == "embedding" else run.cfg.eval.tta, "Run.predict")
    if run.cfg.task == "embedding":
        from vistrain.engine.embedding_eval import knn_predict

        labels, top1 = knn_predict(run, list(items), flip=tta or None)
        return pd.DataFrame({"input": list(names), "target": [str(x) for x in labels], "top1_similarity": top1})
    p = predict_probs(run, list(items), chosen, tta)
    k = max(1, min(int(top_k), len(run.classes)))
    order = np.argsort(-p, axis=1, kind="stable")[:, :k]
    classes = [str(c) for c in run.classes]
    table = pd.DataFrame({"input": list(names), "target": [classes[i] for i in order[:, 0]],
                          "confidence": p[np.arange(len(p)), order[:, 0]],
                          "top_classes": [[classes[i] for i in row] for row in order],
                          "top_probs": [[float(p[n, i]) for i in row] for n, row in enumerate(order)]})
    for i, c in enumerate(classes):
        table[f"prob_{c}"] = p[:, i]
    return table


def embed_images(run_dir: Path, items: Sequence[Any], fold: int = 0, flip: bool | None = None) -> np.ndarray:
    """``Run.embed``: embeddings [N, D] of an embedding run's fold model for files or images in memory."""
    from vistrain.engine.inference import embed_paths

    run = load_run(run_dir, (), "Run.embed")
    if run.cfg.task != "embedding":
        raise UserError(f"RUN: {run.path} is a {run.cfg.task} run; embed needs task: embedding (a classifier's "
                        "features: Run.model())")
    select_folds(run, [fold], key="fold")
    files = [i for i in items if isinstance(i, str)]
    if files:
        require_readable(files, "images")
    return embed_paths(run, list(items), fold=fold, desc="embed", flip=flip)


def _temperature_note(run: LoadedRun, folds: list[int]) -> str:
    """The temperature these folds' predictions use, and why none when a calibrated run's ensemble has none."""
    t = run.temperature_for(folds)
    if t is not None:
        return f"{t:.4g}"
    if run.temperature is not None and len(folds) > 1:
        return "none (a fold ensemble; calibration.json ensemble: not fitted)"
    return "none"


def _with_display_names(run: LoadedRun, table: pd.DataFrame) -> pd.DataFrame:
    """A ``display_name`` column after the predicted class when class_map.json's metadata names any class."""
    names = {str(c): n for c, n in zip(run.classes, run.display_names()) if n}
    if names:
        target = run.cfg.data.target_col
        table.insert(table.columns.get_loc(target) + 1, "display_name", table[target].astype(str).map(names).fillna(""))
    return table


def _write(table: pd.DataFrame, output: Path) -> pd.DataFrame:
    write_csv(output, table)
    log.info("[PREDICT] wrote %s (%d rows)", output, len(table))
    return table
