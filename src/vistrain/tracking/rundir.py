"""The run directory: ``exp_dir/YYYYMMDD/<run_id>/`` with the fixed layout of DESIGN.md.

``run.json`` records the run's status (running / success / error / interrupted / pruned) and the hash of its
resolved config, which is how ``--resume`` finds the newest unfinished run of the same config.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vistrain.config.loader import config_to_dict, mode_info
from vistrain.config.schema import Config
from vistrain.errors import UserError
from vistrain.tracking.files import json_line, write_json

RUN_FILE = "run.json"


def config_hash(cfg: Config) -> str:
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@dataclass
class RunDir:
    path: Path
    resumed: bool = False
    notes: list[str] = field(default_factory=list)  # lines for the run's log, once its log files are open

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

    def append_metrics(self, row: dict[str, Any]) -> None:
        """One line per fold and epoch, flushed to disk before the call returns."""
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json_line(row))
            fh.flush()
            os.fsync(fh.fileno())


def new_run(cfg: Config) -> RunDir:
    now = datetime.now()
    run_id = f"{cfg.project.name}-{now:%H%M%S}-{secrets.token_hex(3)}"
    path = cfg.output.exp_dir / f"{now:%Y%m%d}" / run_id
    for sub in ("ckpt", "oof", "plots"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    run = RunDir(path)
    mode = mode_info(cfg)
    write_json(path / RUN_FILE, {
        "run_id": run_id, "status": "running", "config_hash": config_hash(cfg),
        "started": now.isoformat(timespec="seconds"), "command": sys.argv, "mode": mode.name if mode else None,
    })
    return run


def find_unfinished(cfg: Config) -> Path | None:
    """The newest run under ``output.exp_dir`` with this exact resolved config that did not succeed."""
    want = config_hash(cfg)
    best: tuple[str, Path] | None = None
    for f in cfg.output.exp_dir.glob(f"*/*/{RUN_FILE}"):
        try:
            info = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if info.get("config_hash") == want and info.get("status") != "success":
            key = info.get("started", "")
            if best is None or key > best[0]:
                best = (key, f.parent)
    return best[1] if best else None


def open_existing(path: Path) -> RunDir:
    if not (path / "config.yaml").is_file():
        raise UserError(f"--resume: {path} is not a vistrain run directory (no config.yaml)")
    return RunDir(path, resumed=True)


def require_work_left(run: RunDir, folds: list[int]) -> None:
    """``--resume RUN`` of a run that finished every fold asked for would train nothing: a mistake, not a no-op.
    (A run's status is "success" only once every fold it trained has finished, so a last checkpoint is enough.)"""
    if run.read_status().get("status") == "success" and all(run.ckpt("last", k).is_file() for k in folds):
        done = ", ".join(map(str, folds))
        raise UserError(f"--resume: {run.path} already finished fold(s) {done}; nothing is left to train: start a "
                        "new run with --fresh, or train another fold of it with --fold K")
