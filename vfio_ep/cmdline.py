"""What a command line asks to serve: ``--config``, ``--configfs``, ``--function``, ``--set``,
``--socket`` and ``--ep-socket`` turned into one :class:`~vfio_ep.composition.Composition`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from vfio_ep.composition import (
    CONTROLLER_KEYS,
    EP_GUEST_CONTROLLER,
    EP_SOCKET,
    FLAT_ALIASES,
    Composition,
)
from vfio_ep.config import ConfigError
from vfio_ep.configfs_script import parse_script
from vfio_ep.presets import preset_sets


def load(config_file: Path | None, function: str | None, sets: list[str],
         configfs: Path | None = None, sockets: list[str] | None = None,
         preset: str | None = None, ep_sockets: list[str] | None = None) -> Composition:
    """The composition a command line asks for (``--config``, ``--configfs``, ``--function``,
    ``--preset``, ``--set``, ``--socket``, ``--ep-socket``); a preset's items come before the
    ``--set`` ones, which win.  ``--ep-socket`` alone is one controller an EP guest drives,
    given only a preset's controller items (the guest's own script sets its function's);
    ``--ep-socket NAME=PATH`` names it, and several are as many controllers of that guest."""
    if config_file is not None and configfs is not None:
        raise ConfigError("--config and --configfs are two ways of saying the same: pick one")
    if ep_sockets and not (config_file or configfs):
        if function is not None:
            raise ConfigError("--ep-socket serves a controller whose functions an EP guest "
                              "runs: --function is for functions vfio-ep runs itself")
        comp = Composition.ep_guest({}, ep_guest_controllers(ep_sockets))
        if preset is not None:
            sets = [*controller_items(preset_sets(preset, "pci_epf_test")), *sets]
        for item in sets:
            comp.set(item)
        comp.assign_sockets(sockets or [])
        comp.assign_sockets(ep_sockets, EP_SOCKET)
        return comp
    if configfs is not None:
        comp = _no_function_flag(function, parse_script(_read(configfs), str(configfs)),
                                 "--configfs")
    elif config_file is not None:
        data = _parse_toml(config_file)
        if "controllers" in data or "functions" in data:
            comp = _no_function_flag(function, Composition.from_toml(data, str(config_file)),
                                     "a [functions.*] file")
        else:
            comp = Composition.single(function, _flat(data, config_file))
            comp.source = str(config_file)
    else:
        comp = Composition.single(function, {})
    if preset is not None:
        if len(comp.functions) != 1 or len(comp.controllers) != 1:
            raise ConfigError("--preset is for one function on one controller")
        sets = [*preset_sets(preset, next(iter(comp.functions.values())).driver), *sets]
    for item in sets:
        comp.set(item)
    comp.assign_sockets(sockets or [])
    comp.assign_sockets(ep_sockets or [], EP_SOCKET)
    return comp


def ep_guest_controllers(ep_sockets: list[str]) -> list[str]:
    """The controllers ``--ep-socket [NAME=]PATH ...`` serve an EP guest, in order (no
    NAME: e65d0000.pcie-ep, the seeds' boards' name)."""
    return list(dict.fromkeys(spec.rpartition("=")[0] or EP_GUEST_CONTROLLER
                              for spec in ep_sockets))


def controller_items(items: tuple[str, ...]) -> list[str]:
    """The ``KEY=VALUE`` items that set controller attributes (a preset's profile)."""
    return [i for i in items
            if FLAT_ALIASES.get(k := i.partition("=")[0], k) in CONTROLLER_KEYS]


def function_items(items: tuple[str, ...]) -> list[str]:
    """The other items: a function's attributes (a preset's IDs)."""
    return [i for i in items if i not in controller_items(items)]


def _flat(data: dict[str, Any], source: Path) -> dict[str, Any]:
    """A flat file: top-level keys, or one table holding them (``[pci_epf_test]``)."""
    tables = [k for k, v in data.items() if isinstance(v, dict)]
    if len(tables) > 1:
        raise ConfigError(f"{source}: tables {', '.join(tables)}: a flat file has at most one "
                          "table; several functions need [functions.NAME] tables")
    values = {k: v for k, v in data.items() if not isinstance(v, dict)}
    for table in tables:
        clash = sorted(set(values) & set(data[table]))
        if clash:
            raise ConfigError(f"{source}: {', '.join(clash)} both at the top and in "
                              f"[{table}]")
        values |= data[table]
    return values


def _no_function_flag(function: str | None, comp: Composition, what: str) -> Composition:
    if function is not None:
        raise ConfigError(f"--function is for the one-function form; {what} names the types "
                          "of its functions itself")
    return comp


def _parse_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(_read(path))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
