"""Configuration values: configfs attribute names and spellings, checked strictly.

Users paste what they know from configfs (``vendorid``, ``deviceid``,
``msi_interrupts``, ``bar0_size``, ...), so attributes keep those names and
accept the same spellings (``0x104c``, ``4096``, ``1M``).  Each endpoint
function declares its attributes as a dataclass; unknown names are refused
with the list of known ones.

An integer attribute declares what its configfs ``_store`` accepts, here and only here: its
type (:data:`U8` ... :data:`U64`, :data:`S32`: the range of the store's ``kstrtou8`` ...
``kstrtoint``) and any narrower :class:`Range` the kernel holds it to.  A value outside is
refused as ``echo`` would be, with the errno, in one line naming the attribute, the value and
the range (:class:`StoreError`); every write, whether from ``--set``, TOML or a configfs
script, goes through :func:`store`.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import re
import typing
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from vfio_ep.errors import ErrnoError

T = TypeVar("T")

_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
# kstrtou*(s, 0) with an optional sign (kstrtoint's; an unsigned store refuses it), and
# vfio-ep's K/M/G[i][B] size suffixes.  ASCII digits only, as the kernel reads them.
_NUMBER = re.compile(r"([+-]?)(0x[0-9a-f]+|0[0-7]*|[1-9][0-9]*)(?:([kmg])(?:i?b)?)?")


class ConfigError(ValueError):
    """A configuration the user must fix; the message says what and how."""


class StoreError(ErrnoError, ConfigError):
    """A value an attribute's store refuses, with the errno ``echo VALUE > ATTR`` gets."""


@dataclass(frozen=True)
class Range:
    """The values ``lo``..``hi`` an integer attribute takes; outside them the store fails
    with errno ``err``, ``why`` saying whose limit it is.  ``sizes`` shows the bounds as
    K/M/G."""

    lo: int
    hi: int
    err: int = errno.EINVAL
    why: str = ""
    sizes: bool = False

    def shown(self) -> str:
        show = format_size if self.sizes else _format_bound
        return f"{show(self.lo)}..{show(self.hi)}"

    def refusal(self, number: int) -> int:
        """The errno for ``number`` outside the range."""
        return self.err


@dataclass(frozen=True)
class Kstrto(Range):
    """An integer type as a kstrtou8/16/32/64 or kstrtoint reads it: too big (or small) is
    -ERANGE; a sign on an unsigned type is no number at all, -EINVAL."""

    err: int = errno.ERANGE

    def refusal(self, number: int) -> int:
        return errno.EINVAL if number < 0 <= self.lo else self.err


U8 = Annotated[int, Kstrto(0, 0xFF)]
U16 = Annotated[int, Kstrto(0, 0xFFFF)]
U32 = Annotated[int, Kstrto(0, 0xFFFF_FFFF)]
U64 = Annotated[int, Kstrto(0, (1 << 64) - 1)]
S32 = Annotated[int, Kstrto(-(1 << 31), (1 << 31) - 1)]


def _format_bound(n: int) -> str:
    """A type's bound in hex (0xffff), any other in decimal (32)."""
    return f"{n:#x}" if n >= 0xFF and not n & (n + 1) else str(n)


def format_size(n: int) -> str:
    """A size as one would write it: 256M, 4K, or plain bytes."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if n >= 1 << shift and not n % (1 << shift):
            return f"{n >> shift}{suffix}"
    return str(n)


def parse_int(text: str | int) -> int:
    """configfs-style numbers, as kstrtou*(s, 0) reads them: decimal, 0x hex, 0 octal; a sign;
    and K/M/G suffixes (``1M``, ``1MiB``).  ConfigError for anything else."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    if not isinstance(text, str):  # a TOML float, list or boolean
        raise ConfigError(f"expected a number, got {text!r}")
    match = _NUMBER.fullmatch(text.strip().lower())
    if not match:
        raise ConfigError(f"not a number: {text!r}")
    sign, digits, suffix = match.groups()
    number = int(digits, 16 if digits.startswith("0x") else 8 if digits[0] == "0" else 10)
    return (-1 if sign == "-" else 1) * number * _SUFFIXES.get(suffix, 1)


def _convert(kind: Any, value: Any) -> Any:
    """``value`` as an attribute of type ``kind``; StoreError (-EINVAL, -ERANGE) says why
    not, without the attribute's name.  A bare ``int`` is a declaration missing its range:
    TypeError, a bug."""
    origin = typing.get_origin(kind)
    if origin is Annotated:
        return _number(kind, value)
    if kind is bool:
        return _boolean(value)
    if kind is str:
        return str(value)
    if origin is tuple:  # tuple[int, ...]: a TOML array, or "0,1" from --set / configfs
        items = value if isinstance(value, list | tuple) else [
            v for v in str(value).split(",") if v.strip()]
        return tuple(_convert(typing.get_args(kind)[0], v) for v in items)
    raise TypeError(f"attribute type {kind} is not one a store can take (declare ints as "
                    "U8, U16, U32, U64 or S32)")


def _ranges(kind: Any) -> list[Range]:
    return [m for m in getattr(kind, "__metadata__", ()) if isinstance(m, Range)]


def _number(kind: Any, value: Any) -> int:
    """An integer attribute's value, held to every range its declaration names."""
    ranges = _ranges(kind)
    text = value.strip() if isinstance(value, str) else value
    try:
        number = parse_int(value)
    except ConfigError:
        raise StoreError(errno.EINVAL, f"{text!r} is not a number "
                         f"({ranges[0].shown()}) (-EINVAL)") from None
    for r in ranges:
        if not r.lo <= number <= r.hi:
            err = r.refusal(number)
            why = f": {r.why}" if r.why else ""
            raise StoreError(err, f"{text} is out of range {r.shown()} "
                             f"(-{errno.errorcode[err]}{why})")
    return number


def _boolean(value: Any) -> bool:
    """kstrtobool's spellings, and true/false."""
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("1", "y", "yes", "true", "on"):
        return True
    if str(value).strip().lower() in ("0", "n", "no", "false", "off"):
        return False
    raise StoreError(errno.EINVAL, f"{value!r} is not a boolean (1/0, y/n, on/off, "
                     "true/false) (-EINVAL)")


def store(cls: type, key: str, value: Any, owner: str) -> Any:
    """One write of ``value`` into attribute ``key`` of ``cls`` (a dataclass of attributes),
    checked as its configfs ``_store`` checks it: the value as the attribute holds it, or
    StoreError naming ``owner/key``."""
    try:
        return _convert(_hints(cls)[key], value)
    except StoreError as e:
        raise StoreError(e.errno, f"{owner}/{key}: {e.reason}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The declared types of ``cls``'s attributes, ranges included (evaluated once)."""
    return typing.get_type_hints(cls, include_extras=True)


def attributes(cls: type[T], values: dict[str, Any], owner: str) -> T:
    """Instantiate ``cls`` (a dataclass of attributes) from ``values``, strictly: each value
    as :func:`store` takes it, and each default left unwritten held to the same ranges (the
    kernel's "unset" db_count 0 fails here, as at its bind)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{owner} has no attribute {', '.join(unknown)}; "
                          f"known: {', '.join(sorted(fields))}")
    kwargs = {k: store(cls, k, v, owner) for k, v in values.items()}
    for name in set(fields) - set(values):
        if isinstance(fields[name].default, int):
            store(cls, name, fields[name].default, owner)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{owner}: {e}") from None
