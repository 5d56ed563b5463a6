"""Configuration: schema, YAML loading, ``--mode`` presets and ``key.path=value`` overrides."""

from vistrain.config.loader import config_to_dict, load_config
from vistrain.config.schema import Config

__all__ = ["Config", "config_to_dict", "load_config"]
