"""Typed configuration: schema (dataclasses), loading (presets + overrides) and validation."""

from ltdist.config.load import ConfigError, closest_key, load_config
from ltdist.config.schema import Config
from ltdist.config.validate import config_to_yaml, validate_config
from ltdist.engine.fingerprint import world_size_of

__all__ = ["Config", "ConfigError", "closest_key", "config_to_yaml", "load_config", "validate_config",
           "world_size_of"]
