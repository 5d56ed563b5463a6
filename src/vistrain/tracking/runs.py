"""``vistrain runs``: one row per run directory under an experiments folder (``output.exp_dir``), read from the small
files every run writes: run.json (status, config hash, ``--mode``, folds planned and done), summary.json (task, the
monitor's mean and std over the folds, duration), eval/test/metrics.json (the test figure and its bootstrap interval;
a ratio split's summary.json ``test`` otherwise), and the sizes of its files. No checkpoint is opened and no torch
imported, so a thousand runs list in about a second.

Layout (DESIGN.md "Run directory", tuning/run.py): runs are ``DIR/YYYYMMDD/<run_id>/``; a study is
``DIR/YYYYMMDD/<run_id>_tune/`` with one ordinary run directory per trial under ``trials/YYYYMMDD/`` (kind ``trial``;
its tune.json names the study's best trial); a run trained with a study's best values (``--auto-continue``) holds
tuned_from.json (kind ``tuned``). A directory that cannot be read is still a row, whose status says why
(``unreadable: ...``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd

from vistrain.errors import UserError, did_you_mean
from vistrain.registry import METRICS, higher_is_better
from vistrain.tracking.rundir import LOCK_FILE, RUN_FILE, live_lock

log = logging.getLogger(__name__)
_HOST = socket.gethostname()

COLUMNS = ("date", "run_id", "project", "kind", "study", "trial", "study_best", "config_hash", "task", "mode",
           "status", "weights_deleted", "folds_done", "folds_planned", "metric", "mean", "std", "test", "test_low",
           "test_high", "duration_s", "size_bytes", "path")
# --sort names that are not metrics: the table column, and whether the largest / newest comes first
OTHER_SORTS = {"date": "date", "duration": "duration_s", "size": "size_bytes"}
TEST_NAMES = {"accuracy": "top1"}  # a training row's name -> evaluate's name for the same figure
DAY = re.compile(r"\d{8}")
RUN_ID = re.compile(r"(?P<project>.+?)(?:-trial(?P<trial>\d+))?-\d{6}-[0-9a-f]{6}(?:-\d+)?")
TUNE_SUFFIX, TUNE_FILE, TUNED_FILE = "_tune", "tune.json", "tuned_from.json"
TEST_METRICS = "eval/test/metrics.json"
READ_FOLDERS = ("", "eval/test/")  # where the files a row reads are (run.json, .lock ..., eval/test/metrics.json)


@dataclass
class _Study:
    path: str
    info: dict[str, Any] | None  # tune.json (None: unreadable)


@dataclass
class _Found:
    path: str  # paths as strings: pathlib's parsing is a third of the time on 1,000 runs
    day: str  # the YYYYMMDD folder it is in
    study: _Study | None = None  # the study a trial belongs to


def list_runs(directory: Path, *, config_hash: str | None = None, sort: str | None = None) -> pd.DataFrame:
    """The runs table (``COLUMNS``), oldest first, or sorted by ``sort`` (a metric of the runs' summary.json, best
    first in its direction; ``date`` / ``duration`` / ``size``: newest, longest, largest first); rows without a
    value last. ``config_hash``: only the runs of that config (run.json) or of its studies (tune.json), and the
    unreadable ones (their config is unknown). ``metric``, ``mean`` and ``std`` are ``sort``'s when it is a metric,
    else each run's monitor."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"DIR: {directory}: no such folder; give the experiments folder (output.exp_dir)")
    metric = sort if sort not in OTHER_SORTS else None
    now, studies, names = datetime.now(), {}, set()
    rows = []
    for found in _scan(directory):
        row = _row(found, metric, now, studies, names)
        study_hash = row.pop("_study_hash", None)
        if config_hash is None or row["status"].startswith("unreadable") or \
                config_hash in (row["config_hash"], study_hash):
            rows.append(row)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in ("trial", "folds_done", "folds_planned", "size_bytes"):
        table[col] = table[col].astype("Int64")
    for col in ("mean", "std", "test", "test_low", "test_high", "duration_s"):
        table[col] = table[col].astype("float64")
    table = table.sort_values(["date", "path"], kind="stable", ignore_index=True)
    if sort is None or table.empty:
        return table
    column, descending = _sort_key(sort, names)
    return table.sort_values(column, ascending=not descending, na_position="last", kind="stable", ignore_index=True)


def _sort_key(sort: str, names: set[str]) -> tuple[str, bool]:
    """The column ``--sort`` orders by and whether its largest value comes first."""
    if sort in OTHER_SORTS:
        return OTHER_SORTS[sort], True
    sortable = sorted(n for n in names if _known(n))
    if sort not in sortable:
        valid = [*sortable, *OTHER_SORTS]
        raise UserError(f"--sort: '{sort}' is not a metric of these runs' summary.json; sortable: "
                        f"{', '.join(valid)}{did_you_mean(sort, valid)}")
    return "mean", higher_is_better(sort)


def _known(name: str) -> bool:
    try:
        METRICS.info(name)
    except UserError:
        return False
    return True


# --------------------------------------------------------------------------------------------- finding runs

def _scan(directory: Path) -> list[_Found]:
    """Every run directory under ``directory``: an experiments folder (its YYYYMMDD folders), one day folder, or
    one run directory."""
    if (directory / RUN_FILE).is_file():
        return [_Found(str(directory), directory.parent.name)]
    days = [str(directory)] if DAY.fullmatch(directory.name) else []
    if not days:
        entries = _subdirs(str(directory))
        days = [d for d in entries if DAY.fullmatch(os.path.basename(d))]
        other = [os.path.basename(d) for d in entries if not DAY.fullmatch(os.path.basename(d))]
        if other:
            log.warning("[RUNS] %s: not listed, not YYYYMMDD day folders: %s", directory, ", ".join(other))
    found = []
    for day in days:
        for entry in _subdirs(day):
            if not entry.endswith(TUNE_SUFFIX):
                found.append(_Found(entry, os.path.basename(day)))
                continue
            info, _ = read_json(os.path.join(entry, TUNE_FILE))
            study = _Study(entry, info if isinstance(info, dict) else None)
            found += [_Found(run, os.path.basename(trial_day), study)
                      for trial_day in _subdirs(os.path.join(entry, "trials")) for run in _subdirs(trial_day)]
    return found


def _subdirs(path: str) -> list[str]:
    """The folders in ``path`` (a link to a folder included), by name; none when it is missing."""
    try:
        with os.scandir(path) as it:
            return sorted(e.path for e in it if not e.name.startswith(".") and e.is_dir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as err:
        log.warning("[RUNS] %s: cannot list it (%s); its runs are not shown", path, err.strerror or err)
        return []


def read_json(path: str | Path) -> tuple[Any, str | None]:
    """``(content, None)``, or ``(None, why)``: "no run.json", "run.json: Expecting value: line 1 column 1 ..."."""
    try:
        with open(path, "rb") as fh:
            return json.loads(fh.read()), None
    except FileNotFoundError:
        return None, f"no {os.path.basename(path)}"
    except (OSError, ValueError) as err:
        return None, f"{os.path.basename(path)}: {err}"


def disk_usage(path: str | Path) -> int:
    """Bytes allocated to ``path`` and everything in it, as ``du -s`` counts them (folders included; st_size where
    the file system reports no blocks), links not followed."""
    return _walk(str(path))[0]


def _walk(path: str) -> tuple[int, set[str]]:
    """``disk_usage(path)``, and which of the files this table reads exist (in ``READ_FOLDERS``): one pass over the
    folder, so no file is opened in vain. An OSError only when ``path`` itself cannot be read."""
    total, present, stack = _allocated(os.stat(path)), set(), [(path, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        total += _allocated(entry.stat(follow_symlinks=False))
                        if entry.is_dir(follow_symlinks=False):
                            stack.append((entry.path, f"{rel}{entry.name}/"))
                        elif rel in READ_FOLDERS:
                            present.add(rel + entry.name)
                    except OSError:
                        continue  # removed meanwhile, or not ours to read
        except OSError:
            if folder == path:
                raise
    return total, present


def _allocated(st: os.stat_result) -> int:
    blocks = getattr(st, "st_blocks", None)
    return blocks * 512 if blocks is not None else st.st_size


# ----------------------------------------------------------------------------------------------- one row

def _row(found: _Found, metric: str | None, now: datetime, studies: dict[str, Any], names: set[str]
         ) -> dict[str, Any]:
    path, day = found.path, found.day
    name = os.path.basename(path)
    match = RUN_ID.fullmatch(name)
    row: dict[str, Any] = dict.fromkeys(COLUMNS)
    row.update(path=path, run_id=name, project=match["project"] if match else name, kind="run", metric=metric,
               date=f"{day[:4]}-{day[4:6]}-{day[6:]}T00:00:00" if DAY.fullmatch(day) else None)
    if found.study is not None:
        _trial(row, found.study, match)
    try:
        row["size_bytes"], present = _walk(path)
    except OSError as err:  # removed since it was listed, or not readable by this user
        row["status"] = f"unreadable: {err.strerror or err}"
        return row

    def read(rel: str) -> tuple[Any, str | None]:
        return read_json(os.path.join(path, rel)) if rel in present else (None, f"no {os.path.basename(rel)}")

    info, why = read(RUN_FILE)
    if why is None and not isinstance(info, dict):
        why = f"{RUN_FILE}: not a JSON object"
    if why is not None:
        row["status"] = f"unreadable: {why}"
        return row
    try:
        _from_run_json(row, info, path if LOCK_FILE in present else None, now)
        _from_summary(row, read("summary.json"), metric, names)
        _from_test(row, read(TEST_METRICS))
        _tuned(row, read(TUNED_FILE), studies)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        row["status"] = f"unreadable: unexpected content ({type(err).__name__}: {err})"
    return row


def _trial(row: dict[str, Any], study: _Study, match: re.Match[str] | None) -> None:
    """A study's trial: its number (from the run id ``<project>-trial<n>-...``), the study, whether tune.json names
    it best (None: tune.json unreadable or without a best trial yet) and the study's config hash (for --config)."""
    info = study.info or {}
    row.update(kind="trial", study=os.path.basename(study.path), _study_hash=info.get("config_hash"),
               trial=int(match["trial"]) if match and match["trial"] else None)
    best = (info.get("best") or {}).get("trial")
    row["study_best"] = None if best is None else best == row["trial"]


def _from_run_json(row: dict[str, Any], info: dict[str, Any], locked: str | None, now: datetime) -> None:
    """run.json's fields; ``locked``: the run's path when it holds a RUN/.lock (whose process may be gone)."""
    status = str(info.get("status"))
    holder = live_lock(Path(locked)) if locked else None
    if holder is not None:  # a resumed run keeps its old status in run.json while it trains again
        status = "running" if holder.get("host") in (None, _HOST) else f"running on {holder['host']}"
    elif status == "running":
        status = "killed"  # run.json says running, but no live process holds its lock
    started = info.get("started")
    end = now if holder is not None else parse_time(info.get("updated"))
    row.update(status=status, config_hash=info.get("config_hash"), mode=info.get("mode"),
               date=started or row["date"], weights_deleted=(info.get("weights_deleted") or {}).get("at"),
               folds_planned=len(info["folds"]) if "folds" in info else None,
               folds_done=len(info["folds_done"]) if "folds_done" in info else None,
               duration_s=(end - parse_time(started)).total_seconds() if started and end else None)


def _from_summary(row: dict[str, Any], read: tuple[Any, str | None], metric: str | None, names: set[str]) -> None:
    summary, why = read
    if summary is None:
        if row["status"] == "success" or why != "no summary.json":
            row["status"] = f"unreadable: {why}"
        return
    if not isinstance(summary, dict):
        row["status"] = "unreadable: summary.json: not a JSON object"
        return
    names.update(summary.get("mean", {}))
    name = metric or summary.get("monitor")
    done = len(summary.get("folds", []))
    # one fold has no spread: summary.json's 0.0 there is no measured standard deviation
    row.update(task=summary.get("task"), metric=name, mean=summary.get("mean", {}).get(name),
               std=summary.get("std", {}).get(name) if done > 1 else None)
    row["folds_done"] = row["folds_done"] if row["folds_done"] is not None else done
    row["folds_planned"] = row["folds_planned"] if row["folds_planned"] is not None else done
    if "total_s" in summary.get("timings", {}):
        row["duration_s"] = summary["timings"]["total_s"]
    row["_test"] = summary.get("test")  # a ratio split's test figures, when evaluate wrote none


def _from_test(row: dict[str, Any], read: tuple[Any, str | None]) -> None:
    metrics, why = read
    ratio_test = row.pop("_test", None)
    if why is not None and not why.startswith("no "):
        row["status"] = f"unreadable: eval/test/{why}"
        return
    metrics = metrics if why is None else ratio_test
    if not isinstance(metrics, dict) or row["metric"] is None:
        return
    name = row["metric"] if row["metric"] in metrics else TEST_NAMES.get(row["metric"], row["metric"])
    interval = (metrics.get("intervals") or {}).get(name) or [None, None]
    row.update(test=metrics.get(name), test_low=interval[0], test_high=interval[1])


def _tuned(row: dict[str, Any], read: tuple[Any, str | None], studies: dict[str, Any]) -> None:
    """A run trained with a study's best values: kind ``tuned``, the study's name, and its config hash (``--config``
    lists it with the study)."""
    tuned, why = read
    if row["kind"] != "run" or why is not None or not isinstance(tuned, dict) or not tuned.get("tune_dir"):
        return
    tune_dir = str(tuned["tune_dir"])
    if tune_dir not in studies:
        info, _ = read_json(os.path.join(tune_dir, TUNE_FILE))
        studies[tune_dir] = info if isinstance(info, dict) else {}
    row.update(kind="tuned", study=os.path.basename(tune_dir), _study_hash=studies[tune_dir].get("config_hash"))


def parse_time(text: Any) -> datetime | None:
    """A run file's ISO time (run.json started / updated); None when absent or unreadable."""
    try:
        return datetime.fromisoformat(str(text)) if text else None
    except ValueError:
        return None


# ------------------------------------------------------------------------------------------------ output

TABLE = ("date", "run", "kind", "study", "config", "mode", "status", "folds", "metric", "value", "test",
         "duration", "size")
OPTIONAL = ("study", "mode", "test")  # shown only when some run has one


def render(table: pd.DataFrame, fmt: str) -> str:
    """The table as aligned text (a missing value: ``-``), CSV (pandas reads it back) or JSON (a list of
    objects)."""
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        records = [{k: _plain(v) for k, v in r.items()} for r in table.to_dict("records")]
        return json.dumps(records, indent=1)
    cells = [_cells(r) for r in table.to_dict("records")]
    shown = [c for c in TABLE if c not in OPTIONAL or any(row[c] != "-" for row in cells)]
    lines = [[c for c in shown]] + [[row[c] for c in shown] for row in cells]
    width = {c: max(len(line[i]) for line in lines) for i, c in enumerate(shown)}
    right = {"folds", "duration", "size"}
    return "\n".join("  ".join(v.rjust(width[c]) if c in right else v.ljust(width[c]) for c, v in zip(shown, line))
                     .rstrip() for line in lines)


def _plain(value: Any) -> Any:
    """A JSON value: missing -> null, numpy / pandas numbers -> Python's."""
    if value is None or (not isinstance(value, (str, bool)) and pd.isna(value)):
        return None
    return value.item() if hasattr(value, "item") else value


def _cells(r: dict[str, Any]) -> dict[str, str]:
    def given(v: Any) -> bool:
        return v is not None and not (isinstance(v, float) and v != v) and v is not pd.NA

    kind = r["kind"]
    if kind == "trial" and given(r["trial"]):
        kind = f"trial {r['trial']}" + (" (best)" if r["study_best"] is True else "")
    status = r["status"] + (", weights deleted" if given(r["weights_deleted"]) else "")
    value = f"{r['mean']:.4f}" + (f" ± {r['std']:.4f}" if given(r["std"]) else "") if given(r["mean"]) else "-"
    test = "-"
    if given(r["test"]):
        test = f"{r['test']:.4f}" + (f" [{r['test_low']:.4f}, {r['test_high']:.4f}]" if given(r["test_low"]) else "")
    done, planned = (str(r[k]) if given(r[k]) else "-" for k in ("folds_done", "folds_planned"))
    return {
        "date": r["date"].replace("T", " ")[:16] if given(r["date"]) else "-", "run": r["run_id"], "kind": kind,
        "study": r["study"] if given(r["study"]) else "-",
        "config": r["config_hash"][:8] if given(r["config_hash"]) else "-",
        "mode": r["mode"] if given(r["mode"]) else "-", "status": status, "folds": f"{done}/{planned}",
        "metric": r["metric"] if given(r["metric"]) else "-", "value": value, "test": test,
        "duration": duration_text(r["duration_s"]) if given(r["duration_s"]) else "-",
        "size": size_text(r["size_bytes"]) if given(r["size_bytes"]) else "-",
    }


def duration_text(seconds: float) -> str:
    """``45s``, ``3m12s``, ``1h02m``, ``2d03h``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def size_text(size: int) -> str:
    mb = size / 2**20
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.1f} MB"
