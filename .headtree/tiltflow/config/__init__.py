"""Strict dataclass configs loaded from YAML with dotted overrides."""

from tiltflow.config.loader import ConfigError, apply_overrides, from_dict, load_config, to_dict, to_yaml

__all__ = ["ConfigError", "apply_overrides", "from_dict", "load_config", "to_dict", "to_yaml"]
