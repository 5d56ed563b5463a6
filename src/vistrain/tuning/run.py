"""``vistrain tune`` (and ``train --optimize``): an Optuna study over config keys, with pruning.

Each trial is an ordinary ``run_train`` of the config with the sampled values applied as overrides, shorter
(``tune.epochs``, or a third of ``train.epochs``) and on ``tune.folds``. After every epoch the monitor metric is
reported to Optuna; the pruner stops trials that are clearly worse than the completed ones at the same epoch, never
during the learning-rate warm-up (``pruner_plan``). The objective, named after the monitor in the study
(``set_metric_names``), is the mean over the folds of each fold's best monitor value. When a trial ends, its run
directory keeps the checkpoints ``tune.keep_checkpoints`` says (best: a completed trial its best weights only). The
first trial is the config's own values (moved into the space), then every categorical choice once; a trial that
draws the values of a completed one reuses its result instead of training again.

``n_trials`` is always the study's total, not a count per process: a process stops once the study holds that many
trials that ran to an end (completed, pruned, or failed by an error). Sharing a study: processes (on one machine or
many) work on one study when they use the same storage URL (``--storage`` / ``tune.storage``) and the same study
name (``--study-name`` / ``tune.study_name`` / ``project.name``); two workers asked for 20 run 20, not 40, and a
process that joins a study already holding 20 ended trials runs none. A worker waits while the trials other workers
are running would reach the total, and a trial started at the same moment as the last one needed is not run (the
lower trial ID wins; recorded as failed, ``surplus``). Each worker beats an Optuna heartbeat (``tune.heartbeat_s``):
the trial of a worker that died (killed, a lost machine) is failed after three missed beats by the next worker that
looks, and another trial takes its place. SQLite is fine for processes on one machine; across machines use a
database server URL (``postgresql://...``, ``mysql://...``), since SQLite on a network file system does not lock
reliably. Each process writes its own tune directory (its trials' run directories and its reports); the reports
describe the whole shared study as far as it had got when that process ended, so the last process to finish has the
complete picture. Without ``--storage``, the study lives in ``<tune dir>/study.db`` and is private to one process.

Continuing (``train --config F --auto-continue``, ``continue_tune``): the newest tune directory of the same
resolved config whose study did not end, or whose best values have not been trained successfully (a finished
``train --optimize`` without ``--auto-continue``), is reopened; its study (storage and name from ``tune.json``)
runs the trials still missing of the ``n_trials`` it was started with (trials stopped by Ctrl-C, or left running
by a killed process in a private study, do not count and are recorded as failed, ``interrupted``), then the final
training runs, resuming an unfinished one of the best config.

Tune directory ``<output.exp_dir>/YYYYMMDD/<run_id>_tune/``: ``study.db`` (default storage), ``tune.log`` (ends
with ``[EXIT] TUNING SUCCESS code=0`` or the error, its traceback and ``[EXIT] TUNING ERROR code=N``),
``tune.json`` (status, study, best trial, the error; ``continued``: the final training's status),
``best_params.yaml``, ``trials.csv``, ``plots/*.png``,
``failed/trial_<n>.txt`` (the traceback of each failed trial) and ``trials/YYYYMMDD/<name>-trial<n>-.../``
(one ordinary run directory per trial).
"""

from __future__ import annotations

import gc
import logging
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vistrain.config.loader import config_to_dict, validate
from vistrain.config.schema import Config
from vistrain.engine import preemption
from vistrain.errors import ConfigError, UserError, describe, exit_code
from vistrain.tracking.files import atomic_write_text, write_json
from vistrain.tracking.logs import log_outcome
from vistrain.tracking.rundir import config_hash
from vistrain.tuning.space import Param, get_key, parse_space, with_values
from vistrain.tuning.study import (
    KEEP_NOTE,
    close_stale_trials,
    create_study,
    direction_of,
    first_line,
    new_tune_dir,
    rejoin_url,
    safe_url,
    state_counts,
    trim_checkpoints,
    tunes_of,
    update_tune_json,
    work_left,
    write_best_params,
    write_plots,
    write_trials_csv,
)

if TYPE_CHECKING:  # optuna is optional (and absent on some machines): imported inside the functions
    import optuna

log = logging.getLogger(__name__)



class _Surplus(Exception):
    """A shared study's trial that another worker's trial made unnecessary: failed without running."""


class TrialFailed(Exception):
    """A trial that crashed (out of memory, diverged, ...): recorded as failed while the study goes on."""


@dataclass
class TuneResult:
    tune_dir: Path
    study_name: str
    storage: str  # the URL, password hidden
    best_value: float
    best_params: dict[str, Any]  # dotted config key -> value
    best_trial: int
    monitor: str
    direction: str  # "maximize" | "minimize"
    counts: dict[str, int] = field(default_factory=dict)  # trial state -> number of trials in the study
    run_dir: Path | None = None  # the full training with the best parameters (auto_continue)
    study: Any = field(default=None, repr=False)  # the optuna.Study (the API's Study.study)


def trial_config(cfg: Config, values: dict[str, Any], tune_dir: Path, number: int) -> Config:
    """The config of one trial: shorter, no TensorBoard / W&B / log copies, runs under the tune directory,
    and the sampled values on top (a searched ``train.epochs`` wins over ``tune.epochs``)."""
    t = cfg.tune
    fixed = {
        "train.epochs": t.epochs or max(1, cfg.train.epochs // 3),
        "tracking.tensorboard": False,
        "tracking.wandb.enabled": False,
        "output.exp_dir": str(tune_dir / "trials"),
        "output.logs_dir": None,  # the trial's train.log is in its run directory already
        "project.name": f"{cfg.project.name}-trial{number}",  # run ids say which trial they belong to
    }
    return validate(with_values(with_values(config_to_dict(cfg), fixed), values))


def best_config(cfg: Config, params: dict[str, Any]) -> Config:
    """The config of the full training: the user's, with only the best values changed."""
    return validate(with_values(config_to_dict(cfg), params))


# ---------------------------------------------------------------------------------------------- the study

@dataclass
class _Context:
    """What every trial of one ``run_tune`` call shares."""

    cfg: Config
    params: list[Param]
    tune_dir: Path
    folds: list[int]
    epochs: int  # per trial and fold (for the global step)
    monitor: str
    n_trials: int  # the study's total of ended trials, over every process working on it (continuing: as started)
    shared: bool  # storage given by the user (others may work on the study), not the tune directory's own
    done_before: int | None = None  # trials of the study that had ended when this tune directory started it


class _Reporter:
    """What the trial's ``engine.hooks.Reporter`` hook calls with each metrics row: reports the monitor to Optuna
    and prunes (the engine itself knows nothing of Optuna)."""

    def __init__(self, trial: optuna.Trial, ctx: _Context):
        self.trial, self.ctx = trial, ctx

    def __call__(self, row: dict[str, Any]) -> None:
        import optuna

        if self.ctx.monitor not in row:  # an epoch without validation (train.eval_every_n_epochs)
            return
        value = float(row[self.ctx.monitor])
        # Step = position of (fold, epoch) in the trial, so every trial reports the same step for the same
        # fold and epoch even when early stopping ends a fold sooner.
        step = self.ctx.folds.index(row["fold"]) * self.ctx.epochs + int(row["epoch"])
        self.trial.report(value, step)
        if self.trial.should_prune():
            self.trial.set_user_attr("pruned_at", {"fold": row["fold"], "epoch": row["epoch"], "step": step})
            log.info("[TUNE] trial %d pruned at fold %d epoch %d: %s=%.4f is worse than the completed trials "
                     "at this step", self.trial.number, row["fold"], row["epoch"], self.ctx.monitor, value)
            pruned = optuna.TrialPruned(f"{self.ctx.monitor}={value:.4f} at step {step}")
            pruned.run_status = "pruned"  # the trial's run.json says so, not "error"
            raise pruned


def _objective(ctx: _Context) -> Callable[[optuna.Trial], float]:
    def objective(trial: optuna.Trial) -> float:
        import optuna

        from vistrain.engine.hooks import Reporter
        from vistrain.engine.training import run_train

        if ctx.shared:
            _refuse_surplus(trial, ctx.n_trials)
        values = {p.key: p.suggest(trial) for p in ctx.params}
        repeated = _completed_twin(trial, values)
        if repeated is not None:
            # Training is seeded, so the same values give the same result (up to GPU non-determinism):
            # small categorical spaces would otherwise retrain identical configs.
            trial.set_user_attr("repeat_of", repeated.number)
            for step, value in sorted(repeated.intermediate_values.items()):
                trial.report(value, step)  # its curve too, for the pruner's medians and the plots
            log.info("[TUNE] trial %d repeats trial %d's values: its value is reused, nothing is trained",
                     trial.number, repeated.number)
            return float(repeated.value)
        log.info("[TUNE] trial %d started: %s", trial.number, _fmt_params(values))
        try:
            trial_cfg = trial_config(ctx.cfg, values, ctx.tune_dir, trial.number)
            result = run_train(trial_cfg, folds=ctx.folds, hooks=[Reporter(_Reporter(trial, ctx))])
        except optuna.TrialPruned:
            _record_run_dir(trial, ctx)
            _trim(trial, ctx, "pruned")
            raise
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)  # not a result: a continued study runs it again
            raise
        except Exception as err:
            _record_failure(trial, ctx, err)
            _trim(trial, ctx, "failed")
            if isinstance(err, UserError):
                raise  # a mistake in the config fails every trial alike: stop the study now
            raise TrialFailed(trial.user_attrs.get("fail_reason", "")) from err
        trial.set_user_attr("run_dir", str(result.run_dir))
        _trim(trial, ctx, "completed")
        return float(result.summary["mean"][ctx.monitor])

    return objective


def _refuse_surplus(trial: optuna.Trial, n_trials: int) -> None:
    """Shared study: two workers may start a trial at the same moment when one more was needed; the one with the
    higher trial ID (IDs are unique across workers, numbers too but read later) is not run."""
    from optuna.trial import TrialState

    ahead = sum(t._trial_id < trial._trial_id and (t.state == TrialState.RUNNING or _counts(t))
                for t in trial.study.get_trials(deepcopy=False))
    if ahead >= n_trials:
        trial.set_user_attr("surplus", True)
        raise _Surplus(f"the study already holds {n_trials} trial(s) ended or running")


def _completed_twin(trial: optuna.Trial, values: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """A completed trial of the study with exactly these values (small categorical spaces repeat often)."""
    from optuna.trial import TrialState

    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == values:
            return other
    return None


def _record_run_dir(trial: optuna.Trial, ctx: _Context) -> None:
    prefix = f"{ctx.cfg.project.name}-trial{trial.number}-"
    found = sorted((ctx.tune_dir / "trials").glob(f"*/{prefix}*"))
    if found:
        trial.set_user_attr("run_dir", str(found[-1]))


def _trim(trial: optuna.Trial, ctx: _Context, how: str) -> None:
    """``tune.keep_checkpoints`` applied to the run directory of a trial that has ended ``how``."""
    run_dir = trial.user_attrs.get("run_dir")
    if run_dir is None:
        return
    files, size = trim_checkpoints(Path(run_dir), ctx.cfg.tune.keep_checkpoints, completed=how == "completed")
    if files:
        log.info("[TUNE] trial %d %s: %d checkpoint file(s) deleted (%.1f MB; tune.keep_checkpoints=%s)",
                 trial.number, how, files, size / 2**20, ctx.cfg.tune.keep_checkpoints)


def _record_failure(trial: optuna.Trial, ctx: _Context, err: BaseException) -> None:
    """The reason as a user attribute (in trials.csv) and the traceback as a file in the tune directory."""
    first = str(err).splitlines()[0] if str(err) else ""
    reason = f"{type(err).__name__}: {first}"[:500]
    trial.set_user_attr("fail_reason", reason)
    _record_run_dir(trial, ctx)
    path = ctx.tune_dir / "failed" / f"trial_{trial.number}.txt"
    atomic_write_text(path, "".join(traceback.format_exception(err)))
    log.warning("[TUNE] trial %d failed: %s (traceback in %s)", trial.number, reason, path)


def _after_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: one summary line per finished trial, and device memory back before the next one."""
    torch = sys.modules.get("torch")  # only when a trial used it: the study itself never needs torch
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
    if trial.user_attrs.get("surplus"):
        log.info("[TUNE] trial %d not run: another worker's trial completed the study at the same moment",
                 trial.number)
        return
    state = trial.state.name
    # A pruned trial's value is its last report, not an objective value.
    label = "last report" if state == "PRUNED" else "value"
    value = f" {label}={trial.value:.4f}" if trial.value is not None else ""
    try:
        best = f" | best so far: trial {study.best_trial.number} value={study.best_value:.4f}"
    except ValueError:  # no completed trial yet
        best = ""
    log.info("[TUNE] trial %d %s%s | %s%s", trial.number, state, value, _fmt_params(trial.params), best)


def _fmt_params(values: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


@dataclass(frozen=True)
class PrunerPlan:
    """When the pruner may stop a trial: after ``startup`` completed trials, from epoch ``first_epoch`` of a trial."""

    startup: int  # completed trials the median pruner waits for (one lucky or unlucky trial must not set the bar)
    first_epoch: int  # the first epoch (= step) whose report may prune a trial

    def line(self, name: str, warmup_epochs: float, epochs: int) -> str:
        if name == "none":
            return "pruner=none: every trial runs all its epochs"
        after = f"once {self.startup} trial(s) have completed, " if name == "median" else ""
        return (f"pruner={name}: {after}a trial may be stopped from epoch {self.first_epoch} of {epochs} on "
                f"(train.warmup_epochs={warmup_epochs:g}: no pruning during the learning-rate warm-up)")


def pruner_plan(n_trials: int, warmup_epochs: float, epochs: int) -> PrunerPlan:
    """Defaults that let a study learn. During the learning-rate warm-up every trial scores near chance, so a
    report from it says nothing about the values tried: no trial is stopped before the first epoch after the
    warm-up, nor in the first third of the epochs after it. The median of one or two completed trials is a noisy
    bar, so the median pruner waits for a quarter of the study's trials (2 to 10; Optuna's own default, 5, at
    the default 20 trials)."""
    warm = math.ceil(warmup_epochs)  # the epochs the warm-up touches (it may end within one)
    first = max(1, min(epochs, warm + max(1, math.ceil((epochs - warm) / 3))))
    return PrunerPlan(startup=min(10, max(2, n_trials // 4)), first_epoch=first)


def _pruner(cfg: Config, plan: PrunerPlan, total_steps: int) -> optuna.pruners.BasePruner:
    import optuna

    name = cfg.tune.pruner
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=plan.first_epoch, max_resource=max(total_steps, 1),
                                              reduction_factor=3)
    if name == "median":
        # Steps are 1-based epochs (see _Reporter): a report at a step below n_warmup_steps never prunes.
        return optuna.pruners.MedianPruner(n_startup_trials=plan.startup, n_warmup_steps=plan.first_epoch)
    return optuna.pruners.NopPruner()


def _initial_trials(cfg: Config, params: list[Param], n_trials: int) -> list[dict[str, Any]]:
    """Trial 0 is the config itself (each value moved to the nearest allowed one): the baseline the search
    must beat. Then each categorical choice the baseline did not use is tried once, so a small study sees
    every choice before the sampler takes over. At most ``n_trials`` in all."""
    base = config_to_dict(cfg)
    baseline = {p.key: p.project(get_key(base, p.key)) for p in params}
    rest = {p.key: [c for c in p.choices if c != baseline[p.key]] for p in params if p.type == "categorical"}
    rest = {k: v for k, v in rest.items() if v}
    extra = [{k: v[i % len(v)] for k, v in rest.items()} for i in range(max(map(len, rest.values()), default=0))]
    return ([baseline] + extra)[:n_trials]


class _InitialDesign:
    """Enqueues the initial trials one at a time, each only when another trial will surely run: a study
    stopped early (an error, the timeout) leaves no queued trial behind for nobody to run."""

    def __init__(self, trials: list[dict[str, Any]], n_trials: int, timeout: float | None):
        self.pending, self.left = list(trials), n_trials
        self.deadline = time.monotonic() + timeout if timeout else math.inf

    def enqueue_next(self, study: optuna.Study) -> None:
        if self.pending and self.left > 0 and time.monotonic() < self.deadline:
            # skip_if_exists: another worker may have tried these values already.
            study.enqueue_trial(self.pending.pop(0), skip_if_exists=True)

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        """Optuna callback, after each trial of this process."""
        self.left -= 1
        self.enqueue_next(study)


@contextmanager
def _tune_logging(path: Path) -> Iterator[None]:
    """Console lines as for ``train``, plus ``tune.log`` with the study's own lines only (each trial's
    epochs are in its run directory's train.log)."""
    from vistrain.tracking.logs import LOGGER, console_logging

    console_logging()
    logger = logging.getLogger(LOGGER)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.addFilter(lambda r: r.name in (__name__, "vistrain.tuning.study", "vistrain.engine.autobatch"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's own per-trial lines (and a traceback per failed trial) would duplicate ours."""
    import optuna

    before = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(before)


# --------------------------------------------------------------------------------------------- run_tune

def _require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise UserError("tune: needs Optuna; install it with: pip install 'vistrain[tune]'") from None


def _check_folds(cfg: Config) -> None:
    bad = [k for k in cfg.tune.folds if k >= cfg.data.folds]
    if bad:
        raise ConfigError([f"tune.folds: {bad[0]} is not a fold of data.folds={cfg.data.folds}; "
                           f"valid: 0..{cfg.data.folds - 1}"])


def run_tune(cfg: Config, n_trials: int | None = None, storage: str | None = None, study_name: str | None = None,
             timeout: float | None = None, auto_continue: bool = False, config_path: Path | None = None,
             folds: list[int] | None = None, use_calibration: bool = False, full_pipeline: bool = False
             ) -> TuneResult:
    """Run (or join) a study and write the tune directory; with ``auto_continue``, then train the config with
    the best values (on ``folds``, default ``data.valid_fold``; calibrated with ``use_calibration``, predicting
    the test images with ``full_pipeline``) and record where they came from.

    Arguments given here win over ``tune.*``. A crashed trial is recorded as failed and the study goes on;
    a ``UserError`` (a mistake in the config or data) stops it at once.
    """
    _require_optuna()
    params = parse_space(cfg)
    _check_folds(cfg)
    t = cfg.tune
    study_name = study_name or t.study_name or cfg.project.name
    storage = storage or t.storage
    tune_dir = new_tune_dir(cfg)
    storage_url = storage or f"sqlite:///{(tune_dir / 'study.db').resolve()}"
    ctx = _context(cfg, params, tune_dir, n_trials or t.n_trials, shared=storage is not None)
    final = FinalRun(config_path, folds, use_calibration, full_pipeline) if auto_continue else None
    with _tune_logging(tune_dir / "tune.log"), _quiet_optuna():
        for flag, used in (("--use-calibration", use_calibration), ("--mode full-pipeline", full_pipeline)):
            if used and final is None:
                log.info("[TUNE] %s applies to the run that --auto-continue trains; without it the study only "
                         "searches (vistrain calibrate / predict RUN do the same for any run)", flag)
        return _run_study(ctx, storage_url, study_name, timeout or t.timeout, final)


def continue_tune(cfg: Config, config_path: Path | None = None, folds: list[int] | None = None,
                  use_calibration: bool = False, full_pipeline: bool = False) -> TuneResult:
    """``train --auto-continue``: the newest study of this config that did not succeed (or whose full training
    did not), in its own tune directory and storage: the trials still missing up to the ``n_trials`` it was
    started with, then the full training with the best values (resuming that training if it was interrupted)."""
    _require_optuna()
    params = parse_space(cfg)
    _check_folds(cfg)
    tune_dir, info = _study_to_continue(cfg)
    ctx = _context(cfg, params, tune_dir, int(info["n_trials"]), shared=bool(info.get("shared")),
                   done_before=int(info.get("done_before", 0)))
    final = FinalRun(config_path, folds, use_calibration, full_pipeline, resume=True)
    with _tune_logging(tune_dir / "tune.log"), _quiet_optuna():
        if info.get("status") == "success":
            log.info("[TUNE] continuing study '%s' of %s: its %s trial(s) have ended; its best values are trained "
                     "now", info.get("study_name"), tune_dir, info["n_trials"])
        else:
            log.info("[TUNE] continuing the unfinished study of %s (status %s)", tune_dir, info.get("status"))
        return _run_study(ctx, rejoin_url(info, cfg, tune_dir), info["study_name"], cfg.tune.timeout, final)


def _study_to_continue(cfg: Config) -> tuple[Path, dict[str, Any]]:
    """The newest study of this config with work left (trials, or the full training of its best values)."""
    studies = tunes_of(cfg)
    for tune_dir, info in studies:
        if work_left(info):
            return tune_dir, info
    if not studies:
        raise UserError(f"--auto-continue: no study of this config under {cfg.output.exp_dir}; start one with "
                        "--optimize (train --config F --optimize --auto-continue)")
    tune_dir, info = studies[0]
    raise UserError(f"--auto-continue: nothing left to continue: the newest study of this config ({tune_dir}) has "
                    f"ended and its best values were trained in {(info.get('continued') or {}).get('run_dir')}; "
                    "start a new study with --optimize")


@dataclass
class FinalRun:
    """``--auto-continue``: the full training with the best values, after the study."""

    config_path: Path | None = None
    folds: list[int] | None = None
    use_calibration: bool = False
    full_pipeline: bool = False
    resume: bool = False  # continue an unfinished run of the best config (when continuing a study)


def _context(cfg: Config, params: list[Param], tune_dir: Path, n_trials: int, shared: bool,
             done_before: int | None = None) -> _Context:
    t = cfg.tune
    # run_train trains one model (fold 0) for these, whatever tune.folds says; the trial steps must agree
    folds = [0] if cfg.task == "embedding" or cfg.data.split == "ratio" else list(t.folds)
    return _Context(cfg, params, tune_dir, folds, t.epochs or max(1, cfg.train.epochs // 3),
                    cfg.train.monitor, n_trials, shared, done_before)


def _run_study(ctx: _Context, storage_url: str, study_name: str, timeout: float | None, final: FinalRun | None
               ) -> TuneResult:
    """The study (what is left of it), its reports, then the final training; ``tune.log`` ends with the
    outcome and ``tune.json`` records an error. SIGTERM / SIGUSR1 stop it as Ctrl-C does (the trial in progress is
    recorded as interrupted, and a continued study runs it again), with exit code 143 or
    ``train.requeue_exit_code``."""
    result = None
    with preemption.handle_signals(ctx.cfg.train.requeue_exit_code):
        try:
            study = _start(ctx, storage_url, study_name)
            # A shared study's n_trials is its total; a private one's counts from when this tune directory began.
            left = ctx.n_trials - (_done(study) - (0 if ctx.shared else ctx.done_before or 0))
            if left > 0:
                _optimize(ctx, study, left, timeout)
            else:
                log.info("[TUNE] the %d trial(s) asked for are done", ctx.n_trials)
            result = _finish(ctx, study, storage_url)
            if final is not None:
                result.run_dir = _continue(ctx, result, final)
        except BaseException as err:
            log_outcome(log, "TUNING", err)
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "error"
            failure = {"status": status, "error": describe(err), "exit_code": exit_code(err)}
            _safe(update_tune_json, ctx.tune_dir, {"continued": failure} if result is not None else failure)
            raise
    log_outcome(log, "TUNING")
    return result


def _done(study: optuna.Study) -> int:
    """Trials of the study that ran to an end: completed, pruned or failed by an error (not those Ctrl-C, a lost
    process or a heartbeat stopped, nor a shared study's surplus: a continued study runs those again)."""
    return sum(_counts(t) for t in study.get_trials(deepcopy=False))


def _counts(t: optuna.trial.FrozenTrial) -> bool:
    from optuna.trial import TrialState

    # Only _record_failure sets fail_reason: a failure the training itself reported.
    return t.state in (TrialState.COMPLETE, TrialState.PRUNED) or (
        t.state == TrialState.FAIL and "fail_reason" in t.user_attrs and not t.user_attrs.get("interrupted"))


def _start(ctx: _Context, storage_url: str, study_name: str) -> optuna.Study:
    """Create or join the study and log what it searches."""
    cfg = ctx.cfg
    direction = direction_of(ctx.monitor)
    plan = pruner_plan(ctx.n_trials, cfg.train.warmup_epochs, ctx.epochs)
    study = create_study(cfg, storage_url, study_name, direction, ctx.shared,
                         _pruner(cfg, plan, ctx.epochs * len(ctx.folds)), ctx.monitor)
    if not ctx.shared:
        close_stale_trials(storage_url, study)
    if ctx.done_before is None:
        ctx.done_before = _done(study)
    _write_status(ctx, study, storage_url, "running")
    ended = _done(study)
    log.info("[TUNE] study '%s' in %s | %s %s | %d trial(s) in the study in all, by every process working on it "
             "(%d ended so far, %d left) | epochs per trial=%d | folds=%s | dir=%s", study_name,
             safe_url(storage_url), direction, ctx.monitor, ctx.n_trials, ended, max(0, ctx.n_trials - ended),
             ctx.epochs, ctx.folds, ctx.tune_dir)
    log.info("[TUNE] %s", plan.line(cfg.tune.pruner, cfg.train.warmup_epochs, ctx.epochs))
    log.info("[TUNE] space: %s", " | ".join(_fmt_param(p) for p in ctx.params))
    log.info("[TUNE] checkpoints: tune.keep_checkpoints=%s (%s)", cfg.tune.keep_checkpoints,
             KEEP_NOTE[cfg.tune.keep_checkpoints])
    return study


def _fmt_param(p: Param) -> str:
    if p.type == "categorical":
        return f"{p.key} in {list(p.choices)}"
    extra = (" log" if p.log else "") + (f" step {p.step}" if p.step else "")
    return f"{p.key} {p.type} {p.low}..{p.high}{extra}"


def _optimize(ctx: _Context, study: optuna.Study, n_trials: int, timeout: float | None) -> None:
    """The trials; trials.csv is written even when the study stops on an error or Ctrl-C."""
    # Only the process that opens an empty study seeds it with the initial trials.
    first = _initial_trials(ctx.cfg, ctx.params, n_trials) if not study.get_trials(deepcopy=False) else []
    design = _InitialDesign(first, n_trials, timeout)
    try:
        if ctx.shared:
            _optimize_shared(ctx, study, design, timeout)
        else:
            design.enqueue_next(study)
            study.optimize(_objective(ctx), n_trials=n_trials, timeout=timeout, catch=(TrialFailed, _Surplus),
                           callbacks=[_after_trial, design], gc_after_trial=True)
    except BaseException:
        _safe(write_trials_csv, ctx.tune_dir / "trials.csv", study)
        raise
    finally:
        gc.collect()


def _optimize_shared(ctx: _Context, study: optuna.Study, design: _InitialDesign, timeout: float | None) -> None:
    """One trial at a time until the study holds ``n_trials`` ended trials, waiting while other workers' running
    trials would make up the rest (one of them may die: its heartbeat then lapses and it is failed here)."""
    import optuna
    from optuna.trial import TrialState

    deadline = time.monotonic() + timeout if timeout else math.inf
    objective, waiting = _objective(ctx), False
    while time.monotonic() < deadline:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done, running = sum(_counts(t) for t in trials), sum(t.state == TrialState.RUNNING for t in trials)
        if done >= ctx.n_trials:
            log.info("[TUNE] the study holds its %d trial(s)", ctx.n_trials)
            return
        if done + running >= ctx.n_trials:
            if not waiting:
                log.info("[TUNE] %d trial(s) running in other workers would complete the study's %d: waiting for "
                         "them (a dead worker's trial is failed after %d s without a heartbeat)", running,
                         ctx.n_trials, 3 * ctx.cfg.tune.heartbeat_s)
            waiting = True
            time.sleep(min(2.0, ctx.cfg.tune.heartbeat_s / 2))
            continue
        waiting = False
        # The next initial trial is queued only now, right before this worker runs a trial (which takes it unless
        # another worker does first): queued after a trial, it could be left waiting in a study already complete.
        if not any(t.state == TrialState.WAITING for t in trials):
            design.enqueue_next(study)
        study.optimize(objective, n_trials=1, catch=(TrialFailed, _Surplus), callbacks=[_after_trial],
                       gc_after_trial=True)
    log.info("[TUNE] tune.timeout reached")


def _safe(func: Callable[..., Any], *args: Any) -> None:
    """A report written on the way out of an error must not hide that error."""
    try:
        func(*args)
    except Exception as err:  # noqa: BLE001
        log.warning("[TUNE] could not write %s: %s", getattr(func, "__name__", func), first_line(err))


def _finish(ctx: _Context, study: optuna.Study, storage_url: str) -> TuneResult:
    from optuna.trial import TrialState

    write_trials_csv(ctx.tune_dir / "trials.csv", study)
    write_plots(study, ctx.tune_dir / "plots")
    counts = state_counts(study)
    if not study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        summary = ", ".join(f"{n} {s.lower()}" for s, n in counts.items())
        raise UserError(f"tune: no trial of study '{study.study_name}' completed ({summary}); the reasons are in "
                        f"{ctx.tune_dir / 'trials.csv'} (column user_attrs_fail_reason)")
    write_best_params(ctx.tune_dir / "best_params.yaml", study, ctx.monitor, storage_url)
    best = study.best_trial
    result = TuneResult(ctx.tune_dir, study.study_name, safe_url(storage_url), float(best.value), dict(best.params),
                        best.number, ctx.monitor, study.direction.name.lower(), counts, study=study)
    _write_status(ctx, study, storage_url, "success")
    log.info("[TUNE] done: %s | best trial %d %s=%.4f | %s | %s", ", ".join(f"{n} {s}" for s, n in counts.items()),
             best.number, ctx.monitor, best.value, _fmt_params(best.params), ctx.tune_dir / "best_params.yaml")
    return result


def _write_status(ctx: _Context, study: optuna.Study, storage_url: str, status: str) -> None:
    """tune.json: the study's state, and what ``train --auto-continue`` needs to rejoin it (the config's hash,
    the storage, the trials asked for)."""
    info: dict[str, Any] = {"status": status, "updated": datetime.now().isoformat(timespec="seconds"),
                            "study_name": study.study_name, "storage": safe_url(storage_url), "shared": ctx.shared,
                            "config_hash": config_hash(ctx.cfg), "n_trials": ctx.n_trials,
                            "done_before": ctx.done_before, "monitor": ctx.monitor,
                            "direction": study.direction.name.lower(), "trials": state_counts(study),
                            "command": sys.argv, "error": None, "exit_code": None}
    try:
        best = study.best_trial
        info["best"] = {"trial": best.number, "value": best.value, "params": best.params}
    except ValueError:
        pass
    update_tune_json(ctx.tune_dir, info)


def _continue(ctx: _Context, result: TuneResult, final: FinalRun) -> Path:
    """The full training with the best values; ``tuned_from.json`` in its run directory says where they
    came from."""
    from vistrain.engine.training import run_train

    best_cfg = best_config(ctx.cfg, result.best_params)
    log.info("[TUNE] auto-continue: full training with the best values of study '%s': trial %d, %s=%.4f: %s%s",
             result.study_name, result.best_trial, result.monitor, result.best_value, _fmt_params(result.best_params),
             " (then calibrated)" if final.use_calibration else "")
    update_tune_json(ctx.tune_dir, {"continued": {"status": "running"}})
    run = run_train(best_cfg, folds=final.folds, config_path=final.config_path, resume=final.resume,
                    use_calibration=final.use_calibration, full_pipeline=final.full_pipeline)
    write_json(run.run_dir / "tuned_from.json", {
        "tune_dir": str(result.tune_dir), "study_name": result.study_name, "storage": result.storage,
        "best_trial": result.best_trial, "best_value": result.best_value, "monitor": result.monitor,
        "direction": result.direction, "params": result.best_params,
    })
    update_tune_json(ctx.tune_dir, {"continued": {"status": "success", "run_dir": str(run.run_dir)}})
    log.info("[TUNE] full training done: %s (tuned_from.json records the study)", run.run_dir)
    return run.run_dir
