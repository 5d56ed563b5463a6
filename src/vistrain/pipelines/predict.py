"""``vistrain predict``: the fold ensemble's class for every image -> ``ID,target`` CSV.

The prediction is the mean of softmax(logits / T) over the chosen folds' best checkpoints and the TTA
views; T comes from calibration.json when the run was calibrated.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from vistrain.data.images import ImageIndex, list_images
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
    """IDs and image paths, in output order: the sample submission's order when given."""
    d = run.cfg.data
    if input_path.is_dir():
        folder = input_path
        ids = [p.name for p in list_images(folder)]
    elif input_path.is_file():
        folder = require_dir(image_dir or d.image_dir_test, "--image-dir")
        ids = read_csv(input_path, "--input", [(d.id_col, "data.id_col")])[d.id_col].tolist()
    else:
        raise UserError(f"--input: not found: {input_path}")
    if sample is not None:
        if not sample.is_file():
            raise UserError(f"--sample: file not found: {sample}")
        ids = read_csv(sample, "--sample", [(d.id_col, "data.id_col")])[d.id_col].tolist()
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


def predict_probs(run: LoadedRun, paths: list[str], folds: list[int], tta: bool) -> np.ndarray:
    """Ensemble probabilities [N, C] over ``folds`` (and the TTA views of ``eval.tta`` when ``tta``)."""
    device = dev.pick_device(run.cfg.train.device)
    views = run.cfg.eval.tta if tta else []
    logits = []
    for fold in folds:
        model, data_config = load_fold_model(run, fold, device)
        logits.append(infer_logits(run, model, paths, data_config, device, views, desc=f"fold {fold}"))
    return ensemble_probs(logits, run.temperature)


def run_predict(run_dir: Path, input_path: Path, output: Path | None = None, image_dir: Path | None = None,
                sample: Path | None = None, tta: bool = False, folds: str | None = None, probs: bool = False
                ) -> pd.DataFrame:
    run = load_run(run_dir)
    chosen = select_folds(run, folds)
    inputs = resolve_inputs(run, input_path, image_dir, sample)
    require_readable(inputs.paths)
    d = run.cfg.data
    if run.cfg.task == "embedding":
        from vistrain.pipelines.embedding_eval import knn_predict

        labels, top1 = knn_predict(run, inputs.paths, flip=tta or None)
        table = pd.DataFrame({d.id_col: inputs.ids, d.target_col: labels})
        if probs:
            table["top1_similarity"] = top1
        return _write(table, output or run.path / "predictions.csv")
    log.info("[PREDICT] %d images | folds=%s | tta=%s | temperature=%s", len(inputs.ids), chosen,
             run.cfg.eval.tta if tta else "off", run.temperature or "none")
    p = predict_probs(run, inputs.paths, chosen, tta)
    table = pd.DataFrame({d.id_col: inputs.ids, d.target_col: [run.classes[i] for i in p.argmax(axis=1)]})
    if probs:
        for i, c in enumerate(run.classes):
            table[f"prob_{c}"] = p[:, i]
    return _write(table, output or run.path / "predictions.csv")


def _write(table: pd.DataFrame, output: Path) -> pd.DataFrame:
    write_csv(output, table)
    log.info("[PREDICT] wrote %s (%d rows)", output, len(table))
    return table
