"""Strict loading of typed dataclass configs: defaults in code < YAML preset < ``--set a.b=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key, so a typo never silently trains the wrong
thing. The resolved config is plain data (:func:`to_dict`) and is saved with every run and checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar, get_args, get_origin, get_type_hints

import yaml

from blindnet.io import write_text

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")


class ConfigError(ValueError):
    """A config file or override does not fit the config's dataclasses."""


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict of a dataclass config (tuples become lists, for YAML)."""

    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def from_dict(cls: type[T], data: dict[str, Any] | None, *, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; missing keys keep their defaults, unknown keys raise."""
    data = dict(data or {})
    if not isinstance(data, dict):
        raise ConfigError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(
            f"unknown config key(s) {[where + k for k in unknown]} for {cls.__name__}; valid keys here: {sorted(names)}"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{path}.{name}" if path else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # a type hint: a dataclass, never an instance
        if dataclasses.is_dataclass(value):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path=key)
    if origin is Literal:
        allowed = get_args(tp)
        if isinstance(value, bool) and value not in allowed:
            # YAML 1.1 reads a bare on/off/yes/no as a boolean: `--set runtime.amp=off` must mean the word "off"
            words = ("on", "yes", "true") if value else ("off", "no", "false")
            value = next((w for w in words if w in allowed), value)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{key}: {value!r} fits none of {args} ({'; '.join(errors)})")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        items = [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> ``(["a", "b"], value)``; the value is parsed as YAML (``1e-3``, ``true``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: cannot parse value ({exc})") from exc
    return key.split("."), value


def key_value_pairs(
    items: Sequence[str], flag: str, *, form: str = "KEY=VALUE", value_optional: bool = False
) -> dict[str, str]:
    """``["a=1", "b=x=y"]`` -> ``{"a": "1", "b": "x=y"}``: command-line ``KEY=VALUE`` lists, split at the first '='.

    With ``value_optional`` a bare ``KEY`` maps to itself. Raises ConfigError naming ``flag`` for an item without '='
    (or with an empty key or value) and for a key given twice, so a typo never silently drops or replaces an entry.
    """
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep and value_optional:
            value = key
        if not key or not value:
            raise ConfigError(f"{flag} takes {form}, got {item!r}")
        if key in out:
            raise ConfigError(f"{flag}: {key!r} is given twice")
        out[key] = value
    return out


def merge(base: dict[str, Any], diff: dict[str, Any]) -> dict[str, Any]:
    """Recursive dict merge (``diff`` wins)."""
    out = dict(base)
    for k, v in diff.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


#: Top-level preset key naming another preset (a file name without ``.yaml``, in the same folder) that this one
#: changes: a family of presets then holds its shared recipe once and each member only its differences.
EXTENDS_KEY = "extends"


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML preset; an empty file is ``{}``; anything but a mapping is an error.

    ``extends: other`` loads ``other.yaml`` from the same folder first and merges this file over it (mappings merge
    key by key, lists and scalars are replaced); chains are followed and a cycle is an error.
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    parent = data.pop(EXTENDS_KEY, None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent:
        raise ConfigError(f"{path}: {EXTENDS_KEY!r} must name a preset, got {parent!r}")
    parent_path = path.parent / (parent if parent.endswith((".yaml", ".yml")) else f"{parent}.yaml")
    if not parent_path.exists():
        raise ConfigError(f"{path}: {EXTENDS_KEY}: {parent!r} not found (looked for {parent_path})")
    chain = (*_seen, path.resolve())
    if parent_path.resolve() in chain:
        raise ConfigError(f"{path}: {EXTENDS_KEY} chain loops back to {parent_path}")
    return merge(load_yaml(parent_path, chain), data)


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Set ``a.b=value`` strings into the nested ``data`` (in place, returned); an unknown key is an error."""
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for i, k in enumerate(keys[:-1]):
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"override {text!r}: {'.'.join(keys[: i + 1])} is not a config section")
            node = node[k]
        if keys[-1] not in node:
            raise ConfigError(f"override {text!r}: unknown key {'.'.join(keys)}; valid keys here: {sorted(node)}")
        node[keys[-1]] = value
    return data


def resolve(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Defaults < YAML file at ``path`` < ``overrides`` (``a.b=value`` strings), strictly typed."""
    data = to_dict(cls())
    if path is not None:
        data = merge(data, load_yaml(path))
    return from_dict(cls, apply_overrides(data, overrides))


def dump_yaml(cfg: Any) -> str:
    """The resolved config as YAML text, in field order."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_yaml(cfg: Any, path: str | Path) -> Path:
    """Write the resolved config as YAML (atomically)."""
    return write_text(path, dump_yaml(cfg))
