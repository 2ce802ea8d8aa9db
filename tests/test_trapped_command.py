"""The trapped COMMAND register of each function that has one: a reset (PERST#, the host's
DEVICE_RESET) cancels the command in flight and leaves the handler idle for the next."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from vfio_ep.composition import Composition
from vfio_ep.epf.command import TrappedCommand
from vfio_ep.epf.functions import ntb_ctrl as c
from vfio_ep.epf.functions import pci_epf_ntb as n
from vfio_ep.epf.functions import pci_epf_test as t
from vfio_ep.epf.functions import pci_epf_vntb as v
from vfio_ep.pci.device import PciDevice


@dataclass
class Trapped:
    """Where a function's COMMAND is, a harmless command for it, and how to read it back
    (each handler clears COMMAND when it takes the command)."""

    device: PciDevice
    command: TrappedCommand
    bar: int
    offset: int
    value: int
    read: Callable[[], int]


def _built(comp: Composition, sockets: list[str]) -> tuple[PciDevice, object]:
    comp.assign_sockets(sockets)
    ep = comp.build()[0]
    assert isinstance(ep.device, PciDevice)
    return ep.device, ep.functions[0]


def pci_epf_test(tmp_path: Path) -> Trapped:
    device, epf = _built(Composition.single("pci-epf-test", {}), [str(tmp_path / "s")])
    assert isinstance(epf, t.PciEpfTest)
    return Trapped(device, epf.command, epf.test_reg_bar, t.REG_OFFSET["command"][0],
                   t.COMMAND_DISABLE_DOORBELL, lambda: epf.regs["command"])


def pci_epf_vntb(tmp_path: Path) -> Trapped:
    device, epf = _built(Composition.single("pci-epf-vntb", {"ntb_client": "none"}),
                         [str(tmp_path / "s")])
    assert isinstance(epf, v.PciEpfVntb) and epf.command is not None
    return Trapped(device, epf.command, epf.epf_ntb_bar[v.BAR_CONFIG],
                   epf.reg.offset("command"), c.COMMAND_CONFIGURE_DOORBELL,
                   lambda: epf.reg["command"])


def pci_epf_ntb(tmp_path: Path) -> Trapped:
    """The primary host of a pair (its CONFIGURE_DOORBELL of 0 doorbells: refused, no
    side effects)."""
    pair = Composition.from_toml(tomllib.loads(
        '[controllers.a]\n[controllers.b]\n'
        '[functions.n]\ntype = "pci-epf-ntb"\nprimary = "a"\nsecondary = "b"\n'), "pair")
    device, epf = _built(pair, [f"a={tmp_path / 'a'}", f"b={tmp_path / 'b'}"])
    assert isinstance(epf, n.PciEpfNtb)
    x = epf.intf[0]
    return Trapped(device, x.command, x.epf_ntb_bar[n.BAR_CONFIG], x.reg.offset("command"),
                   c.COMMAND_CONFIGURE_DOORBELL, lambda: x.reg["command"])


@pytest.mark.parametrize("function", [pci_epf_test, pci_epf_vntb, pci_epf_ntb])
def test_a_reset_drops_the_command_in_flight_and_leaves_the_handler_idle(
        tmp_path: Path, function: Callable[[Path], Trapped]) -> None:
    trapped = function(tmp_path)
    device, command = trapped.device, trapped.command

    def write_command() -> None:
        device.region_write(trapped.bar, trapped.offset, trapped.value.to_bytes(4, "little"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            for task in device.background:  # the EP's CPU
                await nursery.start(task)
            write_command()
            assert command.busy  # queued on the EP's CPU, not run yet
            device.reset()
            assert not command.busy
            await trio.sleep(0.05)
            assert trapped.read() == trapped.value  # never handled
            write_command()  # the next command is handled
            with trio.fail_after(5):
                while trapped.read():
                    await trio.sleep(0.001)
            nursery.cancel_scope.cancel()

    trio.run(main)
