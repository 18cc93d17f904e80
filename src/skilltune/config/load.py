"""Turn a YAML file plus ``--set`` overrides into a validated :class:`SkilltuneConfig`.

All problems are collected and raised together as one :class:`ConfigError`, each
naming the field path, the bad value and what is allowed.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import ValidationError

from skilltune.config.schema import SkilltuneConfig
from skilltune.errors import ConfigError

# Fields holding file paths: relative values are resolved against the config file's folder.
_PATH_FIELDS = {("data", "train"), ("data", "val"), ("data", "test"), ("eval", "db"), ("eval", "json_schema"),
                ("eval", "grammar")}


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """Parse ``["train.lr=1e-4", "adapter.method=dora"]`` into a nested dict.

    Values are read as YAML scalars, so ``1e-4`` is a float and ``[a, b]`` a list.
    """
    nested: dict[str, Any] = {}
    problems = []
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. --set train.lr=1e-4")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else raw
        except yaml.YAMLError:
            value = raw
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
            if not isinstance(cursor, dict):
                problems.append(f"--set {item!r}: {part} is both a value and a section")
                break
        else:
            cursor[parts[-1]] = value
    if problems:
        raise ConfigError(problems, source="--set")
    return nested


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError([f"config file not found: {path} (working directory: {Path.cwd()})"])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError([f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}"])
    return raw


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error["loc"]) or "(config)"
    msg = error["msg"]
    if error["type"] == "extra_forbidden":
        return f"{loc}: unknown field (got {error['input']!r}); check the spelling in `skilltune config show`"
    if error["type"] == "literal_error":
        return f"{loc}: got {error['input']!r}; {msg[0].lower() + msg[1:]}"
    if "input" in error and not isinstance(error["input"], dict):
        return f"{loc}: got {error['input']!r}; {msg[0].lower() + msg[1:]}"
    return f"{loc}: {msg}"


# What a command checks beyond the schema (data files exist, names are registered): problems, one line each.
Checks = Callable[[SkilltuneConfig], list[str]]


def _without(data: dict[str, Any], locations: list[tuple]) -> dict[str, Any]:
    """``data`` less the fields at ``locations`` (they fall back to their defaults)."""
    rest = copy.deepcopy(data)
    for loc in locations:
        parent = rest
        for key in loc[:-1]:
            parent = parent.get(key) if isinstance(parent, dict) else None
        if loc and isinstance(parent, dict):
            parent.pop(loc[-1], None)
    return rest


def validate(data: dict[str, Any], source: str | None = None, checks: Checks | None = None) -> SkilltuneConfig:
    """Validate a raw mapping, reporting every problem at once: the schema's and those ``checks`` finds.

    When fields fail the schema, ``checks`` still runs on the rest (the failed fields at their defaults), so
    a wrong type and an unknown method in one file are reported together, not one run after the other.
    """
    try:
        cfg = SkilltuneConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_describe(e) for e in exc.errors()]
        if checks is not None:
            try:
                rest = SkilltuneConfig.model_validate(_without(data, [tuple(e["loc"]) for e in exc.errors()]))
            except ValidationError:
                rest = None  # an error the schema finds across fields: the schema's list is what can be said
            if rest is not None:
                failed = tuple(".".join(map(str, e["loc"])) + ":" for e in exc.errors())  # said once, by the schema
                problems += [p for p in checks(rest) if not p.startswith(failed)]
        raise ConfigError(problems, source=source) from None
    problems = checks(cfg) if checks is not None else []
    if problems:
        raise ConfigError(problems, source=source)
    return cfg


def _resolve_paths(data: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    for section, field in _PATH_FIELDS:
        value = data.get(section, {}).get(field) if isinstance(data.get(section), dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            data[section][field] = str((base_dir / value).resolve())
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                checks: Checks | None = None) -> SkilltuneConfig:
    """Load ``path`` (optional), apply ``--set`` overrides and validate (with ``checks``, see :func:`validate`).

    Relative data paths in the file are taken relative to the file's folder;
    relative paths given with ``--set`` are taken relative to the working directory.
    """
    data: dict[str, Any] = {}
    source = None
    if path is not None:
        path = Path(path)
        source = str(path)
        data = _resolve_paths(_read_yaml(path), path.parent.resolve())
    return config_from_dict(data, overrides, source, checks)


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None,
                     source: str | None = None, checks: Checks | None = None) -> SkilltuneConfig:
    """Validate a config mapping (e.g. one the registry kept) with ``--set`` overrides applied."""
    extra = _resolve_paths(parse_overrides(overrides), Path.cwd())
    return validate(_merge(data, extra), source=source, checks=checks)


def dump_config(config: SkilltuneConfig) -> str:
    """The resolved configuration as YAML."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
