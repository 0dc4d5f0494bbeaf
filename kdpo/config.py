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
    """An instance of the dataclass ``cls`` from defaults and ``values`` (CLI strings are parsed)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{what} has no setting {key!r}; settings: {', '.join(sorted(fields))}")
        typed[key] = coerce_setting(key, value, fields[key].default)
    settings = cls(**typed)
    validate = getattr(settings, "validate", None)
    if validate is not None:
        try:
            validate()
        except ValueError as error:
            raise ConfigError(f"{what}: {error}") from error
    return settings


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
