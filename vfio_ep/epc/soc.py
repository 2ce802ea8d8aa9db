"""The endpoint SoC around its PCIe controller: what the EP's kernel gives a function besides
the EPC.

DRAM (``dma_alloc_coherent``, ``pci_epf_alloc_space``), the SoC bus (``ioremap``), the
interrupt controller (``request_irq``), a CPU to run work on (workqueues, threaded IRQs), a
platform MSI controller (the ``msi-parent`` doorbells are allocated from) and the DesignWare
eDMA (``dmaengine``).  Which of them a SoC has is its profile's business.  The PCIe
controllers (:mod:`vfio_ep.epc.dw`, one or more) sit on the same bus, each with its
integrated eDMA and its outbound aperture at addresses of its own, so a function bridging two
of them (pci-epf-ntb) reaches one controller's aperture through the other's BAR.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial

import trio

from vfio_ep.epc.address_space import AddressError, EpAddressSpace, EpRam
from vfio_ep.epc.features import ControllerProfile
from vfio_ep.epc.irq import Cancellable, IrqDomain, Spawn
from vfio_ep.epc.msi_controller import PlatformMsiController
from vfio_ep.errors import ErrnoError
from vfio_ep.pci.host import RcBusError

log = logging.getLogger(__name__)

# The SoC memory map (each PCIe controller's blocks are placed by vfio_ep.epc.dw).
EP_RAM_BASE = 0x8000_0000
MSI_BASE = 0xF010_0000

Work = Callable[[], Awaitable[None]]


class EpWork:
    """Work queued on the EP's CPU; :meth:`cancel` is the kernel's ``cancel_work_sync()``
    (a reset must not leave a function's handler waiting on a host that forgot it)."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()

    def cancel(self) -> None:
        self.scope.cancel()


class DelayedWork:
    """struct delayed_work on the EP's CPU: :meth:`schedule` runs ``fn`` after ``delay``
    seconds in place of a run still pending (mod_delayed_work()); :meth:`cancel` drops the
    pending run (cancel_delayed_work()).  ``fn`` may schedule itself again."""

    def __init__(self, spawn: Spawn, fn: Callable[[], None], name: str) -> None:
        self._spawn = spawn
        self._fn = fn
        self._name = name
        self._work: Cancellable | None = None

    def schedule(self, delay: float) -> None:
        self.cancel()
        self._work = self._spawn(partial(self._later, delay), self._name)

    async def _later(self, delay: float) -> None:
        await trio.sleep(delay)
        self._fn()

    def cancel(self) -> None:
        if self._work is not None:
            self._work.cancel()
            self._work = None


class EpcError(ErrnoError):
    """An EPC or platform call refused, with the errno the kernel would return."""


class EpSoc:
    """DRAM, bus, IRQs, a CPU, and the platform MSI controller a profile has."""

    def __init__(self, name: str, profile: ControllerProfile, ram_size: int,
                 doorbell_poll_interval: float) -> None:
        self.name = name
        self.doorbell_poll_interval = doorbell_poll_interval
        self.ram = EpRam(EP_RAM_BASE, ram_size)
        self.space = EpAddressSpace(self.ram)
        self.irqs = IrqDomain(self.spawn)
        self.controllers = 0  # PCIe controllers on this SoC (each gets its own bus ranges)
        self.msi = (PlatformMsiController(MSI_BASE, self.space, self.irqs, self.spawn,
                                          immutable=not profile.msi_mutable)
                    if profile.msi_controller else None)
        self._nursery: trio.Nursery | None = None
        self._queued: list[tuple[Work, str, EpWork]] = []

    # -- the CPU: where functions' work and IRQ handlers run ----------------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The CPU; each controller's device starts it, the first one runs it."""
        if self._nursery is not None:
            task_status.started()
            await trio.sleep_forever()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fn, name, work in self._queued:
                nursery.start_soon(self._guarded, fn, name, work, name=name)
            self._queued.clear()
            task_status.started()
            await trio.sleep_forever()

    def spawn(self, fn: Work, name: str) -> EpWork:
        """Run ``fn`` on the EP's CPU; work queued before it runs (at bind) starts with it."""
        work = EpWork()
        if self._nursery is None:
            self._queued.append((fn, name, work))
        else:
            self._nursery.start_soon(self._guarded, fn, name, work, name=name)
        return work

    async def _guarded(self, fn: Work, name: str, work: EpWork) -> None:
        """EP work never takes the server down: a bus error is logged, a bug too."""
        try:
            with work.scope:
                # Work cancelled before it started never runs (cancel_work_sync() on
                # pending work), whatever its first checkpoint would be.
                await trio.lowlevel.checkpoint_if_cancelled()
                await fn()
        except (AddressError, EpcError, RcBusError) as e:
            log.warning("%s: %s failed: %s", self.name, name, e)
        except Exception:
            log.exception("%s: %s crashed", self.name, name)

    def add_controller(self) -> int:
        """A PCIe controller joins the SoC: its index, which places its register blocks and
        outbound aperture on the bus."""
        self.controllers += 1
        return self.controllers - 1
