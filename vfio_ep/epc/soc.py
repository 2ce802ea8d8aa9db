"""The endpoint SoC around its PCIe controller: what the EP's kernel gives a function besides
the EPC.

DRAM (``dma_alloc_coherent``, ``pci_epf_alloc_space``), the SoC bus (``ioremap``), the
interrupt controller (``request_irq``), a CPU to run work on (workqueues, threaded IRQs), a
platform MSI controller (the ``msi-parent`` doorbells are allocated from) and the DesignWare
eDMA (``dmaengine``).  Which of them a SoC has is its profile's business.  The PCIe
controller (:mod:`vfio_ep.epc.dw`) sits on the same bus: its outbound aperture and register
blocks are addresses here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import trio

from vfio_ep.epc.address_space import AddressError, EpAddressSpace, EpRam, MmioBlock
from vfio_ep.epc.doorbell import DoorbellTarget
from vfio_ep.epc.edma import EDMA_REGS_SIZE, EMUL_DOORBELL_OFFSET, DmaChannel, DwEdma
from vfio_ep.epc.features import ControllerProfile
from vfio_ep.epc.irq import IrqDomain
from vfio_ep.epc.msi_controller import PlatformMsiController
from vfio_ep.errors import ErrnoError
from vfio_ep.pci.host import RcBusError, RcMemory

log = logging.getLogger(__name__)

# The SoC memory map.
EP_RAM_BASE = 0x8000_0000
EDMA_BASE = 0xF000_0000
MSI_BASE = 0xF010_0000

Work = Callable[[], Awaitable[None]]


class EpcError(ErrnoError):
    """An EPC or platform call refused, with the errno the kernel would return."""


class EpSoc:
    """DRAM, bus, IRQs, a CPU, and the platform MSI controller and eDMA a profile has."""

    def __init__(self, name: str, profile: ControllerProfile, ram_size: int,
                 doorbell_poll_interval: float) -> None:
        self.name = name
        self.doorbell_poll_interval = doorbell_poll_interval
        self.ram = EpRam(EP_RAM_BASE, ram_size)
        self.space = EpAddressSpace(self.ram)
        self.irqs = IrqDomain(self.spawn)
        # The RC's memory, as the PCIe controller reaches it (set by the controller).
        self.rc_memory: Callable[[], RcMemory | None] = lambda: None
        self.edma: DwEdma | None = None
        if profile.edma:
            self.edma = DwEdma(self.space, self.irqs, self.spawn, profile.edma_channels,
                               lambda: self.rc_memory())
            self.space.add_block(MmioBlock("dw-edma", EDMA_BASE, EDMA_REGS_SIZE, self.edma))
            self.edma_doorbell = DoorbellTarget("dw-edma-emul", EDMA_BASE + EMUL_DOORBELL_OFFSET,
                                                self.irqs, self.spawn, self.edma,
                                                EMUL_DOORBELL_OFFSET)
            self.space.add_doorbell(self.edma_doorbell)
        self.msi = (PlatformMsiController(MSI_BASE, self.space, self.irqs, self.spawn,
                                          immutable=not profile.msi_mutable)
                    if profile.msi_controller else None)
        self._nursery: trio.Nursery | None = None
        self._queued: list[tuple[Work, str]] = []

    # -- the CPU: where functions' work and IRQ handlers run ----------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fn, name in self._queued:
                nursery.start_soon(self._guarded, fn, name, name=name)
            self._queued.clear()
            task_status.started()
            await trio.sleep_forever()

    def spawn(self, fn: Work, name: str) -> None:
        """Run ``fn`` on the EP's CPU; work queued before it runs (at bind) starts with it."""
        if self._nursery is None:
            self._queued.append((fn, name))
            return
        self._nursery.start_soon(self._guarded, fn, name, name=name)

    async def _guarded(self, fn: Work, name: str) -> None:
        """EP work never takes the server down: a bus error is logged, a bug too."""
        try:
            await fn()
        except (AddressError, EpcError, RcBusError) as e:
            log.warning("%s: %s failed: %s", self.name, name, e)
        except Exception:
            log.exception("%s: %s crashed", self.name, name)

    # -- dmaengine --------------------------------------------------------------
    def dma_channel(self, direction: str, ch: int = 0) -> DmaChannel | None:
        """dma_request_channel() on the eDMA: a private channel (None without an eDMA)."""
        if self.edma is None:
            return None
        return DmaChannel(self.edma, EDMA_BASE, direction, ch)
