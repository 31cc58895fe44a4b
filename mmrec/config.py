"""Configs are dataclasses that load from YAML, with ``--set key=value`` overrides.

One flat mechanism instead of RecBole-style inheritance chains: a YAML file gives
a nested dict, ``--set a.b=3`` patches it (values parsed as YAML), and
:func:`from_dict` builds the dataclass, rejecting unknown keys with their path.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from mmrec.errors import ConfigError

T = TypeVar("T")


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return data


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Patch a nested dict with ``a.b.c=value`` strings; values are parsed as YAML."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = data
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: '{p}' is not a section")
        node[parts[-1]] = value
    return data


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, path)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(args[0], value, path)
        return value
    if tp in (int, float) and isinstance(value, bool):  # bool is an int in Python: `epochs: true` is a typo
        raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}")
    if tp is float and isinstance(value, (int, float)):
        return float(value)
    if tp is int and isinstance(value, float):
        if not value.is_integer():  # int(1.5) would silently truncate
            raise ConfigError(f"{path}: expected int, got {value!r}")
        return int(value)
    if tp is bool and isinstance(value, str):
        if value.lower() in ("true", "yes", "1"):
            return True
        if value.lower() in ("false", "no", "0"):
            return False
        raise ConfigError(f"{path}: expected a boolean, got '{value}'")
    if tp in (int, float, str, bool) and not isinstance(value, tp) and value is not None:
        try:
            return tp(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from e
    if origin in (list, tuple) and isinstance(value, (int, float, str)):
        return [value]
    return value


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from a dict; unknown keys are an error naming their path."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names, key=str)
    if unknown:
        close = {k: difflib.get_close_matches(str(k), sorted(names), n=1) for k in unknown}
        hint = "; ".join(f"did you mean '{(path + '.' if path else '') + c[0]}'?" for c in close.values() if c)
        raise ConfigError(f"unknown config key(s) {', '.join((path + '.' if path else '') + str(k) for k in unknown)}"
                          f"{'; ' + hint + ' ' if hint else '; '}known: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints.get(k, Any), v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
