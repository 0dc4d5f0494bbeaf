"""Typed settings from files and ``key=value`` overrides, for any settings dataclass."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting that does not exist, has the wrong type, or a settings file that cannot be read."""


def read_settings_file(path: str | Path) -> dict:
    """Settings from a YAML or JSON file (JSON is YAML too)."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"cannot read settings file {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError(f"settings file {path} must hold a mapping of setting: value")
    return values


def split_setting(item: str, option: str = "--set") -> tuple[str, str]:
    """A ``KEY=VALUE`` option value as (key, value), stripped; a ConfigError naming ``option`` otherwise."""
    if "=" not in item:
        raise ConfigError(f"{option} expects KEY=VALUE, got {item!r}")
    key, value = item.split("=", 1)
    return key.strip(), value.strip()


def build_settings(cls: type[T], values: dict, what: str) -> T:
    """An instance of the dataclass ``cls`` from defaults and ``values`` (CLI strings are parsed). A field that
    is itself a settings dataclass (a block) takes a mapping, or dotted keys: ``{"memory": {"rank": 8}}`` and
    ``{"memory.rank": "8"}`` say the same."""
    settings = _build(cls, nest_settings(values), what, "")
    validate = getattr(settings, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as error:
            raise ConfigError(f"{what}: {error}") from error
    return settings


def nest_settings(values: dict) -> dict:
    """``values`` with dotted keys turned into nested mappings, merged with the mappings given as such."""
    nested: dict = {}
    for key, value in values.items():
        *blocks, name = str(key).split(".")
        target = nested
        for block in blocks:
            target = target.setdefault(block, {})
            if not isinstance(target, dict):
                raise ConfigError(f"setting {block!r} is not a block of settings: {key!r} cannot be set")
        if isinstance(value, dict) and isinstance(target.get(name), dict):
            target[name] = target[name] | nest_settings(value)
        else:
            target[name] = nest_settings(value) if isinstance(value, dict) else value
    return nested


def flat_settings(settings) -> dict:
    """A settings dataclass (or its ``asdict`` mapping) as ``{dotted name: value}``, for parameter logs."""
    values = dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else settings
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= {f"{key}.{inner_key}": inner for inner_key, inner in flat_settings(value).items()}
        else:
            flat[key] = value
    return flat


def setting_names(cls: type) -> list[str]:
    """Every setting of the dataclass ``cls``, blocks' settings dotted."""
    return sorted(flat_settings(cls()))


def _build(cls: type[T], values: dict, what: str, prefix: str) -> T:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in fields:
            names = ", ".join(prefix + name for name in setting_names(cls))
            raise ConfigError(f"{what} has no setting {prefix + key!r}; settings: {names}")
        field = fields[key]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix + key!r} is a block of settings: set {prefix + key}.NAME=VALUE "
                                  f"({', '.join(f'{prefix + key}.{name}' for name in setting_names(type(default)))})")
            typed[key] = _build(type(default), value, what, f"{prefix}{key}.")
        else:
            typed[key] = coerce_setting(prefix + key, value, default)
    return cls(**typed)


def coerce_setting(key: str, value, default):
    """``value`` (a CLI string or a parsed value) as the type of ``default``; a ConfigError naming ``key`` if it is not one."""
    if isinstance(default, tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        return tuple(str(item).strip() for item in items if str(item).strip())
    if isinstance(value, str) and not isinstance(default, str):
        value = yaml.safe_load(value)  # "1e-3", "true", "40" as YAML reads them
        if isinstance(value, str) and isinstance(default, float):
            try:
                value = float(value)  # YAML 1.1 reads "1e-3" as a string
            except ValueError:
                pass
    if isinstance(default, bool) != isinstance(value, bool) or not isinstance(value, (type(default), int)):
        raise ConfigError(f"setting {key!r} expects {type(default).__name__}, got {value!r}")
    return type(default)(value)
