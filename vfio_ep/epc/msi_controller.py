"""The SoC's platform MSI controller, ITS-like: GITS_TRANSLATER turns writes into virqs.

Devices (here: the endpoint controller's doorbells) get (address, data) MSI
messages; a 32-bit write of ``data`` (the event ID) to the translator raises
that event's virq.  An ITS never rewrites a message once handed out
(``immutable``); a controller configured ``mutable`` models one that
retargets messages on affinity changes -- the doorbell core refuses it,
because the RC would keep ringing a stale address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vfio_ep.epc.address_space import EpAddressSpace, MmioBlock
from vfio_ep.epc.doorbell import DoorbellTarget
from vfio_ep.epc.irq import IrqDomain, Spawn

log = logging.getLogger(__name__)

ITS_FRAME_SIZE = 0x20000
GITS_TRANSLATER = 0x10040


@dataclass(frozen=True)
class MsiMsg:
    """struct msi_msg."""

    address: int
    data: int

    @property
    def address_lo(self) -> int:
        return self.address & 0xFFFFFFFF

    @property
    def address_hi(self) -> int:
        return self.address >> 32


class PlatformMsiController:
    def __init__(self, base: int, space: EpAddressSpace, irqs: IrqDomain, spawn: Spawn,
                 immutable: bool = True) -> None:
        self.base = base
        self.irqs = irqs
        self.immutable = immutable
        self.translater = DoorbellTarget("its", base + GITS_TRANSLATER, irqs, spawn, self,
                                         GITS_TRANSLATER)
        space.add_block(MmioBlock("msi-controller", base, ITS_FRAME_SIZE, self))
        space.add_doorbell(self.translater)
        self._free_events = list(range(32))

    def alloc_irqs(self, count: int) -> list[tuple[int, MsiMsg]]:
        """platform_device_msi_init_and_alloc_irqs(): (virq, message) per vector."""
        if count > len(self._free_events):
            raise MemoryError(f"MSI controller has {len(self._free_events)} free events")
        out = []
        for _ in range(count):
            event = self._free_events.pop(0)
            virq = self.irqs.alloc("its-msi")
            self.translater.add_event(event, virq)
            out.append((virq, MsiMsg(self.base + GITS_TRANSLATER, event)))
        return out

    def free_irqs(self, allocated: list[tuple[int, MsiMsg]]) -> None:
        for virq, msg in allocated:
            self.translater.remove_event(msg.data)
            self.irqs.dispose(virq)
            self._free_events.append(msg.data)
        self._free_events.sort()

    # The register frame as an MmioHandler: nothing but the translater does anything.
    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        log.info("MSI controller: write %#x to +%#x ignored", value, offset)
