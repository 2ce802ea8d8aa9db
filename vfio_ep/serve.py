"""``vfio-ep serve``: build the composition and serve each controller until SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from vfio_ep import cmdline
from vfio_ep.composition import TESTDEV, Composition, Endpoint
from vfio_ep.config import ConfigError
from vfio_ep.epc.core import EpcError, PciEpcAttributes
from vfio_ep.pci.device import PciDevice
from vfio_ep.vfio_user.server import Listener, SocketPathError

log = logging.getLogger(__name__)


class NotifyError(Exception):
    """The pidfile or the readiness fd could not be written: the server stops."""


async def serve(listeners: list[Listener], ready: Callable[[], None] = lambda: None) -> None:
    """Every endpoint on its own socket, in one trio loop, until a signal; ``ready`` runs
    once every listener accepts clients."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                await nursery.start(listener.serve)
            ready()

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def qemu_command(socket: Path) -> str:
    """A command line that starts QEMU with a guest attached to ``socket`` as ``vfio-ep
    run`` attaches one, as printed: ``vfio-ep qemu`` (the QEMU vfio-ep provisions, whose
    binary only runs through its sysroot's loader) with the machine's options (-m
    matching the memory backend) and the device; the user adds a kernel or a disk."""
    from vfio_ep.guest.qemu_cmdline import endpoint_machine_args, vfio_user_device

    return shlex.join([*_this_program(), "qemu", "--", *endpoint_machine_args(),
                       "-device", json.dumps(vfio_user_device(socket.absolute()))])


def _this_program() -> list[str]:
    """How to start this vfio-ep again from any directory: the script we were started as,
    by its absolute path, else this Python with ``-m vfio_ep``."""
    script = Path(sys.argv[0])
    if script.name == "vfio-ep":
        return [str(script.absolute())]
    return [sys.executable, "-m", "vfio_ep"]


def serve_forever(sockets: list[str], function: str | None, config_file: Path | None,
                  sets: list[str], configfs: Path | None = None,
                  allow_uids: frozenset[int] = frozenset(), print_qemu_args: bool = False,
                  preset: str | None = None, ready_fd: int | None = None,
                  pidfile: Path | None = None, ep_sockets: list[str] | None = None,
                  facts: Path | None = None) -> None:
    """Build the composition, bind every started controller's socket, then serve until
    SIGINT/SIGTERM.  Before the sockets exist, what they serve in ``facts``
    (:func:`endpoint_facts`); once every socket accepts clients: ``READY=1`` on ``ready_fd``
    (then closed), and our pid in ``pidfile`` (removed at exit if it still holds it)."""
    try:
        comp = cmdline.load(config_file, function, sets, configfs, sockets, preset, ep_sockets)
        endpoints = comp.build()
    except (ConfigError, ValueError) as e:
        sys.exit(f"vfio-ep: {e}")
    except EpcError as e:
        sys.exit(f"vfio-ep: a function failed to bind: {e} (errno {e.errno})")
    if facts is not None:
        try:
            _write_atomically(facts, json.dumps(endpoint_facts(comp, endpoints), indent=2))
        except OSError as e:
            sys.exit(f"vfio-ep: --facts {facts}: {e.strerror}")
    listeners = [Listener(e.socket, e.device, allow_uids) for e in endpoints]
    try:
        for listener in listeners:
            listener.bind()
    except SocketPathError as e:
        for listener in listeners:  # the ones bound before: their sockets and directories
            listener.close()
        sys.exit(f"vfio-ep: {e}")
    for ep in endpoints:
        if print_qemu_args:
            print(f"# {ep.controller}:\n{qemu_command(ep.socket)}", flush=True)
        if not isinstance(ep.device, PciDevice):
            log.info("serving controller %s on %s once its EP guest starts it", ep.controller,
                     ep.socket)
            continue
        h = ep.device.spec.header
        what = ", ".join(f.tag.split("/")[-1] + f" ({f.name})" for f in ep.functions) or \
            ("its CPU side" if ep.epc else "testdev")
        log.info("serving controller %s: %s %04x:%04x on %s", ep.controller, what, h.vendorid,
                 h.deviceid, ep.socket)

    def ready() -> None:
        try:
            if pidfile is not None:
                pidfile.write_text(f"{os.getpid()}\n")
            if ready_fd is not None:  # EOF without READY=1: the server died first
                os.write(ready_fd, b"READY=1\n")
                os.close(ready_fd)
        except OSError as e:
            raise NotifyError(f"{e.filename or f'--ready-fd {ready_fd}'}: {e.strerror}") from e

    try:
        trio.run(serve, listeners, ready)
    except* NotifyError as group:  # the sockets are gone already
        sys.exit(f"vfio-ep: {group.exceptions[0]}")
    finally:
        if pidfile is not None and _holds_our_pid(pidfile):
            pidfile.unlink()


def endpoint_facts(comp: Composition, endpoints: list[Endpoint]) -> dict[str, dict[str, object]]:
    """By endpoint (its controller's name): the controller's profile, and what it serves.
    A PCI device: its IDs and its function's own facts (:meth:`PciEpf.facts`: the doorbell
    backend it got, ...), or the testdev function.  An EP guest's controller: ``ep_guest``
    (its function is the guest's, its IDs the guest's to write), and its CPU side, the
    device the EP guest's driver binds."""
    facts: dict[str, dict[str, object]] = {}
    for ep in endpoints:
        entry: dict[str, object] = {}
        if ep.epc is not None:
            entry["profile"] = comp.controllers[ep.epc.name].values.get(
                "profile", PciEpcAttributes.profile)
        if isinstance(ep.device, PciDevice):
            h = ep.device.spec.header
            entry["device"] = f"{h.vendorid:04x}:{h.deviceid:04x}"
        else:
            entry["ep_guest"] = True
        if ep.epc is None:
            entry["function"] = TESTDEV
        for epf in ep.functions:
            entry |= epf.facts()
        facts[ep.controller] = entry
    return facts


def _write_atomically(path: Path, text: str) -> None:
    """Whole or not at all: a reader that sees the file sees all of it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text + "\n")
    tmp.replace(path)


def _holds_our_pid(pidfile: Path) -> bool:
    try:
        return pidfile.read_text().strip() == str(os.getpid())
    except OSError:
        return False
