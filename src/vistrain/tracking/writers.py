"""Placeholder: TensorBoard / W&B writers (being written)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class Trackers:
    def __init__(self, cfg: Any, run_dir: Path, run_id: str, config: dict) -> None:
        pass

    def log_epoch(self, row: dict) -> None:
        pass

    def log_images(self, paths: list[Path]) -> None:
        pass

    def log_summary(self, summary: dict) -> None:
        pass

    def close(self) -> None:
        pass
