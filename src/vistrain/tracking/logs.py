"""Tagged logging: ``[BOOT] [CFG] [PATH] [DATA] [MODEL] [EPOCH] NEW_BEST [DONE] [EXIT]`` lines to the
console, ``train.log`` in the run directory and a copy under ``output.logs_dir``.

A command's log files end with its outcome (``log_outcome``): for a failure the error's one line and its
traceback, then the ``[EXIT]`` line. Those records go to the files only; the CLI prints the console's own
``error:`` and ``[EXIT]`` lines, and the traceback only with ``--debug``.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from vistrain.errors import Preempted, describe, exit_code

LOGGER = "vistrain"
FILE_ONLY = {"file_only": True}  # ``extra=`` of a record for the log files, not the console
_FILE_FMT = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_CONSOLE_FMT = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")


class _Console(logging.StreamHandler):
    """The console: whatever ``sys.stdout`` (or ``sys.stderr``) is when a record comes (a handler kept from an earlier
    command in the same process must not write to the stream that was current back then), without the file-only
    records."""

    def __init__(self, stream: str = "stdout") -> None:
        self.stream_name = stream
        super().__init__()
        self.setFormatter(_CONSOLE_FMT)
        self.addFilter(lambda record: not getattr(record, "file_only", False))

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, value: Any) -> None:
        pass  # always the current sys.stdout / sys.stderr


def _has_console(logger: logging.Logger) -> bool:
    return any(isinstance(h, _Console) for h in logger.handlers)


def exit_line(label: str, code: int, outcome: str | None = None) -> str:
    """``[EXIT] TRAINING SUCCESS code=0`` / ``[EXIT] TRAINING ERROR code=2`` / ``[EXIT] TRAINING INTERRUPTED
    code=143`` (``outcome``: a preemption signal stopped it): the last line of the console and of the command's log
    files."""
    return f"[EXIT] {label} {outcome or ('SUCCESS' if code == 0 else 'ERROR')} code={code}"


def log_outcome(logger: logging.Logger, label: str, err: BaseException | None = None) -> None:
    """The last records of a command's log files (not the console): for an error its one line (as the console
    shows it) and its traceback, then the ``[EXIT]`` line. An error that a caller raised on purpose to stop a
    run (``run_status``, e.g. a trial pruned by ``tune``) ends the log with ``[EXIT] LABEL PRUNED`` instead; a
    preemption signal with ``[EXIT] LABEL INTERRUPTED code=N`` (143, or ``train.requeue_exit_code``)."""
    if err is None:
        logger.info(exit_line(label, 0), extra=FILE_ONLY)
        return
    if isinstance(err, Preempted):
        logger.info(exit_line(label, exit_code(err), "INTERRUPTED"), extra=FILE_ONLY)
        return
    status = getattr(err, "run_status", None)
    if isinstance(status, str):
        logger.info("[EXIT] %s %s", label, status.upper(), extra=FILE_ONLY)
        return
    logger.error("[ERROR] %s", describe(err), extra=FILE_ONLY)
    logger.error("%s", "".join(traceback.format_exception(err)).rstrip(), extra=FILE_ONLY)
    logger.info(exit_line(label, exit_code(err)), extra=FILE_ONLY)


class _FileHandler(logging.FileHandler):
    """A log file on a full or read-only disk: its lines are lost (the console still has them) without the
    "--- Logging error ---" traceback that logging prints for every failed record."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        if not isinstance(sys.exc_info()[1], OSError):
            super().handleError(record)


@contextmanager
def run_logging(files: list[Path], console: bool = True) -> Iterator[logging.Logger]:
    """Attach file (append mode, so a resumed run keeps its history) and console handlers for one run."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: list[logging.Handler] = []
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        h = _FileHandler(f, mode="a", encoding="utf-8")
        h.setFormatter(_FILE_FMT)
        handlers.append(h)
    if console and not _has_console(logger):
        handlers.append(_Console())
    for h in handlers:
        logger.addHandler(h)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()


def console_logging(stream: str = "stdout") -> None:
    """Plain console output for commands that have no run directory of their own; ``stream="stderr"`` for a command
    whose stdout is its result (``import-config`` prints the config there)."""
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Console) and h.stream_name != stream]:
        logger.removeHandler(handler)
    if not _has_console(logger):
        logger.addHandler(_Console(stream))
        logger.setLevel(logging.INFO)
        logger.propagate = False


_progress: bool | None = None  # progress_bars' choice; None: on a terminal only


def show_progress() -> bool:
    """Progress bars on a terminal only (files and CI get plain lines), unless ``progress_bars`` says otherwise."""
    import os

    if _progress is not None:
        return _progress
    return sys.stderr.isatty() and not os.environ.get("CI")


@contextmanager
def progress_bars(enabled: bool | None) -> Iterator[None]:
    """tqdm bars on (True: a notebook asked for them) or off (False) inside the block; None: on a terminal only."""
    global _progress
    before, _progress = _progress, enabled
    try:
        yield
    finally:
        _progress = before
