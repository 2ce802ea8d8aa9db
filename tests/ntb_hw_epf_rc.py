"""ntb_hw_epf's side of the bus, over our client: what both NTB functions' tests drive."""

from __future__ import annotations

import time

from vfio_user_client import Client, wait_eventfd

from vfio_ep.epf.functions import ntb_ctrl
from vfio_ep.epf.regs import field_offsets

CTRL = {name: off for name, (off, _) in field_offsets(ntb_ctrl.EpfNtbCtrl).items()}


class NtbHwEpfRc:
    """An RC with guest memory at ``guest`` and ``vectors`` MSI (or MSI-X) eventfds, reading
    and writing the control block in ``ctrl_bar`` as ntb_hw_epf does."""

    def __init__(self, client: Client, ctrl_bar: int, guest: int, guest_size: int,
                 vectors: int, msix: bool = False) -> None:
        self.c = client
        self.ctrl_bar = ctrl_bar
        self.msix = msix
        self.mem = client.guest_memory(guest, guest_size)
        self.irq = client.enable_interrupts(vectors, msix)

    def r(self, name: str, index: int = 0, size: int = 4) -> int:
        return int.from_bytes(self.c.read(self.ctrl_bar, CTRL[name] + 4 * index, size),
                              "little")

    def w(self, name: str, value: int, size: int = 4) -> None:
        self.c.write(self.ctrl_bar, CTRL[name], value.to_bytes(size, "little"))

    def command(self, cmd: int, arg: int = 0, timeout: float = 1.0) -> int:
        """ntb_epf_send_command(): 0 on timeout, like the driver's WARN case."""
        self.w("argument", arg)
        self.w("command", cmd)
        deadline = time.monotonic() + timeout
        status = 0
        while time.monotonic() < deadline and not status:
            status = self.r("command_status", size=2)
        self.w("command_status", 0, size=2)
        return status

    def wait_irq(self, vector: int, timeout: float = 5.0) -> bool:
        return wait_eventfd(self.irq[vector], timeout)
