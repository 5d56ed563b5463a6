"""Where a tuning study lives and what it leaves behind: the storage (SQLite or a database server), the tune
directory, ``best_params.yaml``, ``trials.csv`` and the study's plots. Used by ``tuning/run.py``."""

from __future__ import annotations

import io
import json
import logging
import re
import secrets
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vistrain.config.schema import Config
from vistrain.errors import UserError
from vistrain.registry import higher_is_better
from vistrain.tracking.files import atomic_write_bytes, atomic_write_text, write_csv, write_json
from vistrain.tracking.rundir import config_hash
from vistrain.tuning.space import nest

if TYPE_CHECKING:  # optuna is optional (and absent on some machines): imported inside the functions
    import optuna

log = logging.getLogger(__name__)

PLOTS = ("optimization_history", "intermediate_values", "param_importances", "parallel_coordinate")
SQLITE_LOCK_TIMEOUT_S = 120  # concurrent workers wait this long for SQLite's write lock instead of failing

# ------------------------------------------------------------------------------------------------ storage

def safe_url(url: str) -> str:
    """The storage URL with any password hidden (it goes into logs and files)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL sqlalchemy knows: show it as given
        return url


def open_storage(url: str, attempts: int = 5, heartbeat_s: int | None = None) -> optuna.storages.BaseStorage:
    """An RDB storage; SQLite waits for the write lock, and opening is retried because several workers
    starting at once race to create the tables. ``heartbeat_s``: running trials beat every so many seconds and
    one silent for three beats is failed (a shared study's dead worker)."""
    import optuna

    kwargs: dict[str, Any] = {"connect_args": {"timeout": SQLITE_LOCK_TIMEOUT_S}} if url.startswith("sqlite") \
        else {"pool_pre_ping": True}
    for attempt in range(1, attempts + 1):
        try:
            beat = {"heartbeat_interval": heartbeat_s, "grace_period": 3 * heartbeat_s} if heartbeat_s else {}
            with warnings.catch_warnings():  # the heartbeat is marked experimental (Optuna 3-5)
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **beat)
        except (ImportError, ValueError) as err:
            raise UserError(f"tune.storage: cannot open {safe_url(url)}: {first_line(err)}") from err
        except Exception as err:  # noqa: BLE001 - sqlalchemy errors: a concurrent worker, a lock, a server
            if attempt == attempts:
                raise UserError(f"tune.storage: cannot open {safe_url(url)}: {first_line(err)}") from err
            time.sleep(0.5 * attempt + secrets.randbelow(500) / 1000)
    raise AssertionError("unreachable")


def first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


def direction_of(monitor: str) -> str:
    """The study's direction for ``monitor``: the metric registry's (``METRICS``), as early stopping's."""
    return "maximize" if higher_is_better(monitor) else "minimize"


def create_study(cfg: Config, storage_url: str, study_name: str, direction: str, shared: bool,
                 pruner: optuna.pruners.BasePruner, monitor: str) -> optuna.Study:
    """Create or join the study; its objective is named ``monitor`` (Optuna's dashboard and trials.csv's
    ``value_<monitor>`` column show the name)."""
    import optuna

    # A private study is reproducible from project.seed; workers sharing a study must not all draw the
    # same "random" points, so they are left unseeded.
    sampler = optuna.samplers.TPESampler(seed=None if shared else cfg.project.seed)
    storage = open_storage(storage_url, heartbeat_s=cfg.tune.heartbeat_s if shared else None)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, sampler=sampler,
                                    pruner=pruner, load_if_exists=True)
    except Exception as err:  # noqa: BLE001 - two workers creating the same study at once: load it
        study = optuna.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        log.debug("[TUNE] create_study raced with another worker (%s); loaded the study", err)
    if study.direction.name.lower() != direction:
        raise UserError(f"--study-name: study '{study_name}' in {safe_url(storage_url)} was created to "
                        f"{study.direction.name.lower()}, but train.monitor={cfg.train.monitor} needs {direction}; "
                        "use another study name")
    if study.metric_names != [monitor]:
        with warnings.catch_warnings():  # experimental in some Optuna versions
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([monitor])
    return study


def close_stale_trials(storage_url: str, study: optuna.Study) -> None:
    """Trials still "running" in a private study were left by a process that ended without telling Optuna
    (killed, a lost machine): failed, marked interrupted, so a continued study runs them again. (In a shared
    study another worker may be running them: never called there.)"""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if stale:
        storage = open_storage(storage_url)
        for trial in stale:
            storage.set_trial_user_attr(trial._trial_id, "interrupted", True)
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        log.info("[TUNE] trial(s) %s were left running by a process that ended: marked failed (interrupted)",
                 ", ".join(str(t.number) for t in stale))


def rejoin_url(info: dict[str, Any], cfg: Config, tune_dir: Path) -> str:
    """The storage URL a tune.json records; its password was hidden there, so such a URL must come from the
    config (``tune.storage``) again."""
    recorded = str(info.get("storage", ""))
    if "***" not in recorded:
        return recorded
    if cfg.tune.storage and safe_url(cfg.tune.storage) == recorded:
        return cfg.tune.storage
    raise UserError(f"--auto-continue: {tune_dir / TUNE_FILE} records the storage {recorded} without its "
                    "password; rejoin the study with vistrain tune --config F --storage URL --study-name "
                    f"{info.get('study_name')}")


# ------------------------------------------------------------------------------------------------ outputs

TUNE_FILE = "tune.json"


def update_tune_json(tune_dir: Path, fields: dict[str, Any]) -> None:
    path = tune_dir / TUNE_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    info.setdefault("started", datetime.now().isoformat(timespec="seconds"))
    write_json(path, {**info, **fields})


def tunes_of(cfg: Config) -> list[tuple[Path, dict[str, Any]]]:
    """The tune directories under ``output.exp_dir`` of this exact config, newest first, with their tune.json."""
    want = config_hash(cfg)
    found = []
    for f in Path(cfg.output.exp_dir).glob(f"*/*_tune/{TUNE_FILE}"):
        try:
            info = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("config_hash") == want and "n_trials" in info:
            found.append((str(info.get("started", "")), f.parent, info))
    return [(path, info) for _, path, info in sorted(found, key=lambda x: x[0], reverse=True)]


def work_left(info: dict[str, Any]) -> bool:
    """A study (its tune.json) that ``train --auto-continue`` has something to do for: its trials did not all
    end, or the full training of its best values has not succeeded (``train --optimize`` without
    ``--auto-continue`` never starts it)."""
    return info.get("status") != "success" or (info.get("continued") or {}).get("status") != "success"


# ------------------------------------------------------------------------------- the trials' checkpoints

KEEP_NOTE = {  # tune.keep_checkpoints, as the study's log states it
    "best": "a completed trial keeps ckpt/best_fold{k}.pth; a pruned or failed one no checkpoint",
    "none": "no trial keeps a checkpoint",
    "all": "every trial keeps every checkpoint",
}
BEST_WEIGHTS = re.compile(r"best_fold\d+\.pth")  # what evaluate / predict / export / model.init_from read


def trim_checkpoints(run_dir: Path, keep: str, completed: bool) -> tuple[int, int]:
    """Delete from a trial's ``run_dir/ckpt`` what ``tune.keep_checkpoints`` (``keep``) does not keep now that the
    trial has ended (a last checkpoint of a resnet10t with its optimiser state is ~60 MB, kept for a resume that
    a trial never has); returns (files, bytes) removed. The rest of the run directory stays."""
    if keep == "all":
        return 0, 0
    files, size = 0, 0
    for path in sorted((run_dir / "ckpt").glob("*")):
        if not path.is_file() or (keep == "best" and completed and BEST_WEIGHTS.fullmatch(path.name)):
            continue
        try:
            n = path.stat().st_size
            path.unlink()
        except OSError as err:
            log.warning("[TUNE] could not delete %s: %s", path, first_line(err))
            continue
        files, size = files + 1, size + n
    return files, size


def new_tune_dir(cfg: Config) -> Path:
    """``<output.exp_dir>/YYYYMMDD/<run_id>_tune/``, with the run id of a training run of this config."""
    now = datetime.now()
    run_id = f"{cfg.project.name}-{now:%H%M%S}-{secrets.token_hex(3)}"
    path = Path(cfg.output.exp_dir) / f"{now:%Y%m%d}" / f"{run_id}_tune"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_best_params(path: Path, study: optuna.Study, monitor: str, storage: str) -> None:
    """best_params.yaml: the best values as a nested config fragment, with how to apply them."""
    import yaml

    best = study.best_trial
    overrides = " ".join(f"{k}={v}" for k, v in best.params.items())
    header = (f"# best trial {best.number} of study '{study.study_name}' ({safe_url(storage)}): "
              f"{monitor}={best.value:.6g} ({study.direction.name.lower()})\n"
              f"# as command-line overrides: {overrides}\n")
    atomic_write_text(path, header + yaml.safe_dump(nest(best.params), sort_keys=False))


def write_trials_csv(path: Path, study: optuna.Study) -> None:
    write_csv(path, study.trials_dataframe())


def write_plots(study: optuna.Study, out: Path) -> dict[str, str]:
    """The study's plots as PNG; each one that cannot be drawn is skipped with the reason (returned)."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # no display needed; an interactive session keeps its own backend
    import matplotlib.pyplot as plt
    from optuna.trial import TrialState
    from optuna.visualization import matplotlib as optuna_plots

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    varying = [k for k in {k for t in complete for k in t.params}
               if len({repr(t.params.get(k)) for t in complete}) > 1]
    reasons = {
        "optimization_history": None if complete else "no completed trial",
        "intermediate_values": None if any(t.intermediate_values for t in study.trials) else "no reported epoch",
        "param_importances": None if len(complete) >= 2 and len(varying) >= 2 else
        f"needs >= 2 completed trials and >= 2 parameters that vary (have {len(complete)} and {len(varying)})",
        "parallel_coordinate": None if complete else "no completed trial",
    }
    skipped = {}
    for name in PLOTS:
        if reasons[name] is None:
            try:
                # Optuna switches pyplot to its ggplot style; rc_context keeps that away from later plots.
                with warnings.catch_warnings(), matplotlib.rc_context():
                    warnings.simplefilter("ignore")  # optuna marks its matplotlib plots as experimental
                    ax = getattr(optuna_plots, f"plot_{name}")(study)
                    fig = (ax.flat[0] if hasattr(ax, "flat") else ax).figure
                    _save_fig(fig, out / f"{name}.png")
                    plt.close(fig)
                continue
            except Exception as err:  # noqa: BLE001 - a plot must never fail the study
                reasons[name] = first_line(err)
        skipped[name] = reasons[name]
        log.info("[TUNE] plot %s skipped: %s", name, reasons[name])
    return skipped


def _save_fig(fig: Any, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", facecolor="white")
    atomic_write_bytes(path, buf.getvalue())


def state_counts(study: optuna.Study) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return counts
