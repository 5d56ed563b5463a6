"""``vistrain runs --prune --keep-best N --older-than AGE [--dry-run]``: disk back from old runs.

What is deleted: a run's weight files, ``ckpt/*.pth`` and ``ckpt/*.safetensors`` (a 1-fold resnet10t run keeps
~113 MB of them and ~1 MB of everything else). The rest stays — run.json (which records ``weights_deleted``),
summary.json, the logs, plots and evaluations — so ``vistrain runs`` still lists the run with its status and
metrics; ``predict`` / ``export`` / ``evaluate`` of it need training again. Whole run directories are left to the
user (``rm -r``): a run's numbers are worth their few kilobytes.

Which runs: those that started more than AGE ago, except
- the N best of their group by the sort metric (``--sort``, else each run's ``train.monitor``; summary.json's mean
  over folds; a run without the value ranks last): a study's trials are ranked within their study, every other run
  within its ``project.name`` (the run id's prefix) and monitor. Ranking by config hash would keep everything: any
  changed value is another hash, so nearly every hash has one run. ``--config F`` narrows the runs to F's, so the N
  best of F's runs are kept. The N best are counted over runs of any age;
- a run that may be training (``RUN/.lock`` of a live process, or of another host), checked again right before
  its files go;
- the best trial of a study (tune.json ``best``; every trial of a study whose tune.json cannot be read);
- unreadable run directories (what they are is unknown) and run directories reached through a link.
Only regular files directly in the run's own ``ckpt/`` folder are deleted, never through a link.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.errors import UserError
from vistrain.registry import higher_is_better
from vistrain.tracking.rundir import RunDir, live_lock
from vistrain.tracking.runs import parse_time, size_text

WEIGHT_SUFFIXES = (".pth", ".safetensors")
AGE = re.compile(r"(\d+(?:\.\d+)?)([hdw])")
UNITS = {"h": "hours", "d": "days", "w": "weeks"}


def parse_age(text: str | timedelta) -> timedelta:
    """``12h``, ``30d``, ``2w`` (or a timedelta) -> timedelta; anything else is a one-line UserError."""
    if isinstance(text, timedelta):
        return text
    found = AGE.fullmatch(str(text).strip())
    if not found:
        raise UserError(f"--older-than: '{text}' is not an age; valid: a number and h, d or w (12h, 30d, 2w)")
    return timedelta(**{UNITS[found[2]]: float(found[1])})


@dataclass
class Pruned:
    """One run's weight files deleted (or that a dry run would delete) and the bytes they took on disk."""

    path: Path
    files: list[Path]
    bytes: int


@dataclass
class PruneResult:
    """What ``prune_runs`` deleted (``dry_run``: would delete), and how many runs old enough were kept, by why."""

    pruned: list[Pruned]
    kept: dict[str, int] = field(default_factory=dict)
    dry_run: bool = True
    older_than: str = ""

    @property
    def freed(self) -> int:
        return sum(p.bytes for p in self.pruned)

    def lines(self) -> list[str]:
        """One line per run (``freed   113.4 MB  PATH``, a dry run's ``would free ...``), then ``total: ...``."""
        verb = "would free" if self.dry_run else "freed"
        out = [f"{verb} {size_text(p.bytes):>10}  {p.path}" for p in self.pruned]
        kept = ", ".join(f"{n} {why}" for why, n in self.kept.items() if n)
        tail = " (dry run: nothing deleted)" if self.dry_run else ""
        if not self.pruned:
            return [f"nothing to prune: no run older than {self.older_than} holds weight files outside what is kept"
                    + (f" ({kept})" if kept else "")]
        return [*out, f"total: {verb} {size_text(self.freed)} in {len(self.pruned)} run(s){tail}"
                      + (f"; kept {kept}" if kept else "")]


def prune(table: pd.DataFrame, *, keep_best: int, older_than: str | timedelta, dry_run: bool = True,
          now: datetime | None = None) -> PruneResult:
    """Delete (``dry_run``: list) the weight files of the runs of ``table`` (``tracking.runs.list_runs``) that the
    rules of this module do not keep."""
    if isinstance(keep_best, bool) or not isinstance(keep_best, int) or keep_best < 0:
        raise UserError(f"--keep-best: expected a whole number >= 0; got {keep_best!r}")
    age = parse_age(older_than)
    label = older_than if isinstance(older_than, str) else str(older_than)
    rows = table.to_dict("records")
    best = _best(rows, keep_best)
    cutoff = (now or datetime.now()) - age
    result = PruneResult([], {}, dry_run, label)
    for r in rows:
        why = _kept(r, r["path"] in best, cutoff, keep_best, label)
        if why is None and live_lock(Path(r["path"])) is not None:
            why = "running"  # started since the table was read
        if why is not None:
            result.kept[why] = result.kept.get(why, 0) + 1
            continue
        files = weight_files(Path(r["path"]))
        if files:
            size = sum(n for _, n in files) if dry_run else delete_weights(Path(r["path"]), files)
            result.pruned.append(Pruned(Path(r["path"]), [p for p, _ in files], size))
    return result


def _kept(r: dict[str, Any], best: bool, cutoff: datetime, n: int, age: str) -> str | None:
    """Why run ``r`` keeps its weights (None: it does not)."""
    if str(r["status"]).startswith("unreadable"):
        return "unreadable"
    if str(r["status"]).startswith("running"):
        return "running"
    if Path(r["path"]).is_symlink():
        return "reached through a link"
    started = parse_time(r["date"])
    if started is None or started > cutoff:
        return f"younger than {age}"
    if r["kind"] == "trial" and r["study_best"] is not False:  # True, or None: the study's best is unknown
        return "best of their study"
    if best:
        return f"among the {n} best"
    return None


def _best(rows: list[dict[str, Any]], n: int) -> set[str]:
    """The paths of the ``n`` best runs of each group (a study; else a project and metric) by their mean."""
    groups: dict[tuple[Any, ...], list[tuple[float, str]]] = {}
    for r in rows:
        value, metric = r["mean"], r["metric"]
        if n == 0 or not isinstance(metric, str) or value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        key = ("study", r["study"]) if r["kind"] == "trial" else ("project", r["project"], metric)
        groups.setdefault(key, []).append((float(value) if higher_is_better(metric) else -float(value), r["path"]))
    return {path for ranked in groups.values() for _, path in sorted(ranked, key=lambda x: -x[0])[:n]}


def weight_files(run_dir: Path) -> list[tuple[Path, int]]:
    """``run_dir/ckpt``'s weight files (regular files, not links) with the bytes each takes on disk; none when
    ``ckpt`` is itself a link (its files live elsewhere)."""
    ckpt = run_dir / "ckpt"
    if ckpt.is_symlink() or not ckpt.is_dir():
        return []
    found = []
    with os.scandir(ckpt) as it:
        for entry in it:
            if entry.name.endswith(WEIGHT_SUFFIXES) and entry.is_file(follow_symlinks=False):
                st = entry.stat(follow_symlinks=False)
                found.append((Path(entry.path), st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size))
    return sorted(found)


def delete_weights(run_dir: Path, files: list[tuple[Path, int]]) -> int:
    """Delete ``files`` and record it in run.json (``weights_deleted``: when, which files, bytes); the bytes."""
    freed, gone = 0, []
    for path, size in files:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as err:
            raise UserError(f"--prune: cannot delete {path}: {err.strerror or err}") from None
        freed, gone = freed + size, [*gone, path.name]
    RunDir(run_dir).record(weights_deleted={"at": datetime.now().isoformat(timespec="seconds"), "files": gone,
                                            "bytes": freed})
    return freed
