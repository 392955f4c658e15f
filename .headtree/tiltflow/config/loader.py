"""A strict YAML -> dataclass loader: unknown keys, wrong types and invalid values are errors that
name the dotted path, what was given and what was expected. Values are parsed with yaml.safe_load;
nothing from a config is ever evaluated as code."""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config problem, always naming the dotted path."""

    def __init__(self, path: str, message: str):
        shown = path if path.isprintable() else repr(path)[1:-1]  # a key with a newline stays on one line
        message = " / ".join(line.strip() for line in str(message).splitlines() if line.strip())  # one line
        super().__init__(f"config error at '{shown or '<root>'}': {message}")
        self.path = path


class UsageError(ValueError):
    """A command-line argument that cannot work, named with what was expected (exit code 2)."""


# Plain field types: (accepts the YAML value as it is, what the error says was expected).
_SCALARS: dict[type, tuple[Any, str]] = {
    bool: (lambda v: isinstance(v, bool), "true or false"),
    int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    str: (lambda v: isinstance(v, str), "a string"),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, Sequence):
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping for {tp.__name__}, got {type(value).__name__} {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(path, f"got {value!r}, expected one of {_type_name(tp)}")
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                with contextlib.suppress(ConfigError):  # not this member: try the next
                    return _convert(value, a, path)
        raise ConfigError(path, f"got {value!r}, expected {_type_name(tp)}")
    if origin in (list, Sequence):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"got {type(value).__name__} {value!r}, expected {_type_name(tp)}")
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp in _SCALARS:
        accepts, expected = _SCALARS[tp]
        if not accepts(value):
            raise ConfigError(path, f"got {value!r}, expected {expected}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads '1e-3' (no dot) as a string; accept any string that is a plain number.
            try:
                return float(value)
            except ValueError:
                raise ConfigError(path, f"got {value!r}, expected a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"got {value!r}, expected a number")
        return float(value)
    raise ConfigError(path, f"unsupported field type {tp!r}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, recursively; then run each dataclass's validate(path)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}", f"unknown key; valid keys here are {sorted(fields)}")
    obj = cls(**{name: _convert(data[name], hints[name], f"{path}.{name}" if path else name)
                 for name in fields if name in data})
    validate = getattr(obj, "validate", None)
    if validate is not None:
        try:
            validate(path)
        except ConfigError:
            raise
        except (ValueError, TypeError, IndexError, ArithmeticError, RuntimeError) as err:
            # A check that cannot even run on these values (e.g. a ragged matrix): still the config's problem.
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ConfigError(path, f"invalid values here ({type(err).__name__}: {first})") from None
    return obj


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(to_dict(obj), sort_keys=False)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(".".join(keys[: i + 1]), f"cannot set '{dotted}': this key is not a mapping")
        node = child
    node[keys[-1]] = value


def apply_overrides(tree: dict, overrides: Sequence[str]) -> dict:
    """Apply 'a.b.c=value' strings; the value is parsed as YAML (so 0.5, true, [1, 2], null work)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(item, "override must look like 'dotted.key=value'")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(key, f"malformed override key in {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(key, f"cannot parse value {raw!r}: {e}") from None
        _set_dotted(tree, key, value)
    return tree


def _parse_yaml(p: Path) -> dict:
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError("", f"malformed YAML in {str(p)!r}{where}: {e.problem or e.context}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError("", f"cannot read {str(p)!r} as YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("", f"{str(p)!r} must hold a mapping at the top level, got {type(data).__name__}")
    return data


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping. A top-level `base:` (a path, or a list of paths, relative to this file) names files
    this one extends: they are merged first, in order, and this file's keys win."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("", f"config file {str(p)!r} does not exist")
    if p.resolve() in _seen:
        raise ConfigError("base", f"{str(p)!r} extends itself through 'base'")
    data = _parse_yaml(p)
    bases = data.pop("base", None)
    if bases is None:
        return data
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError("base", f"in {str(p)!r}: got {bases!r}, expected a path or a list of paths")
    merged: dict = {}
    for b in bases:
        merged = deep_merge(merged, read_yaml(p.parent / b, (*_seen, p.resolve())))
    return deep_merge(merged, data)


def deep_merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(cls: type, path: str | Path | None, overrides: Sequence[str] = (),
                presets: dict[str, dict] | None = None, preset_key: str | None = None) -> Any:
    """File, then overrides; if `preset_key` names a field whose value selects a preset, the preset is
    applied first (file and overrides win over it)."""
    return from_dict(cls, user_tree(path, overrides, presets, preset_key))


def user_tree(path: str | Path | None, overrides: Sequence[str] = (), presets: dict[str, dict] | None = None,
              preset_key: str | None = None) -> dict:
    """The config tree before typing: file (with its bases), overrides, and the selected preset under them."""
    tree = read_yaml(path) if path is not None else {}
    user = apply_overrides(dict(tree), overrides)
    if presets is not None and preset_key is not None and preset_key in user:
        name = user[preset_key]
        if isinstance(name, str) and name in presets:
            user = deep_merge(presets[name], user)
    return user
