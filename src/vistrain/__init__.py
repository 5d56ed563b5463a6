"""vistrain: train, evaluate, tune, calibrate, export and serve timm image models from one YAML config.

The public API (``docs/api.md``); everything else is private and may move::

    import vistrain
    run = vistrain.train("configs/demo.yaml", overrides={"train.epochs": 1})
    run.predict(["image.png"], top_k=5)

The names load on first use, so ``import vistrain`` (and the command line's start) stays light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vistrain._version import __version__

_API = {
    "load_config": "vistrain.api", "train": "vistrain.api", "tune": "vistrain.api", "Run": "vistrain.api",
    "Study": "vistrain.api", "Audit": "vistrain.api", "convert_checkpoint": "vistrain.api",
    "runs": "vistrain.api", "prune_runs": "vistrain.api",
    "Config": "vistrain.config.schema",
    "Preprocessor": "vistrain.data.preprocess", "UserError": "vistrain.errors", "ConfigError": "vistrain.errors",
    "CheckFailed": "vistrain.errors", "FallbackRefused": "vistrain.errors", "Preempted": "vistrain.errors",
    "import_config": "vistrain.api",
}
__all__ = ["Audit", "CheckFailed", "Config", "ConfigError", "FallbackRefused", "Preempted", "Preprocessor", "Run",
           "Study", "UserError", "__version__", "convert_checkpoint", "import_config", "load_config", "prune_runs",
           "runs", "train", "tune"]

if TYPE_CHECKING:
    from vistrain.api import (
        Audit,
        Run,
        Study,
        convert_checkpoint,
        import_config,
        load_config,
        prune_runs,
        runs,
        train,
        tune,
    )
    from vistrain.config.schema import Config
    from vistrain.data.preprocess import Preprocessor
    from vistrain.errors import CheckFailed, ConfigError, FallbackRefused, Preempted, UserError


def __getattr__(name: str) -> Any:
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'vistrain' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
