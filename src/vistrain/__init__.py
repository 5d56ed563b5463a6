"""vistrain: train, evaluate, tune, calibrate, export and serve timm image models from one YAML config."""

__version__ = "0.1.0"
