"""Loading a finished run and running its fold models on images (shared by evaluate, predict, calibrate)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from vistrain.config.loader import EVAL_OVERRIDES, config_to_dict, load_config, restrict_overrides
from vistrain.config.schema import Config
from vistrain.data.classmap import display_name
from vistrain.data.dataset import ImageDataset, worker_init
from vistrain.data.images import check_images, set_max_pixels
from vistrain.data.preprocess import Preprocessor
from vistrain.engine import device as dev
from vistrain.engine.checkpoint import load_checkpoint
from vistrain.errors import UserError
from vistrain.fallbacks import Fallbacks
from vistrain.models.build import build_model
from vistrain.tracking import rundir
from vistrain.tracking.logs import show_progress

log = logging.getLogger(__name__)


@dataclass
class LoadedRun:
    path: Path
    cfg: Config
    classes: list  # class labels in index order, as in the training CSV
    folds: list[int]  # folds that have a best checkpoint
    temperature: float | None  # one fold model's, from calibration.json, when the run was calibrated
    overrides: dict[str, Any] = field(default_factory=dict)  # key=value options of this command, as applied
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # class_map.json's per-class metadata
    calibration: dict[str, Any] = field(default_factory=dict)  # calibration.json as written ({} when absent)
    # what this command did instead of what was asked (a checkpoint's preprocessing assumed, ...); strict: refused
    fallbacks: Fallbacks = field(default_factory=Fallbacks)

    def ckpt(self, fold: int) -> Path:
        return self.path / "ckpt" / f"best_fold{fold}.pth"

    def splits(self) -> pd.DataFrame:
        """splits.csv with IDs and labels as text, as the training CSV wrote them."""
        return pd.read_csv(self.path / "splits.csv", dtype={"id": str, "label": str}, keep_default_na=False)

    def class_index(self) -> dict[str, int]:
        """Class label (as text) -> index of the model's output."""
        return {str(c): i for i, c in enumerate(self.classes)}

    def display_names(self) -> list[str | None]:
        """Each class's display name in index order (``data.classmap.display_name``: class_map.json's
        ``metadata.<class>.display_name``, else ``.name``), None for a class without one."""
        return [display_name(self.metadata, c) for c in self.classes]

    def temperature_for(self, folds: Sequence[int]) -> float | None:
        """The temperature for predictions of ``folds``: one fold model's (``temperature``), or for several folds
        averaged the fold ensemble's own (``calibration.json``'s ``ensemble.temperature``: None unless fitted on the
        ensemble's outputs, since averaging K models already softens them and one model's T over-corrects)."""
        if len(folds) == 1:
            return self.temperature
        ensemble = self.calibration.get("ensemble")
        return ensemble.get("temperature") if isinstance(ensemble, dict) else None

def load_run(run_dir: Path, overrides: Sequence[str] = (), command: str = "evaluate / predict", strict: bool = False
             ) -> LoadedRun:
    """The run's config with this command's ``key=value`` evaluation options (``EVAL_OVERRIDES``) applied, so every
    consumer sees one effective config; relative paths in them resolve against the working directory. ``strict``:
    a fallback while using the run (``LoadedRun.fallbacks``) is an error."""
    run_dir = rundir.require_run_dir(run_dir)
    keys = restrict_overrides(list(overrides), EVAL_OVERRIDES, command)
    cfg = load_config(run_dir / "config.yaml", overrides=list(overrides), run_file=True)
    set_max_pixels(cfg.data.max_image_pixels)
    class_map = json.loads((run_dir / "class_map.json").read_text())
    classes = [class_map["idx_to_class"][str(i)] for i in range(len(class_map["idx_to_class"]))]
    folds = sorted(int(p.stem.removeprefix("best_fold")) for p in (run_dir / "ckpt").glob("best_fold*.pth"))
    if not folds:
        raise UserError(f"RUN: {run_dir} has no ckpt/best_fold*.pth; train it first (or --resume it)")
    calib = run_dir / "calibration.json"
    calibration = json.loads(calib.read_text()) if calib.is_file() else {}
    _apply_threads(cfg)
    metadata = class_map.get("metadata")
    return LoadedRun(run_dir, cfg, classes, folds, calibration.get("temperature"), _effective(cfg, keys),
                     metadata if isinstance(metadata, dict) else {}, calibration, Fallbacks(strict))


def _effective(cfg: Config, keys: list[str]) -> dict[str, Any]:
    """``{dotted key: value}`` as the validated config holds it (paths absolute), for metrics.json and the log."""
    values = config_to_dict(cfg)
    out = {}
    for key in keys:
        node: Any = values
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out


def _apply_threads(cfg: Config) -> None:
    """Compute threads for working with a run on this machine: ``$OMP_NUM_THREADS`` when set, else the run's
    ``train.num_threads`` at most this machine's usable cores (config.yaml records the training machine's count)."""
    t = cfg.train
    recorded, _ = dev.resolve_num_threads(t.num_threads, dev.auto_workers(t.num_workers, torch.device("cpu")))
    dev.set_num_threads(dev.env_threads() or min(recorded, dev.usable_cores()))


def select_folds(run: LoadedRun, folds: str | Sequence[int] | None, key: str = "--folds") -> list[int]:
    """``None`` or ``"all"``: every trained fold; else the listed ones, each of which must exist."""
    if folds is None or folds == "all":
        return run.folds
    try:
        chosen = [int(f) for f in (folds.split(",") if isinstance(folds, str) else folds)]
    except ValueError:
        raise UserError(f"{key}: '{folds}' is not a fold list; valid: all, or fold numbers like 0,2 "
                        f"(trained folds: {', '.join(map(str, run.folds))})") from None
    missing = [f for f in chosen if f not in run.folds]
    if missing:
        raise UserError(f"{key}: fold {missing[0]} has no checkpoint in {run.path / 'ckpt'}; "
                        f"trained folds: {', '.join(map(str, run.folds))}")
    return chosen


def load_fold_model(run: LoadedRun, fold: int, device: torch.device) -> tuple[nn.Module, Preprocessor]:
    """The fold's best model in eval mode, and the preprocessing it was trained with (from the checkpoint: never
    the config file or timm's current defaults, which may have changed since)."""
    ckpt = load_checkpoint(run.ckpt(fold), device)
    model = build_model(run.cfg.task, run.cfg.model, len(run.classes), pretrained=False)
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), checkpoint_preprocessor(ckpt, run.ckpt(fold), run.fallbacks, fold)


def checkpoint_preprocessor(ckpt: dict[str, Any], path: Path, fallbacks: Fallbacks | None = None,
                            fold: int | None = None) -> Preprocessor:
    """The checkpoint's ``preprocess`` (``Preprocessor.to_dict``); a checkpoint written before it existed records
    only ``data_config`` (size, mean, std): that resize and normalisation, without crop or CLAHE, a fallback
    (``fallbacks``: noted with the preprocessing assumed, or refused when strict)."""
    try:
        if "preprocess" in ckpt:
            return Preprocessor.from_dict(ckpt["preprocess"])
        d = ckpt["data_config"]
        pre = Preprocessor(size=tuple(d["img_size"]), mean=tuple(d["mean"]), std=tuple(d["std"]))
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(f"RUN: {path}: no usable preprocessing in the checkpoint ({err})") from err
    (fallbacks or Fallbacks()).note(
        "preprocessing", "the checkpoint's recorded preprocessing", f"resize + normalisation only: {pre.describe()}",
        f"{path} was written before vistrain recorded preprocessing (data_config only: any crop or CLAHE of its "
        "training is unknown)", "train the run again with this vistrain to record its preprocessing", log,
        **({} if fold is None else {"fold": fold}))
    return pre


def require_readable(paths: Sequence[str], key: str = "--input") -> None:
    """Predictions cannot skip an image silently: the first unreadable one stops with its path and the reason
    (decoded in full first, so a corrupt file never reaches a DataLoader worker as a traceback)."""
    bad = check_images(list(paths))
    if bad:
        path = next(p for p in paths if p in bad)
        raise UserError(f"{key}: {len(bad)} unreadable image(s); first: {path}: {bad[path]}")


@torch.no_grad()
def infer_logits(run: LoadedRun, model: nn.Module, paths: Sequence[str], pre: Preprocessor,
                 device: torch.device, views: Sequence[str] = (), desc: str = "predict") -> np.ndarray:
    """Outputs [V, N, ...] for the plain view and each TTA view ("hflip", "vflip"), in ``paths`` order, each image
    through ``pre`` (the fold's preprocessing, as validation saw it); batch size (``eval.batch_size``, else twice
    the training batch) and workers as the run's config says."""
    t = run.cfg.train
    workers = dev.auto_workers(t.num_workers, device)
    loader = DataLoader(ImageDataset(paths, None, pre.normalize, _decoder(run, paths, pre)),
                        batch_size=run.cfg.eval.batch_size or t.batch_size * 2, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", worker_init_fn=worker_init if workers else None)
    precision = dev.pick_precision("auto", device)
    flips = {"hflip": [-1], "vflip": [-2]}
    out: list[list[torch.Tensor]] = [[] for _ in range(1 + len(views))]
    show = show_progress()
    for images, _, _ in tqdm(loader, desc=desc, disable=not show, leave=False):
        images = images.to(device, non_blocking=True)
        with dev.autocast(device, precision):
            out[0].append(model(images).float().cpu())
            for v, view in enumerate(views, start=1):
                out[v].append(model(torch.flip(images, dims=flips[view])).float().cpu())
    return torch.stack([torch.cat(o) for o in out]).numpy()


def _decoder(run: LoadedRun, paths: Sequence[str], pre: Preprocessor) -> Callable[[str], np.ndarray]:
    """The training run's disk cache when it holds every one of ``paths`` unchanged at ``pre``'s preprocessing
    (``evaluate`` and ``predict`` on training images decode nothing), else ``pre.load``."""
    from vistrain.data.cache import find_cache

    if not all(isinstance(p, str) for p in paths):  # images in memory (the API's Run.predict / embed)
        return partial(_decode_item, pre)
    d = run.cfg.data
    cache = find_cache(paths, pre, d.cache_dir) if d.cache != "off" else None
    if cache is None:
        return pre.load
    log.info("[DATA] cache disk reused: %d images at %dx%d (%s)", len(paths), *pre.size, cache.data_path)
    return cache.decode


def _decode_item(pre: Preprocessor, item: Any) -> np.ndarray:
    """A file (``pre.load``) or an image in memory (``images.to_rgb``, then ``pre.deterministic``)."""
    if isinstance(item, str):
        return pre.load(item)
    from vistrain.data.images import to_rgb

    return pre.deterministic(to_rgb(item))


def ensemble_probs(logits: Sequence[np.ndarray], temperature: float | None = None) -> np.ndarray:
    """Mean of softmax(logits / T) over models and views: a list of [V, N, C] -> probabilities [N, C]."""
    t = temperature or 1.0
    stacked = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.float64) for x in logits]))
    return torch.softmax(stacked / t, dim=-1).mean(dim=0).numpy()



def embed_paths(run: LoadedRun, paths: Sequence[str], fold: int = 0, desc: str = "embed",
                flip: bool | None = None) -> np.ndarray:
    """Embeddings [N, D] of an embedding run's model, flip-averaged and L2-normalised as ``eval.*`` says
    (``flip`` overrides ``eval.flip_feats`` when given)."""
    device = dev.pick_device(run.cfg.train.device)
    e = run.cfg.eval
    model, pre = load_fold_model(run, fold, device)
    views = ["hflip"] if (e.flip_feats if flip is None else flip) else []
    feats = infer_logits(run, model, paths, pre, device, views, desc=desc).mean(axis=0)
    if e.feat_norm:
        feats /= np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    return feats.astype(np.float32)
