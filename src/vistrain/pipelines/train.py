"""``vistrain train``: data -> folds -> one model per fold -> OOF -> summary, in one run directory."""

from __future__ import annotations

import logging
import math
import platform
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import timm
import torch

import vistrain
from vistrain.config.loader import config_to_dict, mode_info
from vistrain.config.schema import Config, TrackingCfg, domain_monitor
from vistrain.data.prepare import Prepared, prepare_data
from vistrain.data.preprocess import Preprocessor
from vistrain.data.sources import (
    require_dir,
    single_domain_classes,
)
from vistrain.data.splits import splits_table
from vistrain.engine import device as dev
from vistrain.engine import distributed
from vistrain.engine.checkpoint import (
    load_checkpoint,
    rng_state,
    save_weights,
    seed_everything,
    set_rng_state,
)
from vistrain.engine.hooks import EarlyStopping, best_epochs
from vistrain.engine.loop import LoopOptions, TrainState, fit
from vistrain.engine.optim import build_optimizer, build_scheduler
from vistrain.engine.setup import SETUPS
from vistrain.errors import UserError, describe, did_you_mean, exit_code
from vistrain.metrics.classification import epoch_metrics, per_domain_metrics
from vistrain.models.backbone import check_model_name
from vistrain.models.build import compile_model, count_parameters, is_convolutional
from vistrain.models.init import require_source
from vistrain.tracking import rundir
from vistrain.tracking.files import (
    StorageError,
    atomic_write_text,
    json_line,
    write_csv,
    write_json,
    write_npy,
    write_yaml,
)
from vistrain.tracking.logs import log_outcome, run_logging, show_progress
from vistrain.tracking.writers import Trackers
from vistrain.viz.plots import training_plots

log = logging.getLogger(__name__)
# What to do about a last checkpoint that cannot be read when a run resumes.
RESUME_HINT = "; delete it to train that fold again from the start, or start a new run with --fresh"


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def run_train(cfg: Config, *, resume: bool | Path = False, fresh: bool = False, folds: list[int] | None = None,
              config_path: Path | None = None, use_calibration: bool = False, full_pipeline: bool = False,
              on_epoch: Callable[[dict[str, Any]], None] | None = None) -> RunResult:
    """One training run; returns its directory and summary. ``folds`` overrides ``data.valid_fold``.

    ``use_calibration`` fits a temperature afterwards; ``full_pipeline`` then predicts ``data.image_dir_test``
    into ``RUN/submission.csv`` (in ``data.sample_csv`` order when given). ``on_epoch(row)`` sees every
    metrics row (the tuner reports and prunes there).
    """
    check_final_steps(cfg, use_calibration, full_pipeline)
    folds = folds if folds is not None else cfg.folds_to_train()
    if cfg.task == "embedding" or cfg.data.split == "ratio":
        folds = [0]  # one model: the split comes from data.items["split"], not from K folds
    bad_folds = [k for k in folds if not 0 <= k < cfg.data.folds]
    if bad_folds:
        raise UserError(f"--fold: {bad_folds[0]} is not a fold of data.folds={cfg.data.folds}; "
                        f"valid: 0..{cfg.data.folds - 1}")
    check_model_name(cfg.model.name)  # before the run directory: a typo must not leave an error run behind
    require_source(cfg.model.init_from, "model.init_from")
    require_source(cfg.model.pretrained_path, "model.pretrained_path")
    info = distributed.init_distributed()
    run: rundir.RunDir | None = None
    try:
        data = distributed.from_main(info, lambda: prepare_data(cfg))
        check_domain_monitor(cfg, data, folds)
        run = distributed.from_main(info, lambda: _open_run(cfg, resume, fresh, folds))
        if not info.is_main:  # rank 0 writes everything; the others train their share and stay quiet
            run.locked = False  # the lock is rank 0's
            with run_logging([], console=False):
                summary = _train_run(cfg, run, data, folds, config_path, time.time(), on_epoch, info)
            return RunResult(run.path, summary)
        return _main_rank(cfg, run, data, folds, config_path, use_calibration, full_pipeline, on_epoch, info)
    finally:
        if run is not None:
            rundir.release_lock(run)
        distributed.shutdown(info)


def check_domain_monitor(cfg: Config, data: Prepared, folds: list[int]) -> None:
    """A ``<metric>@<domain>`` monitor needs that domain among the validation images of every fold to train (and
    ``top5`` five classes): a user error now, before the run directory, rather than a missing key after an epoch."""
    found = domain_monitor(cfg.train.monitor) if cfg.task == "classification" else None
    if found is None:
        return
    metric, domain = found
    if "domain" not in data.items.columns:
        raise UserError(f"train.monitor: domain '{domain}' is not in the data, which has no domains (give them as a "
                        "'domain' column of the CSV or manifest, or as the names of data.sources)")
    domains = data.items["domain"].fillna("").astype(str).to_numpy()
    known = sorted(set(domains) - {""})
    if domain not in known:
        raise UserError(f"train.monitor: domain '{domain}' is not in the data; domains: {', '.join(known)}"
                        f"{did_you_mean(domain, known)}")
    if metric == "top5" and len(data.classes) < 5:
        raise UserError(f"train.monitor: {cfg.train.monitor} is reported only with 5 or more classes; the data has "
                        f"{len(data.classes)}; use top1@{domain} or macro_f1@{domain}")
    for fold in folds:
        if not np.any(domains[data.fold_indices(fold)[1]] == domain):
            where = "the val split" if data.ratio_split else f"fold {fold}"
            fix = "raise data.val_ratio" if data.ratio_split else "lower data.folds"
            raise UserError(f"train.monitor: domain '{domain}' has no validation image in {where} "
                            f"({int(np.sum(domains == domain))} image(s) in all); {fix} or monitor another domain")


def check_final_steps(cfg: Config, use_calibration: bool, full_pipeline: bool) -> None:
    """What ``--use-calibration`` and ``--mode full-pipeline`` need after training, checked before it."""
    if use_calibration and cfg.task != "classification":
        raise UserError(f"--use-calibration: temperature scaling is for classifiers; this config has task: {cfg.task}")
    if full_pipeline:
        require_dir(cfg.data.image_dir_test, "data.image_dir_test")


def _main_rank(cfg: Config, run: rundir.RunDir, data: Prepared, folds: list[int], config_path: Path | None,
               use_calibration: bool, full_pipeline: bool, on_epoch: Callable[[dict[str, Any]], None] | None,
               info: distributed.DistInfo) -> RunResult:
    started = time.time()
    log_files = [run / "train.log"]
    if cfg.output.logs_dir is not None:
        log_files.append(cfg.output.logs_dir / f"run_{time.strftime('%Y%m%d-%H%M')}_{run.run_id}.log")
    with run_logging(log_files):
        for note in run.notes:
            log.info(note)
        try:
            summary = _train_run(cfg, run, data, folds, config_path, started, on_epoch, info)
            if use_calibration:
                from vistrain.pipelines.calibrate import run_calibrate

                summary["calibration"] = run_calibrate(run.path)
            if data.ratio_split and (data.items["split"] == "test").any():
                _evaluate_test(run, summary)
            if full_pipeline:
                from vistrain.pipelines.predict import run_predict

                run_predict(run.path, cfg.data.image_dir_test, output=run / "submission.csv",
                            sample=cfg.data.sample_csv)
            from vistrain.viz.report import write_report

            run.set_status("success", summary="summary.json", error=None, exit_code=None)  # a resumed failure's too
            # After the status: the page shows run.json's status as it stays (a failure here sets "error" again).
            log.info("[DONE] report: %s", write_report(run.path))
        except BaseException as err:
            status = _stopped_status(err)
            if status == "diverged":
                _log_diverged(run, err)
            # The log files alone tell how the run ended: the error, its traceback, then [EXIT] last.
            log_outcome(log, "TRAINING", err)
            code = {"exit_code": exit_code(err)} if status in ("error", "interrupted", "diverged") else {}
            try:
                run.set_status(status, error=describe(err), **code)
            except (OSError, StorageError) as also:  # the disk that stopped the run may refuse run.json too
                log.warning("[EXIT] could not record the status in %s: %s", run / "run.json", describe(also))
            raise
        log_outcome(log, "TRAINING")
    return RunResult(run.path, summary)


def _evaluate_test(run: rundir.RunDir, summary: dict[str, Any]) -> None:
    """A ratio split's test items, scored by the best model into RUN/eval/test/ (as ``evaluate RUN --split test``)
    and recorded in summary.json under ``test``."""
    from vistrain.pipelines.evaluate import run_evaluate

    metrics = run_evaluate(run.path, "test", echo=False)
    summary["test"] = {k: v for k, v in metrics.items() if k not in ("split", "folds", "overrides")}
    write_json(run / "summary.json", summary)
    log.info("[DONE] test split: n=%d top1=%.4f macro_f1=%.4f -> %s", metrics["n"], metrics["top1"],
             metrics["macro_f1"], run / "eval" / "test")


def _log_diverged(run: rundir.RunDir, err: BaseException) -> None:
    """The divergence (the loop's message) and how to go on from the last good epoch, which the checkpoints keep."""
    log.error("[ERROR] %s", describe(err))
    log.warning("[DIVERGED] kept the last good epoch's checkpoint and the best model in %s; continue from there "
                "with: vistrain train --resume %s train.lr=<lower>", run / "ckpt", run.path)


def _stopped_status(err: BaseException) -> str:
    """run.json's status for a run that ended by ``err``: what a caller that stops runs on purpose set on it
    (``run_status``, e.g. "pruned" by ``tune``), "interrupted" for Ctrl-C, else "error"."""
    status = getattr(err, "run_status", None)
    if isinstance(status, str):
        return status
    return "interrupted" if isinstance(err, KeyboardInterrupt) else "error"


def _open_run(cfg: Config, resume: bool | Path, fresh: bool, folds: list[int]) -> rundir.RunDir:
    if isinstance(resume, Path):
        run = rundir.open_existing(resume)
        try:
            rundir.require_work_left(run, folds)
        except UserError:
            rundir.release_lock(run)
            raise
        return run
    if resume and not fresh:
        found = rundir.find_unfinished(cfg)
        if found is not None:
            return rundir.open_existing(found)
        run = rundir.new_run(cfg)
        run.notes.append("[RESUME] no unfinished run of this config; starting a new run")
        return run
    return rundir.new_run(cfg)


def _train_run(cfg: Config, run: rundir.RunDir, data: Prepared, folds: list[int], config_path: Path | None,
               started: float, on_epoch: Callable[[dict[str, Any]], None] | None, info: distributed.DistInfo
               ) -> dict[str, Any]:
    device = dev.pick_device(cfg.train.device, info.local_rank)
    # every rank, before anything computes; _resolve_auto records the same count in config.yaml
    cached = data.cache is not None
    dev.apply_num_threads(cfg.train.num_threads, dev.auto_workers(cfg.train.num_workers, device, cached))
    precision = dev.pick_precision(cfg.train.amp, device)
    dev.configure_backends(device)
    log.info("[BOOT] vistrain %s | torch %s | timm %s | device=%s | precision=%s | processes=%d | run=%s%s",
             vistrain.__version__, torch.__version__, timm.__version__, _device_name(device), precision.name,
             info.world, run.path, " (resumed)" if run.resumed else "")
    mode = mode_info(cfg)
    if mode is not None:
        log.info("[CFG] %s", mode.line())
    cfg = distributed.from_main(info, lambda: _resolve_auto(cfg, device, precision, len(data.classes), cached))
    _log_config(cfg)
    if info.is_main:
        _write_run_files(cfg, run, data, config_path)
        _log_data(cfg, data, folds, run)
    history = _rebuild_metrics(run, cfg.data.folds) if info.is_main and run.resumed else None
    # Only rank 0 tracks: the other ranks get a tracker with every writer switched off.
    tracking = cfg.tracking if info.is_main else TrackingCfg(tensorboard=False)
    trackers = Trackers(tracking, run.path, run.run_id, config_to_dict(cfg), history=history)
    failed = True
    try:
        results = [_train_fold(cfg, run, data, fold, device, precision, trackers, on_epoch, info) for fold in folds]
        summary = _summarise(cfg, run, data, results, folds, device, precision, started, info)
        if info.is_main:
            write_json(run / "summary.json", summary)
            plots = training_plots(run.path)
            trackers.log_images(plots)
            trackers.log_summary(summary)
        failed = False
    finally:
        trackers.close(failed=failed)
    log.info("[DONE] run=%s | %s", run.path, _fmt_summary(summary))
    return summary


def _log_config(cfg: Config) -> None:
    """One [CFG] line per section with the keys this run reads (config.yaml keeps them all)."""
    unread = set(cfg.keys_not_read()) | {"audit"}  # audit: read by `vistrain audit`, never by training
    for section, values in config_to_dict(cfg).items():
        if section in unread:
            continue
        if isinstance(values, dict):
            values = {k: v for k, v in values.items() if f"{section}.{k}" not in unread}
        log.info("[CFG] %s: %s", section, values)
    t = cfg.train
    if t.eval_every_n_epochs > 1:
        patience = (f"early stopping patience counts evaluations ({t.early_stopping_patience} = "
                    f"{t.early_stopping_patience * t.eval_every_n_epochs} epochs)" if t.early_stopping_patience
                    else "no early stopping")
        log.info("[CFG] validation every %d epochs; %s", t.eval_every_n_epochs, patience)


def _resolve_auto(cfg: Config, device: torch.device, precision: dev.Precision, n_classes: int,
                  cached: bool) -> Config:
    """Replace ``auto`` settings with what was chosen for this machine, so config.yaml records the values
    the run actually used (precision, workers, threads, batch size and accumulation) and re-runs them elsewhere.
    ``cached``: the data comes from the decode-once cache (the loader's work is then augmentation alone)."""
    t = cfg.train
    update: dict[str, Any] = {"amp": precision.name, "num_workers": dev.auto_workers(t.num_workers, device, cached)}
    if cfg.augment.device != "cpu":
        cfg = cfg.model_copy(update={"augment": cfg.augment.model_copy(
            update={"device": _augment_device(cfg.augment.device, device)})})
    if t.channels_last == "auto":  # NHWC pays on CUDA for convolutions; on the CPU and for ViTs it does not
        update["channels_last"] = device.type == "cuda" and is_convolutional(cfg.model.name)
        cfg = cfg.model_copy(update={"train": t.model_copy(update={"channels_last": update["channels_last"]})})
    workers_why = dev.workers_reason(t.num_workers, device, cached)
    log.info("[CFG] train.num_workers=%d (%s)", update["num_workers"], workers_why)
    update["num_threads"], why = dev.resolve_num_threads(t.num_threads, update["num_workers"])
    log.info("[CFG] train.num_threads=%d (%s)", update["num_threads"], why)
    crowded = dev.oversubscription(update["num_threads"], update["num_workers"]) if device.type == "cpu" else None
    if crowded:
        log.warning("[CFG] %s", crowded)
    if t.batch_size == "auto":
        from vistrain.engine.autobatch import resolve_batch_size

        update["batch_size"], why = resolve_batch_size(cfg, device, precision, n_classes)
        if t.target_batch_size:
            update["grad_accum_steps"] = max(1, -(-t.target_batch_size // update["batch_size"]))
        log.info("[CFG] train.batch_size=auto -> %d (%s)%s", update["batch_size"], why,
                 f"; grad_accum_steps={update['grad_accum_steps']} for target_batch_size={t.target_batch_size}"
                 if "grad_accum_steps" in update else "")
    changed = {k: v for k, v in update.items() if getattr(t, k) != v}
    if changed:
        log.info("[CFG] resolved for this machine: %s", ", ".join(f"train.{k}={v}" for k, v in changed.items()))
    return cfg.model_copy(update={"train": t.model_copy(update=update)})


def _augment_device(setting: str, device: torch.device) -> str:
    """``augment.device``: cuda needs a CUDA training device and Kornia; auto takes it when both are there."""
    import importlib.util

    has_kornia = importlib.util.find_spec("kornia") is not None
    if setting == "cuda" and device.type != "cuda":
        raise UserError(f"augment.device: cuda needs training on a GPU; train.device resolved to {device.type} "
                        "(valid here: auto, cpu)")
    if setting == "cuda" and not has_kornia:
        raise UserError("augment.device: cuda needs Kornia: pip install 'vistrain[augment]' (or use cpu)")
    if setting == "auto":
        return "cuda" if device.type == "cuda" and has_kornia else "cpu"
    return setting


def _log_data(cfg: Config, data: Prepared, folds: list[int], run: rundir.RunDir) -> None:
    d = cfg.data
    if d.sources:
        log.info("[PATH] OK | sources: %s", "; ".join(
            f"{s.name} ({s.source}) " + " ".join(f"{k}={getattr(s, k)}" for k in ("train_csv", "image_dir_train",
                                                                                  "manifest") if getattr(s, k))
            for s in d.sources))
    elif d.source == "reid":
        log.info("[PATH] OK | root=%s | train=%s | query=%s | gallery=%s", d.root, d.train_folder, d.query_folder,
                 d.gallery_folder)
    elif d.source == "manifest":
        log.info("[PATH] OK | manifest=%s | sample_csv=%s", d.manifest, d.sample_csv)
    else:
        log.info("[PATH] OK | train_csv=%s | sample_csv=%s | image_dir_train=%s", d.train_csv, d.sample_csv,
                 d.image_dir_train)
    counts = pd.Series(data.targets[data.targets >= 0]).value_counts().sort_index()
    per_class = {str(data.classes[i]): int(n) for i, n in counts.items()}
    shown = dict(list(per_class.items())[:30])
    log.info("[DATA] %d images, %d %s | per class: %s%s", len(data.items), len(data.classes),
             "classes" if cfg.task == "classification" else "training identities/classes", shown,
             f" ... ({len(per_class) - 30} more)" if len(per_class) > 30 else "")
    _log_domains(cfg, data)
    for line in data.cache.lines if data.cache else []:
        log.info("[DATA] %s", line)
    for message, listed in data.left_out(d):
        if len(listed):
            log.warning("[DATA] %s; listed in %s", message, run / "bad_images.csv")
        else:
            log.info("[DATA] %s", message)
    if cfg.task == "embedding":
        log.info("[DATA] split: %s", data.items["split"].value_counts().to_dict())
        if data.queries_without_match:
            log.info("[DATA] %d of %d queries have no gallery image of their person from another camera; the "
                     "metrics skip them (Market-1501 protocol)", data.queries_without_match,
                     int((data.items["split"] == "query").sum()))
        return
    if data.ratio_split:
        sizes = data.items["split"].value_counts().to_dict()
        how = "the data's split column" if data.split_given else \
            f"data.train_ratio/val_ratio/test_ratio {d.train_ratio}/{d.val_ratio}/{d.test_ratio}, grouped, stratified"
        log.info("[DATA] split=ratio (%s) | train=%d val=%d test=%d | one model; data.folds and data.valid_fold are "
                 "not used", how, sizes.get("train", 0), sizes.get("val", 0), sizes.get("test", 0))
        return
    if "split" in data.items.columns:
        log.info("[DATA] the data's split column is not used by data.split: kfold (data.split: ratio uses it)")
    grouped = data.items["group"].nunique() < len(data.items)
    sizes = {int(k): int(n) for k, n in zip(*np.unique(data.fold_of, return_counts=True))}
    log.info("[DATA] folds=%d (%s) | validation sizes: %s | training folds: %s", d.folds,
             "grouped" if grouped else "stratified" if d.stratify else "plain", sizes, folds)


def _log_domains(cfg: Config, data: Prepared) -> None:
    """Images per domain (with the sources' ratios), classes found in one domain only, and the training sampler."""
    if "domain" not in data.items.columns:
        return
    ratios = cfg.data.domain_ratios() or {}
    counts = data.items["domain"].astype(str).value_counts()
    log.info("[DATA] domains: %s", ", ".join(f"{name}={int(counts[name])}" + (
        f" (ratio {ratios[name]:g})" if name in ratios else "") for name in sorted(counts.index)))
    for domain, classes in single_domain_classes(data.items).items():
        log.warning("[DATA] %d class(es) only in domain %s: %s%s", len(classes), domain, ", ".join(classes[:20]),
                    f" ... ({len(classes) - 20} more)" if len(classes) > 20 else "")
    if ratios and cfg.sampler.name != "pk":
        balanced = " and the classes drawn equally often (sampler.name: weighted)" \
            if cfg.sampler.name == "weighted" else ""
        log.info("[DATA] sampler: each epoch draws %s of the training images%s", " / ".join(
            f"{name} {r:.0%}" for name, r in ratios.items()), balanced)


def _write_run_files(cfg: Config, run: rundir.RunDir, data: Prepared, config_path: Path | None) -> None:
    splits = splits_table(data.items, data.fold_of)
    if run.resumed and (run / "splits.csv").is_file():
        before = pd.read_csv(run / "splits.csv", dtype=str, keep_default_na=False)
        if before["id"].tolist() != splits["id"].astype(str).tolist() or \
                before["fold"].tolist() != splits["fold"].astype(str).tolist():
            raise UserError(f"--resume: the data or split changed since {run.path} started; use --fresh")
    if run.resumed:
        _log_resume_changes(run, config_to_dict(cfg))
    else:
        write_yaml(run / "config.yaml", config_to_dict(cfg))
        if cfg.output.snapshots and config_path is not None and config_path.is_file():
            shutil.copyfile(config_path, run / "config.source.yaml")
            atomic_write_text(run / "command.txt", " ".join(sys.argv) + "\n")
    write_csv(run / "splits.csv", splits)
    write_json(run / "preprocess.json", Preprocessor.from_config(cfg).to_dict())
    class_map: dict[str, Any] = {
        "class_to_idx": {str(c): i for i, c in enumerate(data.classes)},
        "idx_to_class": {str(i): c for i, c in enumerate(data.classes)},
    }
    if data.class_map is not None and data.class_map.metadata:
        class_map["metadata"] = data.class_map.run_file()  # display_name (or name), training_weight, free fields
    write_json(run / "class_map.json", class_map)
    from vistrain.pipelines.manifest import build_manifest

    write_json(run / "manifest.json", build_manifest(cfg, data))
    if len(data.bad):
        write_csv(run / "bad_images.csv", data.bad[["id", "path", "reason"]])


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _log_resume_changes(run: rundir.RunDir, now: dict[str, Any]) -> None:
    """``--resume RUN key=value``: each value that differs from the run's config.yaml, in the log and in run.json
    (``resume_overrides``); config.yaml keeps what the run started with."""
    import yaml

    before = _flat(yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {})
    changed = {k: [before.get(k), v] for k, v in _flat(now).items() if before.get(k) != v}
    if changed:
        log.warning("[RESUME] config changed since the run started: %s", ", ".join(
            f"{k}: {old} -> {new}" for k, (old, new) in changed.items()))
        history = run.read_status().get("resume_overrides", [])
        run.set_status(run.read_status().get("status", "running"), resume_overrides=[*history, changed])


def _rebuild_metrics(run: rundir.RunDir, n_folds: int) -> list[dict[str, Any]]:
    """metrics.jsonl from the checkpoints' histories: one row per completed epoch, none repeated or lost."""
    rows = []
    for fold in range(n_folds):
        last = run.ckpt("last", fold)
        if last.is_file():
            rows += load_checkpoint(last, hint=RESUME_HINT)["history"]
    atomic_write_text(run / "metrics.jsonl", "".join(json_line(r) for r in rows))
    return rows


def _train_fold(cfg: Config, run: rundir.RunDir, data: Prepared, fold: int, device: torch.device,
                precision: dev.Precision, trackers: Trackers, on_epoch: Callable[[dict[str, Any]], None] | None,
                info: distributed.DistInfo) -> dict[str, Any]:
    t, m = cfg.train, cfg.model
    seed_everything(cfg.project.seed + fold)
    setup = SETUPS[cfg.task](cfg, data, fold, device, info)
    task, pre, train_loader = setup.task, setup.preprocessor, setup.train_loader
    # A frozen backbone leaves parameters without gradients, which DDP must be told to expect.
    model = distributed.wrap(setup.model, info, device, find_unused=t.freeze_backbone_epochs > 0)
    stopper = EarlyStopping(t.monitor, t.early_stopping_patience)
    optimizer = build_optimizer(setup.params, t)
    updates = -(-len(train_loader) // t.grad_accum_steps)
    state = TrainState(model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, t, updates, stopper.mode),
                       scaler=torch.amp.GradScaler(device.type, enabled=precision.use_scaler), stopper=stopper,
                       seed=cfg.project.seed * 1000 + fold * 100_000, ema=_ema(setup.model, t))
    compile_model(setup.model, t.compile)  # after the EMA copy: a compiled module's deepcopy would call the original
    total, trainable = count_parameters(model)
    log.info("[MODEL] fold=%d %s | pooling=%s | weights=%s | params=%.2fM (trainable %.2fM) | %s | "
             "train=%d valid=%d | batches/epoch=%d", fold, m.name, m.pooling, setup.weights, total / 1e6,
             trainable / 1e6, pre.describe(), len(train_loader.dataset), setup.n_valid, len(train_loader))
    last_path = run.ckpt("last", fold)
    if run.resumed and last_path.is_file():
        ckpt = load_checkpoint(last_path, device, hint=RESUME_HINT)
        state.load_state_dict(ckpt)
        _apply_new_lr(state, ckpt.get("config", {}).get("train", {}).get("lr"), t.lr, fold)
        task.load_state_dict(ckpt.get("task_state", {}))
        set_rng_state(ckpt["rng"])
        if ckpt.get("finished"):
            log.info("[RESUME] fold=%d already finished (%d epochs); skipped", fold, state.epoch)
            return _fold_result(fold, state, ckpt.get("time_s", 0.0))
        log.info("[RESUME] fold=%d from epoch %d of %d", fold, state.epoch, t.epochs)
    meta = {"fold": fold, "classes": data.classes, "preprocess": pre.to_dict(), "config": config_to_dict(cfg),
            "task": cfg.task, "vistrain_version": vistrain.__version__}
    fold_start = time.time() - (state.history[-1].get("fold_time_s", 0.0) if state.history else 0.0)

    def on_epoch_end(state: TrainState, row: dict[str, Any], outputs: torch.Tensor | None, improved: bool) -> None:
        row["fold_time_s"] = round(time.time() - fold_start, 3)
        if not info.is_main:
            return
        weights = {"model": state.eval_model().state_dict(), "epoch": state.epoch, "metrics": row, **meta}
        if improved:
            save_weights(weights, run.ckpt("best", fold))
            if setup.keep_valid_outputs and outputs is not None:
                write_npy(run / "oof" / f"fold{fold}_valid_logits.npy", outputs.numpy().astype(np.float32))
        _policy_checkpoints(run, fold, t, state.history, weights)  # before the last: a crash re-runs the epoch
        # meta carries "task" (the config's task name), so the task's own state (center-loss centers) has its key
        save_weights({**state.state_dict(), "task_state": task.state_dict(), "rng": rng_state(), "finished": False,
                     **meta}, last_path)
        run.append_metrics(row)
        trackers.log_epoch(row)
        if on_epoch is not None:
            on_epoch(row)
        log.info("[EPOCH] fold=%d epoch=%d/%d %s", fold, row["epoch"], t.epochs, " ".join(
            f"{k}={_fmt(k, v)}" for k, v in row.items() if k not in ("fold", "epoch", "fold_time_s") and v is not None))
        if improved:
            log.info("NEW_BEST fold=%d epoch=%d %s=%.4f -> %s", fold, state.epoch, t.monitor, row[t.monitor],
                     run.ckpt("best", fold).relative_to(run.path))

    opts = LoopOptions(device=device, precision=precision, grad_accum_steps=t.grad_accum_steps,
                       grad_clip_norm=t.grad_clip_norm, channels_last=t.channels_last is True,
                       log_interval=t.log_interval, batch_transform=_device_augment(cfg, pre, device),
                       progress=show_progress() and info.is_main, label=f"fold {fold}", row_prefix={"fold": fold},
                       dist=info, eval_every=t.eval_every_n_epochs)
    fit(state, task, train_loader, setup.valid_loader, t.epochs, opts, on_epoch_end)
    if state.stopper.should_stop:
        log.info("[EPOCH] fold=%d early stop after epoch %d: %s did not improve for %d %s (best %.4f at epoch %d)",
                 fold, state.epoch, t.monitor, t.early_stopping_patience,
                 "epochs" if t.eval_every_n_epochs == 1 else f"evaluations (every {t.eval_every_n_epochs} epochs)",
                 stopper.best, stopper.best_epoch)
    elapsed = time.time() - fold_start
    if info.is_main:
        save_weights({**state.state_dict(), "task_state": task.state_dict(), "rng": rng_state(), "finished": True,
                     "time_s": elapsed, **meta}, last_path)
    return _fold_result(fold, state, elapsed)


def _apply_new_lr(state: TrainState, old: float | None, new: float, fold: int) -> None:
    """A resumed fold whose ``train.lr`` was overridden (``--resume RUN train.lr=...``, e.g. after a divergence):
    the optimiser and scheduler state just loaded carry the old rate, so every learning rate they hold (the
    groups' current and initial rates, the scheduler's base and warm-up values) is scaled by new / old; the
    schedule's shape and position stay."""
    if old is None or old == new or old <= 0:
        return
    factor = new / old
    for group in state.optimizer.param_groups:
        for key in ("lr", "initial_lr"):
            if key in group:
                group[key] *= factor
    sched = state.scheduler
    sched.base_values = [v * factor for v in sched.base_values]
    if getattr(sched, "warmup_t", 0):
        sched.warmup_lr_init *= factor
        sched.warmup_steps = [(v - sched.warmup_lr_init) / sched.warmup_t for v in sched.base_values]
    log.warning("[RESUME] fold=%d train.lr %g -> %g: the optimiser's and scheduler's learning rates are scaled by "
                "%g from epoch %d on", fold, old, new, factor, state.epoch + 1)


def _device_augment(cfg: Config, pre: Preprocessor, device: torch.device) -> Any:
    """augment.device: cuda: the policy on whole uint8 batches on the device (``data.device_augment``)."""
    if cfg.augment.device != "cuda":
        return None
    from vistrain.data.device_augment import DeviceAugment

    return DeviceAugment(cfg.augment, pre).to(device)


def _policy_checkpoints(run: rundir.RunDir, fold: int, t: Any, history: list[dict[str, Any]],
                        weights: dict[str, Any]) -> None:
    """``train.save_every_n_epochs``: ``epoch{E}_fold{k}.pth``, kept. ``train.keep_best_k``: the K best evaluated
    epochs as ``top_epoch{E}_fold{k}.pth``; the ranking comes from ``history`` (in the last checkpoint, so a
    resumed run keeps it), and files of epochs pushed out of it (or left by a crash) are removed."""
    epoch = weights["epoch"]
    if t.save_every_n_epochs and epoch % t.save_every_n_epochs == 0:
        save_weights(weights, run.ckpt(f"epoch{epoch}", fold))
    if not t.keep_best_k or t.monitor not in history[-1]:
        return
    keep = best_epochs(history, t.monitor, t.keep_best_k)
    if epoch in keep:
        save_weights(weights, run.ckpt(f"top_epoch{epoch}", fold))
    for path in (run / "ckpt").glob(f"top_epoch*_fold{fold}.*"):
        found = re.fullmatch(rf"top_epoch(\d+)_fold{fold}\.(pth|safetensors)", path.name)
        if found and int(found.group(1)) not in keep:
            path.unlink()


def _ema(model: torch.nn.Module, t: Any) -> Any:
    if not t.ema:
        return None
    from timm.utils import ModelEmaV3

    # Warm-up: the effective decay grows with the step count, so short runs are not dominated by the
    # random initial weights.
    return ModelEmaV3(model, decay=t.ema_decay, use_warmup=True)


def _fold_result(fold: int, state: TrainState, elapsed: float) -> dict[str, Any]:
    best = next(r for r in state.history if r["epoch"] == state.stopper.best_epoch)
    metrics = {k: v for k, v in best.items() if k not in ("fold", "epoch", "lr", "time_s", "mem_MiB", "fold_time_s",
                                                          "img_per_s", "data_wait_frac")}
    return {"fold": fold, "best_epoch": state.stopper.best_epoch, "epochs_run": state.epoch,
            "stopped_early": state.stopper.should_stop, "best": metrics, "time_s": round(elapsed, 2)}


def _summarise(cfg: Config, run: rundir.RunDir, data: Prepared, results: list[dict[str, Any]], folds: list[int],
               device: torch.device, precision: dev.Precision, started: float, info: distributed.DistInfo
               ) -> dict[str, Any]:
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
        summary["oof"] = _write_oof(run, data)
    summary["timings"] = {"total_s": round(time.time() - started, 2),
                          "per_fold_s": {str(r["fold"]): r["time_s"] for r in results}}
    summary["environment"] = {"python": platform.python_version(), "torch": torch.__version__,
                              "timm": timm.__version__, "vistrain": vistrain.__version__,
                              "device": _device_name(device), "precision": precision.name, "processes": info.world,
                              "platform": platform.platform()}
    return summary


def _write_oof(run: rundir.RunDir, data: Prepared) -> dict[str, float]:
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


def _fmt(key: str, v: Any) -> str:
    if key in ("time_s", "mem_MiB", "img_per_s"):
        return f"{v:.1f}"
    if isinstance(v, float):
        return f"{v:.3e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
    return str(v)


def _fmt_summary(summary: dict[str, Any]) -> str:
    mon = summary["monitor"]
    out = f"{mon}={summary['mean'][mon]:.4f}±{summary['std'][mon]:.4f} over {len(summary['folds'])} fold(s)"
    if "oof" in summary:
        out += f" | oof macro_f1={summary['oof']['macro_f1']:.4f} accuracy={summary['oof']['accuracy']:.4f}"
    return out


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"

