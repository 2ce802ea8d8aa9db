"""Run a pci-ep configfs shell script against a composition instead of /sys/kernel/config.

Kernel developers set endpoints up with a handful of shell lines (the seeds' vNTB setup is
one); those lines are accepted as they are written::

    cd /sys/kernel/config/pci_ep/
    mkdir functions/pci_epf_vntb/func1
    echo 0x1912 > functions/pci_epf_vntb/func1/vendorid
    echo 4 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/db_count
    ln -s controllers/e65d0000.pcie-ep functions/pci_epf_vntb/func1/primary/
    echo 1 > controllers/e65d0000.pcie-ep/start

``mount -t configfs`` (a no-op), ``cd``, ``mkdir [-p]``, ``echo VALUE > FILE``, ``ln -s``
(the controller into the function's ``primary/`` or ``secondary/``, or the older
``ln -s functions/D/F controllers/C/``) are understood; blank lines, ``#`` comments and
footnote markers such as ``[*]`` are skipped.  Header attributes
live in the function's directory, the driver's own in ``<driver>.<N>/``, as in configfs;
a write is checked as the driver's ``_store`` checks it.  Anything else is an error that
names the line.
"""

from __future__ import annotations

import dataclasses
import posixpath
import re
import shlex

from vfio_ep.composition import Composition, ControllerGroup, FunctionGroup
from vfio_ep.config import ConfigError, store
from vfio_ep.epf.functions import DRIVERS
from vfio_ep.pci.device import FunctionAttributes

ROOT = "/sys/kernel/config/pci_ep"
HEADER_ATTRIBUTES = frozenset(f.name for f in dataclasses.fields(FunctionAttributes))
_FOOTNOTE = re.compile(r"\s*\[[^\]\s]{1,3}\]\s*$")  # "[*]", "[1]" after a command


class _ScriptError(Exception):
    pass


class _Script:
    def __init__(self) -> None:
        self.cwd = ROOT
        self.comp = Composition()

    def run(self, argv: list[str]) -> None:
        cmd, args = argv[0], argv[1:]
        if cmd == "cd":
            self.cwd = self._path(args[0] if args else ROOT)
        elif cmd == "mkdir":
            for arg in (a for a in args if a != "-p"):
                self._mkdir(self._rel(arg))
        elif cmd == "echo":
            self._echo(args)
        elif cmd == "ln" and args[:1] == ["-s"] and len(args) == 3:
            self._link(self._rel(args[1]), self._rel(args[2]))
        elif cmd == "mount" and args[:2] == ["-t", "configfs"]:
            pass  # the howtos mount configfs first; here it is always there
        else:
            raise _ScriptError(f"{cmd}: not a configfs step this importer knows "
                               "(mount -t configfs, cd, mkdir, echo VALUE > FILE, ln -s)")

    # -- paths ----------------------------------------------------------------
    def _path(self, arg: str) -> str:
        path = posixpath.normpath(posixpath.join(self.cwd, arg))
        if path != ROOT and not path.startswith(ROOT + "/"):
            raise _ScriptError(f"{arg}: outside {ROOT}")
        return path

    def _rel(self, arg: str) -> list[str]:
        return [p for p in self._path(arg)[len(ROOT):].split("/") if p]

    # -- commands -------------------------------------------------------------
    def _mkdir(self, parts: list[str]) -> None:
        if len(parts) == 2 and parts[0] == "controllers":
            self.comp.controllers.setdefault(parts[1], ControllerGroup(parts[1], started=False))
        elif len(parts) == 3 and parts[0] == "functions":
            driver = self._driver(parts[1])
            if parts[2] in self.comp.functions:
                raise _ScriptError(f"function {parts[2]} exists already")
            self.comp.functions[parts[2]] = FunctionGroup(parts[2], driver)
        elif not (parts[:1] == ["functions"] and len(parts) == 2 and self._driver(parts[1])):
            raise _ScriptError(f"mkdir {'/'.join(parts)}: only functions/<driver>/<name> "
                               "can be made")

    def _echo(self, args: list[str]) -> None:
        if len(args) != 3 or args[1] != ">" or re.fullmatch(r"-[neE]+", args[0]):
            raise _ScriptError("expected echo VALUE > FILE")  # -1 is a value, -n an option
        value, parts = args[0], self._rel(args[2])
        if len(parts) == 3 and parts[0] == "controllers" and parts[2] == "start":
            self._controller(parts[1]).started = value.strip() not in ("0", "")
            return
        if len(parts) < 4 or parts[0] != "functions":
            raise _ScriptError(f"{'/'.join(parts)}: not a function or controller attribute")
        func = self._function(parts[1], parts[2])
        attr = parts[-1]
        drv = DRIVERS[func.driver]
        if len(parts) == 4:
            if attr not in HEADER_ATTRIBUTES:
                raise _ScriptError(f"functions/{parts[1]}/{parts[2]} has no attribute {attr} "
                                   f"(header attributes: {', '.join(sorted(HEADER_ATTRIBUTES))})")
        elif len(parts) == 5 and re.fullmatch(rf"{parts[1]}\.\d+", parts[3]):
            if attr not in drv.cfs_attributes:
                raise _ScriptError(f"{parts[3]}/ has no attribute {attr} (known: "
                                   f"{', '.join(drv.cfs_attributes) or 'none'})")
        else:
            raise _ScriptError(f"{'/'.join(parts)}: no such attribute (the driver's own are "
                               f"in {parts[2]}/{parts[1]}.0/)")
        try:  # refused at the write, as configfs does
            store(drv.attributes, attr, value, "/".join(parts[:3]))
            if drv.store is not None and len(parts) == 5:
                drv.store(func.values, attr, func.primary is not None
                          or func.secondary is not None)
        except ConfigError as e:
            raise _ScriptError(str(e)) from None
        func.values[attr] = value

    def _link(self, target: list[str], link: list[str]) -> None:
        if target[:1] == ["controllers"] and len(target) == 2 and link[:1] == ["functions"] \
                and len(link) in (4, 5) and link[3] in ("primary", "secondary"):
            func = self._function(link[1], link[2])
            setattr(func, link[3], self._controller(target[1]).name)
        elif target[:1] == ["functions"] and len(target) == 3 and link[:1] == ["controllers"] \
                and len(link) in (2, 3):
            self._function(target[1], target[2]).primary = self._controller(link[1]).name
        else:
            raise _ScriptError("ln -s links controllers/C into functions/D/F/primary/ (or "
                               "secondary/), or functions/D/F into controllers/C/")

    # -- look-ups -------------------------------------------------------------
    def _driver(self, name: str) -> str:
        if name not in DRIVERS:
            raise _ScriptError(f"functions/{name}: no such function driver (known: "
                               f"{', '.join(sorted(DRIVERS))}){_underscores(name)}")
        return name

    def _function(self, driver: str, name: str) -> FunctionGroup:
        func = self.comp.functions.get(name)
        if func is None or func.driver != driver:
            raise _ScriptError(f"functions/{driver}/{name} does not exist (mkdir it "
                               f"first){_underscores(driver)}")
        return func

    def _controller(self, name: str) -> ControllerGroup:
        # The SoC's controllers exist before the script runs: any name the script uses is one.
        return self.comp.controllers.setdefault(name, ControllerGroup(name, started=False))


def _underscores(driver: str) -> str:
    """A hint for ``pci-epf-ntb``: pci-ntb-howto.rst's ``ln`` lines spell the driver's
    directory with hyphens, which configfs does not have."""
    fixed = driver.replace("-", "_")
    return f"; configfs names it functions/{fixed}" if fixed != driver and fixed in DRIVERS \
        else ""


def parse_script(text: str, source: str) -> Composition:
    """The composition the configfs script ``text`` sets up; ConfigError names the line."""
    script = _Script()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _FOOTNOTE.sub("", raw).strip()
        if not line or line.startswith("#"):
            continue
        try:
            argv = shlex.split(line, comments=True)
            if argv:
                script.run(argv)
        except (_ScriptError, ValueError) as e:
            raise ConfigError(f"{source}:{lineno}: {raw.strip()}: {e}") from None
    unstarted = [c.name for c in script.comp.controllers.values() if not c.started]
    if unstarted and not any(c.started for c in script.comp.controllers.values()):
        raise ConfigError(f"{source}: no controller was started (echo 1 > "
                          f"controllers/{unstarted[0]}/start)")
    script.comp.source = source
    return script.comp



def board_script(driver: str, values: dict[str, str], controller: str,
                 secondary: str | None = None) -> str:
    """The configfs script a board's howto gives for one function on ``controller``: make
    ``functions/<driver>/func1``, write ``values`` (in their order, as the shell writes them:
    header attributes in the function's directory, the driver's own in ``<driver>.0/``),
    link the controller as the function's ``primary`` (pci-epf-test's howto links the
    function into the controller: the older form), and ``secondary`` as its secondary
    (pci-epf-ntb's), and start them.  ``parse_script`` reads it back."""
    func = f"functions/{driver}/func1"
    lines = [f"cd {ROOT}/", f"mkdir {func}"]
    lines += [f"echo {value} > {func}/{'' if attr in HEADER_ATTRIBUTES else f'{driver}.0/'}"
              f"{attr}" for attr, value in values.items()]
    lines.append(f"ln -s {func} controllers/{controller}/" if driver == "pci_epf_test"
                 else f"ln -s controllers/{controller} {func}/primary/")
    if secondary is not None:
        lines.append(f"ln -s controllers/{secondary} {func}/secondary/")
    lines += [f"echo 1 > controllers/{c}/start" for c in (controller, secondary) if c]
    return "\n".join(lines) + "\n"
