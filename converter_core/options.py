"""Backend options: each backend declares a dataclass; `--backend-option` strings become instances of it.

`KEY=VALUE` sets a field of every requested backend that has it; `BACKEND.KEY=VALUE` sets one
backend's. A field typed `dict[str, T]` takes one entry per key: `axis_ranges.batch=1,2,8`. A key
that no requested backend knows, or a value that does not fit the field's type, is an InputError
naming the backend and its known options; a misspelt option is never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, Union

from converter_core.errors import InputError


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """A backend without options."""


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _type_name(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is dict:
        return f"{{KEY: {_type_name(args[1])}}}"
    if origin is tuple:
        inner = ", ".join(_type_name(a) for a in args if a is not Ellipsis)
        return f"({inner}{', ...' if Ellipsis in args else ''})"
    return "none" if kind is type(None) else getattr(kind, "__name__", str(kind))


def _coerce_union(args: tuple[Any, ...], value: Any) -> Any:
    if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("", "none"))):
        return None
    for arm in (a for a in args if a is not type(None)):
        try:
            return _coerce(arm, value)
        except ValueError:
            continue
    raise ValueError(f"expected {' | '.join(_type_name(a) for a in args)}")


def _coerce_literal(args: tuple[Any, ...], value: Any) -> Any:
    for choice in args:
        if value == choice or (isinstance(value, str) and value == str(choice)):
            return choice
    raise ValueError(f"expected one of {', '.join(map(repr, args))}")


def _coerce_tuple(args: tuple[Any, ...], value: Any) -> tuple[Any, ...]:
    items = value.split(",") if isinstance(value, str) else list(value)
    arms = [args[0]] * len(items) if Ellipsis in args else list(args)
    if len(arms) != len(items):
        raise ValueError(f"expected {len(arms)} comma-separated values")
    return tuple(_coerce(arm, item) for arm, item in zip(arms, items))


def _coerce_dict(args: tuple[Any, ...], value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError("expected KEY.ENTRY=VALUE entries")
    return {str(key): _coerce(args[1], item) for key, item in value.items()}


def _coerce_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in TRUE + FALSE:
        return value.strip().lower() in TRUE
    raise ValueError("expected true or false")


def _coerce_int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError("expected an integer")
    try:
        return int(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("expected an integer") from None


def _coerce_float(value: Any) -> float:
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if isinstance(value, bool) or not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _coerce_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected text")
    return value


def _coerce_path(value: Any) -> Path:
    if not isinstance(value, (str, Path)) or not str(value):
        raise ValueError("expected a path")
    return Path(value).expanduser()


_BY_ORIGIN = {Union: _coerce_union, types.UnionType: _coerce_union, Literal: _coerce_literal,
              tuple: _coerce_tuple, dict: _coerce_dict}
_BY_TYPE = {bool: _coerce_bool, int: _coerce_int, float: _coerce_float, str: _coerce_str, Path: _coerce_path}


def _coerce(kind: Any, value: Any) -> Any:
    """`value` (a string from the command line, or a Python value) as `kind`; ValueError if it is not one."""
    origin = typing.get_origin(kind)
    if origin in _BY_ORIGIN:
        return _BY_ORIGIN[origin](typing.get_args(kind), value)
    if kind in _BY_TYPE:
        return _BY_TYPE[kind](value)
    raise ValueError(f"unsupported option type {_type_name(kind)}")


def option_table(options_type: type) -> list[dict[str, Any]]:
    """Name, type, default and help of every option of a backend, as `convert backends --json` lists them."""
    hints = typing.get_type_hints(options_type)
    rows = []
    for spec in dataclasses.fields(options_type):
        default = spec.default if spec.default is not dataclasses.MISSING else (
            spec.default_factory() if spec.default_factory is not dataclasses.MISSING else None)
        rows.append({"name": spec.name, "type": _type_name(hints[spec.name]),
                     "default": str(default) if isinstance(default, Path) else default,
                     "help": spec.metadata.get("help", "")})
    return rows


def known_options(backend: str, options_type: type) -> str:
    names = [spec.name for spec in dataclasses.fields(options_type)]
    return f"backend {backend} takes " + (", ".join(names) if names else "no options")


def _typed(backend: str, shown: str, kind: Any, value: Any) -> Any:
    try:
        return _coerce(kind, value)
    except ValueError as exc:
        raise InputError(f"backend {backend}: option {shown}={value!r}: {exc}") from None


def _build(backend: str, options_type: type, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(options_type)
    fields = {spec.name for spec in dataclasses.fields(options_type)}
    typed = {}
    for name, value in values.items():
        if name not in fields:
            raise InputError(f"unknown option {name!r} for backend {backend}; {known_options(backend, options_type)}")
        kind = hints[name]
        if typing.get_origin(kind) is dict and isinstance(value, Mapping):  # entry by entry, so a bad one is named
            typed[name] = {str(key): _typed(backend, f"{name}.{key}", typing.get_args(kind)[1], item)
                           for key, item in value.items()}
        else:
            typed[name] = _typed(backend, name, kind, value)
    try:
        return options_type(**typed)
    except (TypeError, ValueError) as exc:  # a dataclass's own __post_init__ checks
        raise InputError(f"backend {backend}: {exc}") from None


def _set(values: dict[str, Any], key: str, value: Any) -> None:
    name, dot, entry = key.partition(".")
    if not dot:
        values[name] = value
        return
    existing = values.setdefault(name, {})
    if not isinstance(existing, dict):
        raise InputError(f"option {name} is given both whole and as {key}")
    existing[entry] = value


def resolve_backend_options(backends: Mapping[str, type], given: Mapping[str, Any]) -> dict[str, Any]:
    """One options instance per backend in `backends` (name -> options dataclass type).

    `given` maps keys to values: `KEY`, `KEY.ENTRY` (a dict field), `BACKEND.KEY[.ENTRY]`, or
    `BACKEND` -> an options instance or a dict of its fields.
    """
    per_backend: dict[str, dict[str, Any]] = {name: {} for name in backends}
    ready: dict[str, Any] = {}
    for key, value in given.items():
        scope, dot, rest = key.partition(".")
        if scope in backends and not dot:
            if isinstance(value, backends[scope]):
                ready[scope] = value
                continue
            if not isinstance(value, Mapping):
                raise InputError(f"backend {scope}: options must be a {backends[scope].__name__} or a mapping")
            for name, item in value.items():
                _set(per_backend[scope], name, item)
        elif scope in backends:
            _set(per_backend[scope], rest, value)
        else:
            takers = [name for name, kind in backends.items()
                      if scope in {spec.name for spec in dataclasses.fields(kind)}]
            if not takers:
                listing = "; ".join(known_options(name, kind) for name, kind in backends.items())
                asked = ", ".join(backends) or "none"
                raise InputError(f"unknown backend option {key!r} (backends asked for: {asked}); "
                                 f"{listing or 'no backend takes options'}")
            for name in takers:
                _set(per_backend[name], key, value)
    for name, kind in backends.items():
        if name in ready:
            if per_backend[name]:
                raise InputError(f"backend {name}: options given both as an object and as keys")
            continue
        ready[name] = _build(name, kind, per_backend[name])
    return ready


def parse_option_items(items: list[str] | None) -> dict[str, str]:
    """`KEY=VALUE` strings as given on the command line; a later key replaces an earlier one."""
    parsed: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"bad --backend-option {item!r}: expected KEY=VALUE (or BACKEND.KEY=VALUE)")
        parsed[key.strip()] = value.strip()
    return parsed
