"""The run directory: ``exp_dir/YYYYMMDD/<run_id>/`` with the fixed layout of DESIGN.md.

``run.json`` records the run's status (running / success / error / interrupted / pruned / diverged) and the hash
of its resolved config, which is how ``--resume`` finds the newest unfinished run of the same config. A resumed
run trains with its effective config: config.yaml (as the run started), then the changes of every resume in
order (run.json ``resume_overrides``), then the new command's ``key=value`` overrides (``effective_config``).

Two runs started at once in one ``output.exp_dir`` never share a directory: it is created with an atomic ``mkdir``
(a taken name gets a ``-2``, ``-3`` ... suffix). ``RUN/.lock`` (PID, host, start time) marks the process training
a run; another one resuming it is refused while that process lives, and takes a stale lock over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import socket
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vistrain.config.loader import config_to_dict, load_config, load_yaml, mode_info, override_keys, validate
from vistrain.config.schema import Config
from vistrain.errors import UserError
from vistrain.tracking.files import json_line, write_json, writing

log = logging.getLogger(__name__)
RUN_FILE = "run.json"
LOCK_FILE = ".lock"


def config_hash(cfg: Config) -> str:
    """What ``--resume`` (and a tune study) matches: the resolved config, and the content of a file that is part of
    it (``augment.albumentations``: the same path with another pipeline in it is another config)."""
    described = config_to_dict(cfg)
    described["project"].pop("description", None)  # words about the model, not how it trains: same run, same hash
    if cfg.augment.albumentations is not None:
        described["augment"]["albumentations_sha256"] = file_sha256(cfg.augment.albumentations,
                                                                    "augment.albumentations")
    blob = json.dumps(described, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path, key: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except FileNotFoundError:
        raise UserError(f"{key}: {path}: file not found") from None
    except OSError as err:
        raise UserError(f"{key}: {path}: cannot read it ({err.strerror or err})") from None


@dataclass
class RunDir:
    path: Path
    resumed: bool = False
    notes: list[str] = field(default_factory=list)  # lines for the run's log, once its log files are open
    locked: bool = False  # this process holds RUN/.lock

    @property
    def run_id(self) -> str:
        return self.path.name

    def ckpt(self, kind: str, fold: int) -> Path:
        return self.path / "ckpt" / f"{kind}_fold{fold}.pth"

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def read_status(self) -> dict[str, Any]:
        f = self.path / RUN_FILE
        return json.loads(f.read_text()) if f.is_file() else {}

    def set_status(self, status: str, **extra: Any) -> None:
        info = self.read_status()
        info.update(status=status, updated=datetime.now().isoformat(timespec="seconds"), **extra)
        write_json(self.path / RUN_FILE, info)

    def record(self, **fields: Any) -> None:
        """Fields of run.json changed, its status kept (``folds_done`` after each fold: what ``vistrain runs``
        shows of a run still training)."""
        self.set_status(self.read_status().get("status", "running"), **fields)

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One line per fold and epoch, flushed to disk before the call returns."""
        path = self.path / "metrics.jsonl"
        with writing(path), open(path, "a", encoding="utf-8") as fh:
            fh.write(json_line(row))
            fh.flush()
            os.fsync(fh.fileno())


def new_run(cfg: Config, folds: list[int] | None = None) -> RunDir:
    """A new run directory, locked, with run.json: status running, the config's hash, the folds it will train
    (default: the config's)."""
    now = datetime.now()
    path = make_run_dir(cfg.output.exp_dir / f"{now:%Y%m%d}", f"{cfg.project.name}-{now:%H%M%S}-{secrets.token_hex(3)}")
    for sub in ("ckpt", "oof", "plots"):
        (path / sub).mkdir(exist_ok=True)
    run = RunDir(path)
    acquire_lock(run)
    mode = mode_info(cfg)
    write_json(path / RUN_FILE, {
        "run_id": path.name, "status": "running", "config_hash": config_hash(cfg),
        "started": now.isoformat(timespec="seconds"), "command": sys.argv, "mode": mode.name if mode else None,
        "folds": cfg.folds_to_train() if folds is None else folds, "folds_done": [],
    })
    return run


def make_run_dir(parent: Path, run_id: str) -> Path:
    """``parent/run_id``, created by this call and no other: ``mkdir`` is atomic, so of two processes that chose
    the same name one gets it and the other tries ``run_id-2``, ``run_id-3`` ..."""
    with writing(parent):
        parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / (run_id if n == 1 else f"{run_id}-{n}")
        try:
            with writing(path):
                path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"output.exp_dir: could not create a new run directory {parent / run_id} (1000 names taken)")


def live_lock(run_dir: Path) -> dict[str, Any] | None:
    """Who holds ``RUN/.lock`` while the run may be training: ``{pid, host, started}`` of a live process on this
    host, or of any process on another host (which cannot be checked); None without a lock or when its process is
    gone. A lock that cannot be read (being written, or cut short by a kill) counts as held: whoever asks this
    (``vistrain runs --prune``) must not touch a run that might be training."""
    lock = run_dir / LOCK_FILE
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return {"pid": None, "host": None, "started": None}
    if host != socket.gethostname():
        return holder
    return holder if pid > 0 and _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def acquire_lock(run: RunDir) -> None:
    """Create ``RUN/.lock`` for this process (``O_EXCL``: one winner). A lock of a live process on this host, or of
    another host (which cannot be checked), is a UserError; a dead process's lock is taken over, noted in the log."""
    lock = run.path / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": datetime.now().isoformat(timespec="seconds")}
    for _ in range(3):
        try:
            with writing(lock):
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            _check_stale(run, lock)
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(me) + "\n")
        run.locked = True
        return
    raise UserError(f"--resume: {run.path}: could not take {lock}; another process keeps taking it")


def _check_stale(run: RunDir, lock: Path) -> None:
    """Remove ``lock`` when its process is gone (or is this one); else refuse, naming the process."""
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except FileNotFoundError:
        return  # released meanwhile: try again
    except (OSError, ValueError, KeyError, TypeError):
        holder, pid, host = {}, -1, socket.gethostname()  # half-written by a process killed at that moment
    here = host == socket.gethostname()
    if here and pid > 0 and pid != os.getpid() and _alive(pid):
        raise UserError(f"--resume: {run.path} is being trained by PID {pid} on {host} since "
                        f"{holder.get('started', '?')} ({lock}); wait for it to finish or stop it first")
    if not here:
        raise UserError(f"--resume: {run.path} is locked by PID {pid} on host {host} since "
                        f"{holder.get('started', '?')} ({lock}); if that process is gone, delete the lock file")
    run.notes.append(f"[LOCK] {lock}: stale lock of PID {pid} (no longer running) taken over")
    lock.unlink(missing_ok=True)


def release_lock(run: RunDir) -> None:
    if run.locked:
        (run.path / LOCK_FILE).unlink(missing_ok=True)
        run.locked = False


def find_unfinished(cfg: Config) -> Path | None:
    """The newest run under ``output.exp_dir`` with this exact resolved config that did not succeed."""
    want = config_hash(cfg)
    best: tuple[str, Path] | None = None
    for f in cfg.output.exp_dir.glob(f"*/*/{RUN_FILE}"):
        try:
            info = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not (f.parent / "config.yaml").is_file():
            continue  # killed before it wrote its config: nothing trained to resume
        if info.get("config_hash") == want and info.get("status") != "success":
            key = info.get("started", "")
            if best is None or key > best[0]:
                best = (key, f.parent)
    return best[1] if best else None


def open_existing(path: Path) -> RunDir:
    """The run at ``path``, locked for this process (a UserError while another live process trains it)."""
    if not (path / "config.yaml").is_file():
        raise UserError(f"--resume: {path} is not a vistrain run directory (no config.yaml)")
    run = RunDir(path, resumed=True)
    acquire_lock(run)
    return run


def require_work_left(run: RunDir, folds: list[int]) -> None:
    """``--resume RUN`` of a run that finished every fold asked for would train nothing: a mistake, not a no-op.
    (A run's status is "success" only once every fold it trained has finished, so a last checkpoint is enough.)"""
    if run.read_status().get("status") == "success" and all(run.ckpt("last", k).is_file() for k in folds):
        done = ", ".join(map(str, folds))
        raise UserError(f"--resume: {run.path} already finished fold(s) {done}; nothing is left to train: start a "
                        "new run with --fresh, or train another fold of it with --fold K")


def open_run(cfg: Config, resume: bool | Path, fresh: bool, folds: list[int]) -> RunDir:
    """``--resume RUN`` (that run, with work left), ``--resume`` (the newest unfinished run of this config, else a
    new one) or a new run directory; locked for this process."""
    if isinstance(resume, Path):
        run = open_existing(resume)
        try:
            require_work_left(run, folds)
        except UserError:
            release_lock(run)
            raise
        run.record(folds=folds, folds_done=[])
        return run
    if resume and not fresh:
        found = find_unfinished(cfg)
        if found is not None:
            run = open_existing(found)
            run.record(folds=folds, folds_done=[])
            return run
        run = new_run(cfg, folds)
        run.notes.append("[RESUME] no unfinished run of this config; starting a new run")
        return run
    return new_run(cfg, folds)


def effective_config(cfg: Config, run: RunDir) -> Config:
    """What a resumed run trains with: its config.yaml, each earlier resume's changes in order, then the keys this
    command gives as ``key=value`` (``override_keys``; the rest of ``cfg`` is config.yaml or, for ``--config F
    --resume``, the same config by its hash). Without the earlier changes a plain ``--resume`` would undo them: an
    lr lowered after a divergence would be scaled back up."""
    merged = config_to_dict(load_config(run / "config.yaml", run_file=True))
    now = _flat(config_to_dict(cfg))
    for layer in [*_earlier_overrides(run), {k: now[k] for k in override_keys(cfg) if k in now}]:
        for key, value in layer.items():
            *parents, leaf = key.split(".")
            node = merged
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return validate(merged)


def record_resume(run: RunDir, cfg: Config) -> None:
    """The resumed run's config (``auto`` values resolved for this machine) against the effective config it had:
    each changed value in the log and appended to run.json ``resume_overrides``; ``effective_overrides`` holds
    every value that now differs from config.yaml, which keeps what the run started with."""
    base = _flat(load_yaml((run / "config.yaml").read_text(encoding="utf-8")) or {})
    earlier = _earlier_overrides(run)
    before = dict(base)
    for layer in earlier:
        before.update(layer)
    now = _flat(config_to_dict(cfg))
    changed = {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}
    if earlier:
        log.info("[RESUME] earlier resumes' changes kept (run.json resume_overrides): %s", ", ".join(
            f"{k}={v}" for k, v in before.items() if base.get(k) != v))
    if changed:
        log.warning("[RESUME] config changed since the %s: %s", "last resume" if earlier else "run started",
                    ", ".join(f"{k}: {old} -> {new}" for k, (old, new) in changed.items()))
    info = run.read_status()
    update: dict[str, Any] = {"effective_overrides": {k: v for k, v in now.items() if base.get(k) != v}}
    if changed:
        update["resume_overrides"] = [*info.get("resume_overrides", []), changed]
    run.set_status(info.get("status", "running"), **update)


def _earlier_overrides(run: RunDir) -> list[dict[str, Any]]:
    """run.json ``resume_overrides`` (each resume's ``{key: [old, new]}``) as ``{key: new}`` layers, in order."""
    return [{k: change[1] for k, change in entry.items()} for entry in run.read_status().get("resume_overrides", [])]


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and empty mappings are values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def require_run_dir(path: str | Path) -> Path:
    """``path`` resolved, when it is a run directory (it holds config.yaml); else the one-line ``RUN:`` error."""
    run_dir = Path(path).resolve()
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"RUN: {run_dir} is not a vistrain run directory (no config.yaml)")
    return run_dir
