"""Parsing and validating config values against dataclass fields.

Every key is a dataclass field; the constraints a user can break (choices, ranges) live in the
field's metadata (:func:`vidbatch.core.settings.setting`), so one validator serves every key and
every error names the key and what is valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from vidbatch.core.errors import ConfigError

__all__ = ["build", "check_constraints", "coerce", "did_you_mean", "join_key", "type_name"]


def did_you_mean(word: object, candidates: typing.Iterable[object], prefix: str = "") -> str:
    """" (did you mean 'edit.steps'?)" for the candidate closest to `word` (joined to `prefix`), or "" when
    none is close (difflib's ratio below 0.6)."""
    names = [str(c) for c in candidates]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" (did you mean {join_key(prefix, close[0])!r}?)" if close else ""


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping of keys to values"
    if dataclasses.is_dataclass(tp):
        return "a mapping with keys " + ", ".join(f.name for f in dataclasses.fields(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null"}.get(tp, str(tp))


def coerce(value: Any, tp: Any, path: str) -> Any:
    """Returns `value` as type `tp`, or raises ConfigError naming `path`."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")
        key_tp, value_tp = typing.get_args(tp)
        return {k: coerce(v, value_tp, f"{path}.{k}") for k, v in value.items()}
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return coerce(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [coerce(item, item_tp, f"{path}[{i}]") for i, item in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")
        return build(tp, value, path)
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{path}' must be {type_name(tp)}, got {value!r}")


def check_constraints(value: Any, meta: typing.Mapping, path: str) -> None:
    if value is None or isinstance(value, (list, dict)) or dataclasses.is_dataclass(value):
        return
    choices = meta.get("choices")
    if callable(choices):  # choices that come from a registry, read when validating
        choices = choices()
    if choices is not None and value not in choices:
        valid = ", ".join(repr(c) for c in choices)
        hint = did_you_mean(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"config key '{path}' must be one of {valid}, got {value!r}{hint}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if meta.get("min") is not None and value < meta["min"]:
            raise ConfigError(f"config key '{path}' must be >= {meta['min']}, got {value!r}")
        if meta.get("max") is not None and value > meta["max"]:
            raise ConfigError(f"config key '{path}' must be <= {meta['max']}, got {value!r}")


def build(cls: type, data: dict, prefix: str) -> Any:
    """An instance of dataclass `cls` from `data`: every key known, coerced to its type and within
    its field's constraints; missing keys take their defaults. `prefix` names the section in errors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            where = f"'{prefix}'" if prefix else "the top level"
            raise ConfigError(f"unknown config key '{join_key(prefix, str(key))}'{did_you_mean(key, fields, prefix)}; "
                              f"valid keys in {where}: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        path = join_key(prefix, name)
        if name in data:
            value = coerce(data[name], hints[name], path)
        else:
            value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            if isinstance(value, list) and typing.get_origin(hints[name]) is list:
                value = coerce(value, hints[name], path)
        check_constraints(value, f.metadata, path)
        values[name] = value
    return cls(**values)


def join_key(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
