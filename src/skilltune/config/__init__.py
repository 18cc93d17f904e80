"""Typed configuration: schema, YAML loading, ``--set`` overrides, error reporting."""

from skilltune.config.load import load_config, parse_overrides
from skilltune.config.schema import SkilltuneConfig

__all__ = ["SkilltuneConfig", "load_config", "parse_overrides"]
