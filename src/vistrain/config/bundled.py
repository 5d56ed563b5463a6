"""The configs shipped inside the package (``vistrain/configs/``): the ready configs and ``init/<task>.yaml``, the
starters ``vistrain init`` writes. They are package data found with importlib.resources, so ``vistrain demo`` and
``vistrain init`` work from a wheel as from this checkout, whose ``configs/`` is a link to the same folder."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path


def _folder() -> Path:
    # A wheel installs vistrain as plain files, so the traversable is a folder on disk: load_config wants a path,
    # and the relative paths inside a config resolve against its folder.
    return Path(os.fspath(resources.files("vistrain") / "configs"))


def bundled_config(name: str) -> Path:
    """The shipped config ``name`` (``demo.yaml``, ``init/reid.yaml`` ...); it may not exist, callers check."""
    return _folder() / name


def bundled_configs() -> list[Path]:
    """The ready configs (``configs/*.yaml``, not the starters), sorted by name."""
    return sorted(_folder().glob("*.yaml"))
