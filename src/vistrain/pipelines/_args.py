"""Argument helpers shared by the verbs: argparse types with one-line errors, the config and override arguments."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

MODES = ["basic", "fast", "highperf", "full-pipeline"]


def folds(text: str) -> list[int]:
    """``--fold 0,2``."""
    try:
        return [int(x) for x in text.split(",") if x.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers like 0,2; got '{text}'") from None


def number(cast: Callable[[str], Any], what: str, above: float = 0, most: float | None = None
           ) -> Callable[[str], Any]:
    """An argparse ``type``: ``cast(text)`` greater than ``above`` (and at most ``most``), else one-line error."""

    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            value = None
        if value is None or not value > above or (most is not None and value > most):
            raise argparse.ArgumentTypeError(f"expected {what}; got '{text}'")
        return value

    return parse


positive_int = number(int, "a positive whole number")
positive_float = number(float, "a positive number")


def config_args(p: argparse.ArgumentParser, required: bool) -> None:
    """``--config F``, ``--mode`` and ``key.path=value`` overrides."""
    p.add_argument("--config", required=required, help="YAML config file")
    p.add_argument("--mode", choices=MODES,
                   help="preset under the config file: fast (small model, 224 px), highperf (384 px, hard aug), "
                        "full-pipeline (basic, then predict data.image_dir_test into RUN/submission.csv)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value", help="config overrides, e.g. train.lr=3e-4")


def eval_overrides(p: argparse.ArgumentParser) -> None:
    """The ``key=value`` evaluation options a command on a finished run takes."""
    from vistrain.config.loader import EVAL_OVERRIDES

    p.add_argument("overrides", nargs="*", metavar="key.path=value",
                   help="evaluation options for this command only, e.g. data.test_csv=labels.csv eval.tta=[hflip] "
                        f"({', '.join(EVAL_OVERRIDES)})")


def path_or_none(value: str | None) -> Path | None:
    return Path(value) if value else None


def console(stream: str = "stdout") -> None:
    """Log lines on the console (``stream``: stdout, or stderr when stdout is the command's result) for a command
    without a run directory of its own."""
    from vistrain.tracking.logs import console_logging

    console_logging(stream)


def worker_rank() -> bool:
    """True in a torchrun process other than rank 0: it trains its share and prints no result lines."""
    import os

    return os.environ.get("RANK", "0") not in ("", "0")


def print_study(study: Any) -> None:
    """The lines ``tune`` and ``train --optimize`` end with (a ``vistrain.Study``)."""
    params = " ".join(f"{k}={v}" for k, v in study.best_params.items())
    print(f"[DONE] tune directory: {study.tune_dir}")
    print(f"[DONE] best trial {study.best_trial}: {study.monitor}={study.best_value:.4f} | {params}")
    if study.run_dir is not None:
        print(f"[DONE] run directory: {study.run_dir}")


def strict(p: argparse.ArgumentParser, fallbacks: str) -> None:
    """``--strict``: the command's fallbacks (``fallbacks.py``) are errors instead of recorded."""
    p.add_argument("--strict", action="store_true",
                   help=f"fail (exit 1) rather than fall back ({fallbacks}); without it a fallback is logged as "
                        "[FALLBACK] and listed under fallbacks in the command's JSON")
