"""pci-ep-cfs in one process: named controllers, and functions bound to them.

As ``/sys/kernel/config/pci_ep`` has ``controllers/<name>`` (one endpoint controller each)
and ``functions/<driver>/<name>`` (a function with its attributes, linked to a controller as
``primary`` and, for pci-epf-ntb, ``secondary``), a composition names its controllers and
functions.  Each controller is served on a vfio-user socket of its own, so one process can
be the endpoint of several guests.  Three spellings lead here:

* the flat form of one function (``--function``, ``--set KEY=VALUE``, a TOML file with no
  ``controllers``/``functions`` tables): controller ``ep0``, function ``func1``;
* TOML tables ``[controllers.NAME]`` (``socket``, the controller's attributes) and
  ``[functions.NAME]`` (``type``, ``primary``, ``secondary``, the function's attributes);
* a configfs script (:mod:`vfio_ep.configfs_script`).

A controller with an ``ep_socket`` is driven by an EP guest: its functions are that guest's
kernel's (``vfio-ep run --ep-guest``), none is linked to it here, and besides its RC side on
``socket`` it serves its CPU side (:mod:`vfio_ep.epc.cpu_port`) on ``ep_socket``.  Such
controllers are one EP guest's, on one SoC (its RAM is the guest's): pci-epf-ntb there backs
one controller's BARs with another's outbound aperture.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vfio_ep.config import ConfigError, attributes
from vfio_ep.epc.core import PciEpc, PciEpcAttributes
from vfio_ep.epc.cpu_port import EpcCpuPort
from vfio_ep.epc.soc import EpSoc
from vfio_ep.epf.core import PRIMARY_INTERFACE, SECONDARY_INTERFACE, PciEpf
from vfio_ep.epf.functions import DRIVERS, canonical
from vfio_ep.pci import testdev
from vfio_ep.pci.device import PciDevice

DEFAULT_FUNCTION = "pci_epf_test"
TESTDEV = "testdev"  # a plain PCI device (no controller behind it), to prove the transport
SINGLE_CONTROLLER = "ep0"
SINGLE_FUNCTION = "func1"
PAIR_CONTROLLERS = ("ep0", "ep1")  # a one-function pci-epf-ntb: primary, secondary
SOCKET = "socket"
EP_SOCKET = "ep_socket"  # the controller's CPU side, for an EP guest
# The controller of ``vfio-ep serve --ep-socket``: the name a board's configfs script uses
# (the seeds' R-Car S4 scripts say controllers/e65d0000.pcie-ep).
EP_GUEST_CONTROLLER = "e65d0000.pcie-ep"
# The flat form names the controller's profile ``controller`` (``--set controller=rk3588``).
FLAT_ALIASES = {"controller": "profile"}
CONTROLLER_KEYS = frozenset(f.name for f in dataclasses.fields(PciEpcAttributes)) | {SOCKET,
                                                                                     EP_SOCKET}


@dataclass
class ControllerGroup:
    """``controllers/<name>``: its socket and attributes, and whether it was started."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    started: bool = True


@dataclass
class FunctionGroup:
    """``functions/<driver>/<name>``: attributes, and the controllers it is linked to."""

    name: str
    driver: str
    values: dict[str, Any] = field(default_factory=dict)
    primary: str | None = None
    secondary: str | None = None


@dataclass
class Endpoint:
    """A controller's device served on ``socket``, and what is behind it.  An EP guest's
    controller has two: its CPU side (``device``) and its RC side, which exists once the EP
    guest starts the controller (``device`` is then a function returning it, or None)."""

    controller: str
    socket: Path
    device: PciDevice | Callable[[], PciDevice | None]
    epc: PciEpc | None = None
    functions: list[PciEpf] = field(default_factory=list)


@dataclass
class Composition:
    controllers: dict[str, ControllerGroup] = field(default_factory=dict)
    functions: dict[str, FunctionGroup] = field(default_factory=dict)
    source: str = ""  # the file it was read from: errors found later name it too

    # -- the three spellings --------------------------------------------------
    @classmethod
    def single(cls, function: str | None, values: dict[str, Any]) -> Composition:
        """The flat form: one controller ``ep0`` and one function ``func1`` bound to it (a
        two-interface function gets ``ep0`` and ``ep1``); controller attributes and function
        attributes share one namespace."""
        values = {FLAT_ALIASES.get(k, k): v for k, v in values.items()}
        driver = _driver(function or values.pop("function", None) or DEFAULT_FUNCTION)
        values.pop("function", None)
        ctrl = {k: values.pop(k) for k in list(values) if k in CONTROLLER_KEYS}
        if driver in DRIVERS and DRIVERS[driver].interfaces == 2:  # pci-epf-ntb: ep0 + ep1
            return cls({name: ControllerGroup(name, dict(ctrl)) for name in PAIR_CONTROLLERS},
                       {SINGLE_FUNCTION: FunctionGroup(SINGLE_FUNCTION, driver,
                                                       _defaults(driver) | values,
                                                       *PAIR_CONTROLLERS)})
        return cls({SINGLE_CONTROLLER: ControllerGroup(SINGLE_CONTROLLER, ctrl)},
                   {SINGLE_FUNCTION: FunctionGroup(SINGLE_FUNCTION, driver,
                                                   _defaults(driver) | values,
                                                   primary=SINGLE_CONTROLLER)})

    @classmethod
    def ep_guest(cls, values: dict[str, Any],
                 names: Sequence[str] = (EP_GUEST_CONTROLLER,)) -> Composition:
        """Controllers whose functions an EP guest runs (``--ep-socket`` alone), one per
        name (pci-epf-ntb's primary and secondary are two): ``values`` are each one's
        attributes."""
        values = {FLAT_ALIASES.get(k, k): v for k, v in values.items()}
        return cls({name: ControllerGroup(name, dict(values)) for name in names})

    @classmethod
    def from_toml(cls, data: dict[str, Any], source: str) -> Composition:
        """``[controllers.NAME]`` and ``[functions.NAME]`` tables."""
        unknown = sorted(set(data) - {"controllers", "functions"})
        if unknown:
            raise ConfigError(f"{source}: {', '.join(unknown)} outside [controllers.*] and "
                              "[functions.*] (a composition keeps every attribute in a table)")
        comp = cls()
        for name, table in _tables(data, "controllers", source).items():
            table = dict(table)
            started = table.pop("start", True)
            comp.controllers[name] = ControllerGroup(name, table, bool(started))
        for name, table in _tables(data, "functions", source).items():
            table = dict(table)
            if "type" not in table:
                raise ConfigError(f"{source}: [functions.{name}] needs type = \"DRIVER\" "
                                  f"(one of {', '.join(known_types())})")
            driver = _driver(str(table.pop("type")))
            primary, secondary = table.pop("primary", None), table.pop("secondary", None)
            comp.functions[name] = FunctionGroup(name, driver, _defaults(driver) | table,
                                                 primary=primary, secondary=secondary)
        comp.source = source
        return comp

    # -- edits --------------------------------------------------------------
    def set(self, item: str) -> None:
        """``--set [NAME.]KEY=VALUE``: NAME is a controller or function; without it, the key
        goes to the only function, or, for a controller attribute, to every controller."""
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected [NAME.]KEY=VALUE")
        name, dot, attr = key.rpartition(".")
        if not dot and FLAT_ALIASES.get(key, key) in CONTROLLER_KEYS:  # every controller
            for ctrl in self.controllers.values():
                ctrl.values[FLAT_ALIASES.get(key, key)] = value.strip()
            return
        group = self._group_for(name, attr, item) if dot else self._group_for(None, key, item)
        attr = attr if dot else key
        group.values[FLAT_ALIASES.get(attr, attr) if group in self.controllers.values()
                     else attr] = value.strip()

    def _group_for(self, name: str | None, key: str, item: str
                   ) -> ControllerGroup | FunctionGroup:
        if name is not None:
            if name in self.controllers:
                return self.controllers[name]
            if name in self.functions:
                return self.functions[name]
            raise ConfigError(f"--set {item!r}: no controller or function named {name!r} "
                              f"(have {', '.join([*self.controllers, *self.functions])})")
        if len(self.functions) == 1:
            return next(iter(self.functions.values()))
        raise ConfigError(f"--set {item!r}: several functions; name one: --set NAME.{key}=...")

    def assign_sockets(self, specs: list[str], key: str = SOCKET) -> None:
        """``--socket PATH`` (one controller) or ``--socket NAME=PATH`` (repeatable); with
        ``key`` EP_SOCKET, ``--ep-socket`` likewise."""
        flag = f"--{key.replace('_', '-')}"
        for spec in specs:
            name, sep, path = spec.rpartition("=")
            if not sep:
                if len(self.controllers) != 1:
                    raise ConfigError(f"{flag} {spec}: several controllers "
                                      f"({', '.join(self.controllers)}); use NAME=PATH")
                name = next(iter(self.controllers))
            if name not in self.controllers:
                raise ConfigError(f"{flag} {spec}: no controller named {name!r} "
                                  f"(have {', '.join(self.controllers)})")
            self.controllers[name].values[key] = path

    # -- pci_epc_start ------------------------------------------------------
    def build(self) -> list[Endpoint]:
        """Create the controllers, probe and bind the functions, start the controllers.

        ConfigError (naming the file it came from) for a value an attribute refuses."""
        try:
            return self._build()
        except (ConfigError, ValueError) as e:
            if not self.source:
                raise
            raise ConfigError(f"{self.source}: {e}") from None

    def _build(self) -> list[Endpoint]:
        self._check_links()
        started = [c for c in self.controllers.values() if c.started]
        sockets = {c.name: _socket(c) for c in started}
        endpoints: list[Endpoint] = []
        epcs: dict[str, PciEpc] = {}
        socs = self._socs()
        guest_soc: EpSoc | None = None  # the EP guest's: its controllers share it
        for ctrl in sorted(started, key=lambda c: c.name in socs):  # SoC owners first
            values = _without(ctrl.values, SOCKET)
            if EP_SOCKET in ctrl.values:
                endpoints += _ep_guest_endpoints(ctrl, sockets[ctrl.name], guest_soc)
                guest_soc = endpoints[-1].epc.soc if endpoints[-1].epc else None
                continue
            func = next(f for f in self.functions.values() if ctrl.name in (f.primary,
                                                                             f.secondary))
            values = _controller_defaults(func.driver) | values
            if func.driver == TESTDEV:
                endpoints.append(Endpoint(ctrl.name, sockets[ctrl.name],
                                          testdev.build(values | func.values)))
            else:
                shared = socs.get(ctrl.name)
                epcs[ctrl.name] = PciEpc.create(
                    ctrl.name, attributes(PciEpcAttributes, values, f"controllers/{ctrl.name}"),
                    epcs[shared].soc if shared in epcs else None)
        bound: dict[str, list[PciEpf]] = {name: [] for name in epcs}
        for func in self.functions.values():
            if func.driver == TESTDEV or func.primary not in epcs:
                continue
            epf = DRIVERS[func.driver].probe(self.function_attributes(func.name))
            epf.tag = f"{func.primary}/{func.name}"
            for interface, name in ((PRIMARY_INTERFACE, func.primary),
                                    (SECONDARY_INTERFACE, func.secondary)):
                if name is not None and name in epcs:
                    epf.bind_to(epcs[name], interface)
                    bound[name].append(epf)
        for name, epc in epcs.items():
            epc.init_notify()
            endpoints.append(Endpoint(name, sockets[name], epc.start(), epc, bound[name]))
        return endpoints

    def _socs(self) -> dict[str, str]:
        """Controllers bridged by one function share a SoC (bus, RAM): controller -> the
        controller whose SoC it joins (the primary's)."""
        return {f.secondary: f.primary for f in self.functions.values()
                if f.secondary is not None and f.primary is not None}

    def function_attributes(self, name: str) -> Any:
        """Function ``name``'s attributes, checked (ConfigError as at build)."""
        func = self.functions[name]
        drv = DRIVERS[func.driver]
        return attributes(drv.attributes, func.values, f"functions/{func.driver}/{name}")

    def _check_links(self) -> None:
        guests = [c.name for c in self.controllers.values() if EP_SOCKET in c.values]
        if not self.functions and not guests:
            raise ConfigError("no function: nothing to serve")
        for func in self.functions.values():
            need = DRIVERS[func.driver].interfaces if func.driver in DRIVERS else 1
            for role, target in (("primary", func.primary), ("secondary", func.secondary)):
                if target is not None and target not in self.controllers:
                    raise ConfigError(f"function {func.name}: {role} controller {target!r} "
                                      f"does not exist (have {', '.join(self.controllers)})")
            if func.primary is None:
                raise ConfigError(f"function {func.name} is linked to no controller "
                                  "(primary = \"NAME\", or ln -s controllers/NAME "
                                  f"functions/{func.driver}/{func.name}/primary/)")
            if need == 2 and func.secondary is None:
                raise ConfigError(f"function {func.name} ({func.driver}) needs a secondary "
                                  "controller as well")
            if need == 1 and func.secondary is not None:
                raise ConfigError(f"function {func.name} ({func.driver}) has no secondary "
                                  "interface")
        for ctrl in self.controllers.values():
            linked = [f.name for f in self.functions.values()
                      if ctrl.name in (f.primary, f.secondary)]
            if ctrl.name in guests:
                if linked:
                    raise ConfigError(f"controller {ctrl.name} is driven by an EP guest "
                                      f"({EP_SOCKET}): its functions are the guest's, but "
                                      f"{', '.join(linked)} is linked to it here")
                continue
            if not linked:
                raise ConfigError(f"controller {ctrl.name} has no function linked to it")
            if len(linked) > 1:
                raise ConfigError(f"controller {ctrl.name}: functions {', '.join(linked)} "
                                  "are linked to it; an emulated controller has one function")


def _defaults(driver: str) -> dict[str, Any]:
    return dict(DRIVERS[driver].defaults) if driver in DRIVERS else {}


def _controller_defaults(driver: str) -> dict[str, Any]:
    """The controller attributes ``driver`` decides when the user did not (every form: the
    kernel's driver has them too)."""
    return dict(DRIVERS[driver].controller_defaults) if driver in DRIVERS else {}


def attribute_listing(function: str) -> list[tuple[str, Any]]:
    """(configfs path, default) of every attribute of a controller and of ``function``:
    what ``vfio-ep attributes`` prints, in the spelling --set, TOML and configfs use."""
    driver = _driver(function)
    rows: list[tuple[str, Any]] = [(f"controllers/NAME/{SOCKET}", None),
                                   (f"controllers/NAME/{EP_SOCKET}",
                                    "(optional: an EP guest runs the functions)")]
    own = _controller_defaults(driver)
    rows += [(f"controllers/NAME/{f.name}", own.get(f.name, f.default))
             for f in dataclasses.fields(PciEpcAttributes)]
    cls = testdev.TestdevAttributes if driver == TESTDEV else DRIVERS[driver].attributes
    in_dir = DRIVERS[driver].cfs_attributes if driver in DRIVERS else ()
    defaults = _defaults(driver)
    for f in dataclasses.fields(cls):
        where = f"{driver}.0/{f.name}" if f.name in in_dir else f.name
        rows.append((f"functions/{driver}/NAME/{where}", defaults.get(f.name, f.default)))
    return rows


def known_types() -> list[str]:
    return sorted([*(d.replace("_", "-") for d in DRIVERS), TESTDEV])


def _driver(name: str) -> str:
    if name == TESTDEV:
        return TESTDEV
    driver = canonical(name)
    if driver not in DRIVERS:
        raise ConfigError(f"unknown function {name!r}; known: {', '.join(known_types())}")
    return driver


def _tables(data: dict[str, Any], key: str, source: str) -> dict[str, dict[str, Any]]:
    tables = data.get(key, {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{source}: {key} must be tables, [{key}.NAME]")
    return tables


def _ep_guest_endpoints(ctrl: ControllerGroup, socket: Path,
                        soc: EpSoc | None) -> list[Endpoint]:
    """A controller an EP guest drives, on ``soc`` (another of the guest's controllers')
    or a SoC of its own: its CPU side now, its RC side once started."""
    values = _without(_without(ctrl.values, SOCKET), EP_SOCKET)
    attrs = attributes(PciEpcAttributes, values, f"controllers/{ctrl.name}")
    epc = PciEpc.create(ctrl.name, attrs, soc)
    port = EpcCpuPort(epc, ctrl.name, attrs.dma_channels)
    return [Endpoint(ctrl.name, socket, lambda: epc.pci, epc),
            Endpoint(f"{ctrl.name} (EP guest)", Path(str(ctrl.values[EP_SOCKET])), port.pci,
                     epc)]


def _socket(ctrl: ControllerGroup) -> Path:
    path = ctrl.values.get(SOCKET)
    if not path:
        raise ConfigError(f"controller {ctrl.name} has no socket: --socket {ctrl.name}=PATH, "
                          f"or socket = \"PATH\" in [controllers.{ctrl.name}]")
    return Path(str(path))


def _without(values: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in values.items() if k != key}
