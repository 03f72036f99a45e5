"""Typed mappings -> nested frozen dataclasses, with errors that name the full dotted key.

A section is a frozen dataclass whose fields carry `metadata={"help": ...}` (see `option`). `build` turns a
plain mapping (from YAML) into it, checking every key and type; `describe` lists every key for `--help`.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping


class RecipeError(ValueError):
    """A bad recipe value. `key` is the dotted key relative to the section that raised it."""

    def __init__(self, key: str, message: str):
        self.key, self.message = key, message
        super().__init__(f"recipe key {key} {message}" if key else message)

    def under(self, prefix: str) -> "RecipeError":
        return RecipeError(f"{prefix}.{self.key}" if self.key else prefix, self.message)


def option(default: Any, help: str) -> Any:
    """A dataclass field with a default and a one-line description for `--help`."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: _copy(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def _copy(value):
    return type(value)(value) if isinstance(value, (dict, list)) else value


def check(condition: bool, key: str, message: str) -> None:
    """Raise a RecipeError for `key` unless `condition` holds (for use in __post_init__)."""
    if not condition:
        raise RecipeError(key, message)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return "|".join(_type_name(a) for a in args)
    if origin is Literal:
        return "|".join(str(a) for a in args)
    if origin is tuple:
        return f"list[{_type_name(args[0])}]"
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if dataclasses.is_dataclass(tp):
        return "section"
    return getattr(tp, "__name__", str(tp))


def _convert(tp, value, key: str):
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples, ints -> floats)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in (a for a in args if a is not type(None)):
            try:
                return _convert(arm, value, key)
            except RecipeError:
                continue
        raise RecipeError(key, f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if origin is Literal:
        if value in args:
            return value
        raise RecipeError(key, f"must be one of {', '.join(map(str, args))}; got {value!r}")
    if origin is tuple:
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            raise RecipeError(key, f"must be a list, got {value!r} ({type(value).__name__})")
        return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return build(tp, value, key)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is dict:
        if isinstance(value, Mapping):
            return dict(value)
    elif isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise RecipeError(key, f"must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def build(cls, raw: Mapping | None, prefix: str = ""):
    """Build dataclass `cls` from `raw`; unknown keys and wrong types raise RecipeError with the dotted key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise RecipeError(prefix, f"must be a mapping of keys, got {raw!r} ({type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    dotted = (lambda k: f"{prefix}.{k}" if prefix else str(k))
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {dotted(close[0])}?" if close else f"; known keys: {', '.join(fields)}"
            raise RecipeError(dotted(key), f"is unknown{hint}")
    kwargs = {name: _convert(hints[name], raw[name], dotted(name)) for name in fields if name in raw}
    for name, f in fields.items():  # sections left out of the YAML still get validated defaults
        if name not in kwargs and dataclasses.is_dataclass(hints[name]):
            kwargs[name] = build(hints[name], {}, dotted(name))
    try:
        return cls(**kwargs)
    except RecipeError as err:
        raise (err.under(prefix) if prefix else err) from None


def to_plain(obj) -> Any:
    """Dataclass tree -> plain dicts/lists (the inverse of `build`, for manifests and trackers)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_plain(v) for k, v in obj.items()}
    return obj


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(tree, Mapping):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def describe(cls, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Every key of `cls` as (dotted key, type, default, help), sections expanded in field order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dotted = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            rows.extend(describe(hints[f.name], dotted))
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        rows.append((dotted, _type_name(hints[f.name]), _yaml_repr(default), f.metadata.get("help", "")))
    return rows


def _yaml_repr(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return "[" + ", ".join(_yaml_repr(v) for v in value) + "]"
    return repr(value) if isinstance(value, str) else str(value)
