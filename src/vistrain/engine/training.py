"""``vistrain train``: data -> run directory -> the Trainer's folds -> summary -> final steps, in one run directory.

The training itself (folds, epochs, checkpoints, early stopping, EMA, metrics rows) is ``engine/trainer.py`` and its
hooks; this verb checks, prepares, opens the run, runs the Trainer, summarises and records how the run ended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vistrain.config.loader import mode_info
from vistrain.config.schema import Config
from vistrain.data.albu import check_pipeline
from vistrain.data.cache import on_this_machine
from vistrain.data.manifest import build_manifest
from vistrain.data.prepare import Prepared, prepare_data
from vistrain.data.sources import require_dir
from vistrain.engine import distributed, preemption
from vistrain.engine.hooks import Hook
from vistrain.engine.hooks.metrics import open_trackers
from vistrain.engine.run_setup import (
    check_domain_monitor,
    log_boot,
    log_config,
    log_data,
    resolve_auto,
    setup_machine,
    training_folds,
    write_run_files,
)
from vistrain.engine.summary import summarise, summary_line, write_summary
from vistrain.engine.trainer import Trainer
from vistrain.errors import UserError, describe, exit_code
from vistrain.fallbacks import Fallbacks
from vistrain.models.backbone import check_model_name
from vistrain.models.init import require_source
from vistrain.tracking import rundir
from vistrain.tracking.files import StorageError, write_json
from vistrain.tracking.logs import log_outcome, run_logging

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict[str, Any]


def run_train(cfg: Config, *, resume: bool | Path = False, fresh: bool = False, folds: list[int] | None = None,
              config_path: Path | None = None, use_calibration: bool = False, full_pipeline: bool = False,
              hooks: Sequence[Hook] = (), strict: bool = False) -> RunResult:
    """One training run; returns its directory and summary. ``folds`` overrides ``data.valid_fold``.

    ``use_calibration`` fits a temperature afterwards; ``full_pipeline`` then predicts ``data.image_dir_test``
    into ``RUN/submission.csv`` (in ``data.sample_csv`` order when given). ``hooks`` run in every fold after the
    default ones (``tune`` reports each metrics row and prunes there: ``engine.hooks.Reporter``). ``strict``: a
    fallback (torch.compile -> eager, bf16 on a CPU; summary.json's ``fallbacks``) is an error instead.
    """
    check_final_steps(cfg, use_calibration, full_pipeline)
    folds = training_folds(cfg, folds)
    check_model_name(cfg.model.name)  # before the run directory: a typo must not leave an error run behind
    require_source(cfg.model.init_from, "model.init_from")
    require_source(cfg.model.pretrained_path, "model.pretrained_path")
    check_pipeline(cfg.augment, cfg.train.img_size)  # augment.albumentations' file
    info = distributed.init_distributed()
    fallbacks = Fallbacks(strict)
    run: rundir.RunDir | None = None
    # SIGTERM / SIGUSR1 (preemption): training stops after its current step with a checkpoint, the run "interrupted"
    try:
        with preemption.handle_signals(cfg.train.requeue_exit_code):
            data = distributed.from_main(info, lambda: prepare_data(cfg))
            if data.cache is not None and info.enabled:  # a disk cache on a machine-local disk: one per machine
                data.cache = distributed.node_first(info, partial(on_this_machine, data.cache))
            check_domain_monitor(cfg, data, folds)
            run = distributed.from_main(info, lambda: rundir.open_run(cfg, resume, fresh, folds))
            if not info.is_main:  # rank 0 writes everything; the others train their share and stay quiet
                run.locked = False  # the lock is rank 0's
                with run_logging([], console=False):
                    return RunResult(run.path, _train_run(cfg, run, data, folds, config_path, hooks, info, fallbacks))
            return _main_rank(cfg, run, data, folds, config_path, use_calibration, full_pipeline, hooks, info,
                              fallbacks)
    finally:
        if run is not None:
            rundir.release_lock(run)
        distributed.shutdown(info)


def check_final_steps(cfg: Config, use_calibration: bool, full_pipeline: bool) -> None:
    """What ``--use-calibration`` and ``--mode full-pipeline`` need after training, checked before it."""
    if use_calibration and cfg.task != "classification":
        raise UserError(f"--use-calibration: temperature scaling is for classifiers; this config has task: {cfg.task}")
    if full_pipeline:
        require_dir(cfg.data.image_dir_test, "data.image_dir_test")


def _main_rank(cfg: Config, run: rundir.RunDir, data: Prepared, folds: list[int], config_path: Path | None,
               use_calibration: bool, full_pipeline: bool, hooks: Sequence[Hook], info: distributed.DistInfo,
               fallbacks: Fallbacks) -> RunResult:
    log_files = [run / "train.log"]
    if cfg.output.logs_dir is not None:
        log_files.append(cfg.output.logs_dir / f"run_{time.strftime('%Y%m%d-%H%M')}_{run.run_id}.log")
    with run_logging(log_files):
        for note in run.notes:
            log.info(note)
        try:
            summary = _train_run(cfg, run, data, folds, config_path, hooks, info, fallbacks)
            if use_calibration:
                from vistrain.engine.calibration import run_calibrate

                summary["calibration"] = run_calibrate(run.path)
            if data.ratio_split and (data.items["split"] == "test").any():
                _evaluate_test(run, summary)
            if full_pipeline:
                from vistrain.engine.prediction import run_predict

                run_predict(run.path, cfg.data.image_dir_test, output=run / "submission.csv",
                            sample=cfg.data.sample_csv)
            from vistrain.viz.report import write_report

            run.set_status("success", summary="summary.json", error=None, exit_code=None)  # a resumed failure's too
            # After the status: the page shows run.json's status as it stays (a failure here sets "error" again).
            log.info("[DONE] report: %s", write_report(run.path))
        except BaseException as err:
            status = _stopped_status(err)
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


def _train_run(cfg: Config, run: rundir.RunDir, data: Prepared, folds: list[int], config_path: Path | None,
               hooks: Sequence[Hook], info: distributed.DistInfo, fallbacks: Fallbacks) -> dict[str, Any]:
    started = time.time()
    mode = mode_info(cfg)
    if run.resumed:  # config.yaml, then every earlier resume's changes, then this command's key=value overrides
        cfg = distributed.from_main(info, lambda: rundir.effective_config(cfg, run))
    machine = setup_machine(cfg, data, info, fallbacks)
    log_boot(machine, info, run, mode)
    cfg = distributed.from_main(info, lambda: resolve_auto(cfg, machine, len(data.classes), data.cache is not None,
                                                           info.world))
    log_config(cfg)
    if info.is_main:
        write_run_files(cfg, run, data, config_path)
        write_json(run / "manifest.json", build_manifest(cfg, data))
        log_data(cfg, data, folds, run)
    with open_trackers(cfg, run, info) as trackers:
        results = Trainer(cfg, data, run, machine, info, trackers, hooks, fallbacks).fit(folds)
        summary = summarise(cfg, run, data, results, folds, machine, started, info, fallbacks)
        if info.is_main:
            write_summary(run, summary, trackers)
    log.info("[DONE] run=%s | %s", run.path, summary_line(summary))
    return summary


def _evaluate_test(run: rundir.RunDir, summary: dict[str, Any]) -> None:
    """A ratio split's test items, scored by the best model into RUN/eval/test/ (as ``evaluate RUN --split test``)
    and recorded in summary.json under ``test``."""
    from vistrain.engine.evaluation import run_evaluate

    metrics = run_evaluate(run.path, "test", echo=False)
    summary["test"] = {k: v for k, v in metrics.items() if k not in ("split", "folds", "overrides")}
    write_json(run / "summary.json", summary)
    log.info("[DONE] test split: n=%d top1=%.4f macro_f1=%.4f -> %s", metrics["n"], metrics["top1"],
             metrics["macro_f1"], run / "eval" / "test")


def _stopped_status(err: BaseException) -> str:
    """run.json's status for a run that ended by ``err``: what the code that stopped it set on it (``run_status``:
    "diverged" by the divergence guard, "pruned" by ``tune``, "interrupted" by a preemption signal), "interrupted"
    for Ctrl-C, else "error"."""
    status = getattr(err, "run_status", None)
    if isinstance(status, str):
        return status
    return "interrupted" if isinstance(err, KeyboardInterrupt) else "error"
