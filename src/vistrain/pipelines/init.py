"""``vistrain init``: write a commented starter config for one's own data (``config/starter.py``)."""

from __future__ import annotations

from pathlib import Path

from vistrain.config.starter import write_starter


def run_init(task: str = "classification", output: Path = Path("vistrain.yaml"), force: bool = False) -> Path:
    """The starter config of ``task`` written to ``output`` (refused over an existing file unless ``force``)."""
    return write_starter(task, output, force=force)
