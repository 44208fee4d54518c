"""A typed tree of dataclasses read from YAML and dotted overrides (used by metapo_fast.config).

Generic over the schema: every function takes the root dataclass. Values from YAML and from the
command line go through the same coercion, driven by the field's type (bool, int, float, str,
Optional[...], Literal[...]); unknown keys are errors listing the closest valid keys (difflib).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Mapping, Optional, Sequence, Union

__all__ = ["ConfigError", "bad_value", "coerce", "from_dict", "parse_overrides", "deep_merge", "read_yaml",
           "describe", "flatten", "leaf_keys", "hints"]


class ConfigError(ValueError):
    """An invalid configuration value or combination (raised at start-up)."""


def bad_value(name: str, value: Any, allowed: str) -> ConfigError:
    """``ConfigError("name=value is invalid: allowed")``."""
    return ConfigError(f"{name}={value!r} is invalid: {allowed}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null", "~", ""}


def hints(cls: type) -> dict[str, Any]:
    """Resolved field types of a dataclass (annotations are strings under ``from __future__``)."""
    return typing.get_type_hints(cls)


def leaf_keys(cls: type, prefix: str = "") -> list[str]:
    """All dotted leaf keys of a dataclass tree."""
    out = []
    types_ = hints(cls)
    for f in dataclasses.fields(cls):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def _unknown_key(key: str, schema: type) -> ConfigError:
    """The error for an unknown dotted key, listing up to 3 close valid keys."""
    keys = leaf_keys(schema)
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    if not close:  # a wrong or missing section name: match on the field name alone
        tails = difflib.get_close_matches(key.rsplit(".", 1)[-1], sorted({k.rsplit(".", 1)[-1] for k in keys}), n=3, cutoff=0.6)
        close = [k for k in keys if k.rsplit(".", 1)[-1] in tails][:3]
    hint = f"; did you mean {', '.join(close)}?" if close else "; see metapo_fast.config.describe() for all keys"
    return ConfigError(f"unknown config key {key!r}{hint}")


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert ``value`` (from YAML or a command-line string) to the field type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if type(None) in args:
            if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
                return None
            rest = [a for a in args if a is not type(None)]
            return coerce(value, rest[0] if len(rest) == 1 else Union[tuple(rest)], name)
        raise ConfigError(f"{name}: unsupported field type {tp}")  # pragma: no cover - schema bug
    if value is None:
        raise bad_value(name, value, "must not be null")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices and isinstance(value, type(choices[0])):
            return value
        close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        raise bad_value(name, value, f"must be one of {list(choices)}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise bad_value(name, value, "must be a boolean (true/false)")
    if tp is int:
        if isinstance(value, bool):
            raise bad_value(name, value, "must be an integer, not a boolean")
        if isinstance(value, int):
            return value
        try:
            x = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise bad_value(name, value, "must be an integer") from None
        if math.isfinite(x) and x.is_integer():
            return int(x)
        raise bad_value(name, value, "must be an integer")
    if tp is float:
        if isinstance(value, bool):
            raise bad_value(name, value, "must be a number, not a boolean")
        try:
            x = float(value.strip()) if isinstance(value, str) else float(value)
        except (TypeError, ValueError):
            raise bad_value(name, value, "must be a number") from None
        if not math.isfinite(x):
            raise bad_value(name, value, "must be a finite number")
        return x
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)  # e.g. a YAML revision 20240101 read as an int
        raise bad_value(name, value, "must be a string")
    raise ConfigError(f"{name}: unsupported field type {tp}")  # pragma: no cover - schema bug


def from_dict(cls: type, data: Mapping[str, Any], _prefix: str = "", _schema: Optional[type] = None) -> Any:
    """Build the dataclass ``cls`` from a nested mapping, coercing every value and rejecting unknown keys."""
    schema = _schema or cls
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_prefix.rstrip('.') or 'config'} must be a mapping of keys to values, got {type(data).__name__}")
    types_ = hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{_prefix}{key}"
        if key not in names:
            raise _unknown_key(dotted, schema)
        tp = types_[key]
        if dataclasses.is_dataclass(tp):
            if value is None:
                continue  # an empty section in YAML ("meta:" with nothing under it)
            if not isinstance(value, Mapping):
                raise ConfigError(f"{dotted} is a section, not a value; set its fields, e.g. {leaf_keys(tp, dotted + '.')[0]}=...")
            kwargs[key] = from_dict(tp, value, dotted + ".", schema)
        else:
            kwargs[key] = coerce(value, tp, dotted)
    return cls(**kwargs)


def parse_overrides(overrides: Sequence[str], schema: type) -> dict[str, Any]:
    """``["loss.beta=0.2"]`` -> ``{"loss": {"beta": 0.2}}``, coerced to the field types of ``schema``.

    Unknown keys raise :class:`ConfigError` listing the closest valid keys; a later override of the
    same key wins.
    """
    out: dict[str, Any] = {}
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override {item!r} must have the form section.field=value (e.g. loss.beta=0.2)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-")
        parts = key.split(".")
        cls, node = schema, out
        for i, part in enumerate(parts):
            fields_ = {f.name for f in dataclasses.fields(cls)}
            if part not in fields_:
                raise _unknown_key(key, schema)
            tp = hints(cls)[part]
            last = i == len(parts) - 1
            if dataclasses.is_dataclass(tp):
                if last:
                    raise ConfigError(f"{key} is a section, not a value; set one of its fields, e.g. {leaf_keys(tp, key + '.')[0]}={raw}")
                cls, node = tp, node.setdefault(part, {})
            elif not last:
                raise _unknown_key(key, schema)
            else:
                node[part] = coerce(raw.strip(), tp, key)
    return out


def deep_merge(base: dict, new: Mapping) -> dict:
    """Merge ``new`` into ``base`` recursively (``new`` wins); returns ``base``."""
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), Mapping):
            base[k] = deep_merge(dict(base[k]), v)
        else:
            base[k] = v
    return base


def read_yaml(path: str) -> dict:
    """The mapping held by a YAML file; ConfigError naming the file when it is missing or malformed."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path!r} is not UTF-8 text: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path!r} must hold a mapping of sections, got {type(data).__name__}")
    return data


def describe(schema: type, prefix: str = "") -> str:
    """One line per key: ``key (type, default): doc``, grouped by section."""
    lines = []
    types_ = hints(schema)
    for f in dataclasses.fields(schema):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"[{prefix}{f.name}] {f.metadata.get('doc', '')}")
            lines.append(describe(tp, f"{prefix}{f.name}."))
        else:
            tname = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            lines.append(f"  {prefix}{f.name} ({tname}, default {f.default!r}): {f.metadata.get('doc', '')}")
    return "\n".join(lines)


def flatten(d: Mapping, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
