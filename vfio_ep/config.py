"""Configuration values: configfs attribute names and spellings, checked strictly.

Users paste what they know from configfs (``vendorid``, ``deviceid``,
``msi_interrupts``, ``bar0_size``, ...), so attributes keep those names and
accept the same spellings (``0x104c``, ``4096``, ``1M``).  Each endpoint
function declares its attributes as a dataclass; unknown names are refused
with the list of known ones.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, TypeVar

T = TypeVar("T")

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


class ConfigError(ValueError):
    """A configuration the user must fix; the message says what and how."""


def parse_int(text: str | int) -> int:
    """configfs-style numbers: decimal, 0x hex, 0o/0 octal, and K/M/G suffixes."""
    if isinstance(text, bool):
        raise ConfigError(f"expected a number, got {text!r}")
    if isinstance(text, int):
        return text
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = 1
    if t and t[-1] in _SUFFIXES:
        scale, t = _SUFFIXES[t[-1]], t[:-1]
    base = 8 if len(t) > 1 and t[0] == "0" and t[1].isdigit() else 0  # kstrtou32(s, 0)
    try:
        return int(t, base) * scale
    except ValueError:
        raise ConfigError(f"not a number: {text!r}") from None


def _convert(kind: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if isinstance(value, str) and value.lower() in ("", "none", "null"):
            return None
        return _convert(args[0], value, key)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "y", "yes", "true", "on"):
            return True
        if str(value).lower() in ("0", "n", "no", "false", "off"):
            return False
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if kind is int:
        try:
            return parse_int(value)
        except ConfigError as e:
            raise ConfigError(f"{key}: {e}") from None
    if kind is str:
        return str(value)
    if origin is tuple:  # tuple[int, ...]: a TOML array, or "0,1" from --set / configfs
        items = value if isinstance(value, list | tuple) else [
            v for v in str(value).split(",") if v.strip()]
        return tuple(_convert(typing.get_args(kind)[0], v, key) for v in items)
    raise ConfigError(f"{key}: unsupported attribute type {kind}")


def attributes(cls: type[T], values: dict[str, Any], owner: str) -> T:
    """Instantiate ``cls`` (a dataclass of attributes) from ``values``, strictly."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{owner} has no attribute {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    try:
        kwargs = {k: _convert(hints[k], v, k) for k, v in values.items()}
    except ConfigError as e:
        raise ConfigError(f"{owner}: {e}") from None
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{owner}: {e}") from None
