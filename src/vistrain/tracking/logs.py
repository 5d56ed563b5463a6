"""Tagged logging: ``[BOOT] [CFG] [PATH] [DATA] [MODEL] [EPOCH] NEW_BEST [DONE] [EXIT]`` lines to the
console, ``train.log`` in the run directory and a copy under ``output.logs_dir``."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOGGER = "vistrain"
_FILE_FMT = logging.Formatter("%(asctime)s %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
_CONSOLE_FMT = logging.Formatter("%(asctime)s %(message)s", datefmt="%H:%M:%S")


@contextmanager
def run_logging(files: list[Path], console: bool = True) -> Iterator[logging.Logger]:
    """Attach file (append mode, so a resumed run keeps its history) and console handlers for one run."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handlers: list[logging.Handler] = []
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(f, mode="a", encoding="utf-8")
        h.setFormatter(_FILE_FMT)
        handlers.append(h)
    has_console = any(type(h) is logging.StreamHandler for h in logger.handlers)
    if console and not has_console:
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(_CONSOLE_FMT)
        handlers.append(h)
    for h in handlers:
        logger.addHandler(h)
    try:
        yield logger
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()


def console_logging() -> None:
    """Plain console output for commands that have no run directory of their own."""
    logger = logging.getLogger(LOGGER)
    if not any(type(h) is logging.StreamHandler for h in logger.handlers):
        h = logging.StreamHandler(sys.stdout)
        h.setFormatter(_CONSOLE_FMT)
        logger.addHandler(h)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def show_progress() -> bool:
    """Progress bars on a terminal only; files and CI get plain lines."""
    import os

    return sys.stderr.isatty() and not os.environ.get("CI")
