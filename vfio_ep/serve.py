"""``vfio-ep serve``: build the configured device and serve it until SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from vfio_ep import config
from vfio_ep.epf.functions import pci_epf_test
from vfio_ep.pci import testdev
from vfio_ep.pci.device import PciDevice
from vfio_ep.vfio_user.server import Listener

log = logging.getLogger(__name__)

DEFAULT_FUNCTION = "pci-epf-test"
FUNCTIONS: dict[str, Callable[[dict[str, Any]], PciDevice]] = {
    "pci-epf-test": pci_epf_test.build,
    "testdev": testdev.build,
}


def build_device(function: str | None, values: dict[str, Any]) -> PciDevice:
    """The device for ``function``; a ``function`` key in the config file also selects it."""
    values = dict(values)
    name = function or values.pop("function", None) or DEFAULT_FUNCTION
    values.pop("function", None)
    try:
        builder = FUNCTIONS[name]
    except KeyError:
        raise config.ConfigError(f"unknown function {name!r}; known: "
                                 f"{', '.join(sorted(FUNCTIONS))}") from None
    return builder(values)


async def serve(socket_path: Path, device: PciDevice) -> None:
    listener = Listener(socket_path, device)
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(listener.serve)

            async def stop_on_signal() -> None:
                async for signum in signals:
                    log.info("%s: shutting down", signal.Signals(signum).name)
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)


def serve_forever(socket_path: Path, function: str | None, config_file: Path | None,
                  sets: list[str]) -> None:
    try:
        device = build_device(function, config.load(config_file, sets))
    except (config.ConfigError, ValueError) as e:
        sys.exit(f"vfio-ep: {e}")
    log.info("serving %s %04x:%04x on %s", function or DEFAULT_FUNCTION,
             device.spec.header.vendorid, device.spec.header.deviceid, socket_path)
    trio.run(serve, socket_path, device)
