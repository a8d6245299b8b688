"""Typed configuration: frozen dataclasses built from YAML files and ``key=value`` overrides.

Every config in jaxeff is a frozen dataclass. :func:`from_dict` builds one from plain data (a parsed YAML file),
checking every key and every value against the field types, so a typo or a wrong type fails at load time with
an error that names the field, the expected and the actual value::

    cfg = load_config(TrainConfig, "configs/lm_tiny.yaml", overrides=["optim.lr=1e-3", "train.steps=50"])
"""

from __future__ import annotations

import dataclasses
import pathlib
import re
import types
import typing
from typing import Any, Literal, Mapping, Sequence, TypeVar, Union

import yaml

T = TypeVar("T")

_YAML11_FLOAT_AS_STR = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or inconsistent with another one."""


def config_error(field: str, expected: str, actual: Any) -> ConfigError:
    """The one error format used for every config problem: field, expected, actual."""
    return ConfigError(f"config field '{field}': expected {expected}, got {actual!r}")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (tuple, list, Sequence):
        args = typing.get_args(tp)
        inner = _type_name(args[0]) if args else "any"
        return f"a list of {inner}"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping for {tp.__name__}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Checks ``value`` against the annotation ``tp`` and converts it (lists to tuples, dicts to dataclasses)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError as e:
                errors.append(e)
        raise config_error(path, _type_name(tp), value)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise config_error(path, _type_name(tp), value)
    if origin in (tuple, list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise config_error(path, _type_name(tp), value)
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise config_error(path, f"a list of {len(args)} items", value)
            return tuple(_convert(v, a, f"{path}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        return tuple(_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise config_error(path, "a mapping", value)
        _, vt = typing.get_args(tp) or (Any, Any)
        return {str(k): _convert(v, vt, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise config_error(path, _type_name(tp), value)
        return from_dict(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise config_error(path, "bool", value)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise config_error(path, "int", value)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _YAML11_FLOAT_AS_STR.match(value.strip()):
            # PyYAML follows YAML 1.1, which reads exponent floats without a dot (``3e-4``) as strings.
            return float(value)
        raise config_error(path, "float", value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise config_error(path, "str", value)
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise config_error(path, tp.__name__, value)
    return value


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds the dataclass ``cls`` from ``data``, rejecting unknown keys and wrongly typed values."""
    if not isinstance(data, Mapping):
        raise config_error(path or cls.__name__, f"a mapping for {cls.__name__}", data)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config field(s) {', '.join(where + k for k in unknown)} for {cls.__name__}; "
            f"known fields: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        fpath = f"{path}.{name}" if path else name
        if name in data:
            kwargs[name] = _convert(data[name], hints[name], fpath)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config field '{fpath}' is required ({_type_name(hints[name])}) but missing")
    return cls(**kwargs)


def to_dict(cfg: Any) -> Any:
    """The inverse of :func:`from_dict`: plain dicts/lists, suitable for YAML or JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, Mapping):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies ``a.b.c=value`` overrides to nested dict ``data`` (values parsed as YAML scalars)."""
    data = _deep_copy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("--"):
            key = key[2:]
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value {raw!r} is not valid YAML ({e})") from None
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.get(p)
            if child is None:
                child = node[p] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section (it holds {child!r})")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _deep_copy(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_deep_copy(v) for v in d]
    return d


def load_yaml(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.exists():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(cls: type[T], path: str | pathlib.Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Loads ``cls`` from a YAML file (optional) plus ``key=value`` overrides."""
    data = load_yaml(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides))


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)
