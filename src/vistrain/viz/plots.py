"""Placeholder: plots (being written)."""

from __future__ import annotations

from pathlib import Path


def training_plots(run_dir: Path) -> list[Path]:
    return []
