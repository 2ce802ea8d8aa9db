"""Endpoint function core: ``struct pci_epf`` and what pci-epf-core.c gives functions.

A function binds to a controller, allocates BAR backing in EP RAM
(``pci_epf_alloc_space`` with the same size rules as the kernel), and gets
the controller's events: ``epc_init``/``epc_deinit`` (the controller is
usable / going away, e.g. on PERST#) and ``link_up``/``link_down`` (an RC
connected or went away).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.core import EpcEvents, PciEpc
from vfio_ep.epc.features import BarType, EpcFeatures
from vfio_ep.epc.soc import EpWork
from vfio_ep.pci.bar import NUM_BARS, PCI_BASE_ADDRESS_MEM_TYPE_64
from vfio_ep.pci.device import PciHeader

if TYPE_CHECKING:
    from vfio_ep.epc.doorbell import PollDoorbell
    from vfio_ep.epf.doorbell import PciEpfDoorbellMsg

log = logging.getLogger(__name__)

PRIMARY_INTERFACE, SECONDARY_INTERFACE = 0, 1  # enum pci_epc_interface_type


def required_bar_size(size: int, bar: int, features: EpcFeatures) -> tuple[int, int]:
    """pci_epf_get_required_bar_size(): (BAR size, aligned memory size); ValueError if too big."""
    desc = features.bar[bar]
    size = max(size, 128)
    if desc.type == BarType.RESIZABLE and size < 1 << 20:
        size = 1 << 20
    if desc.type == BarType.FIXED and desc.fixed_size:
        if size > desc.fixed_size:
            raise ValueError(f"BAR{bar}: requested size is larger than fixed size")
        size = desc.fixed_size
    else:
        size = 1 << (size - 1).bit_length()
    align = features.align
    return size, (size + align - 1) // align * align if align else size


class _Tagged(logging.LoggerAdapter[logging.Logger]):
    """A function's log lines start with "<controller>/<function>" (its tag when logged:
    the composition names it after the function is made)."""

    def __init__(self, logger: logging.Logger, epf: PciEpf) -> None:
        super().__init__(logger)
        self.epf = epf

    def process(self, msg: object, kwargs: MutableMapping[str, Any]
                ) -> tuple[object, MutableMapping[str, Any]]:
        return f"{self.epf.tag}: {msg}", kwargs


class PciEpf(EpcEvents):
    """A function: header, interrupt counts, BARs; subclasses implement the event ops."""

    name = "pci_epf"

    def __init__(self, header: PciHeader, msi_interrupts: int, msix_interrupts: int,
                 doorbell: str = "auto") -> None:
        self.header = header
        self.msi_interrupts = msi_interrupts
        self.msix_interrupts = msix_interrupts
        self.epc: PciEpc | None = None
        self.func_no = 0
        self.vfunc_no = 0
        # Who this is in logs: "<controller>/<configfs function name>", set by the composition.
        self.tag = self.name
        self.log = _Tagged(logging.getLogger(type(self).__module__), self)
        self.bar: list[PciEpfBar | None] = [None] * NUM_BARS
        # The secondary interface of a function bridging two controllers (pci-epf-ntb).
        self.sec_epc: PciEpc | None = None
        self.sec_epc_func_no = 0
        self.sec_epc_bar: list[PciEpfBar | None] = [None] * NUM_BARS
        # Doorbells (vfio_ep.epf.doorbell): the configured backend and what it handed out.
        self.doorbell = doorbell
        self.db_msg: list[PciEpfDoorbellMsg] = []
        self.db_backend = ""
        self.db_poll: PollDoorbell | None = None

    @property
    def controller(self) -> PciEpc:
        """epf->epc, the primary interface's controller.  RuntimeError before bind: a
        function touching a controller it was never given is a bug, not a refusal."""
        if self.epc is None:
            raise RuntimeError(f"{self.name} is not bound to a controller")
        return self.epc

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> EpWork:
        """queue_work() on the controller's CPU; usable before bind, as a callback that
        runs after it (a trapped register's handler)."""
        return self.controller.spawn(fn, name)

    @property
    def features(self) -> EpcFeatures:
        """pci_epc_get_features() of this function's controller."""
        return self.controller.get_features(self.func_no, self.vfunc_no)

    def bind_to(self, epc: PciEpc, interface: int = PRIMARY_INTERFACE) -> None:
        """pci_epc_add_epf() (as the primary or the secondary interface) + the driver's
        .bind, which a two-interface function runs once both are linked."""
        if interface == PRIMARY_INTERFACE:
            self.epc = epc
        else:
            self.sec_epc = epc
        epc.add_epf(self.events_for(interface))
        self.bind()

    def events_for(self, interface: int) -> EpcEvents:
        """Who hears the controller's events on ``interface``: the function itself, unless
        it must know which of its two controllers spoke."""
        return self

    def align_inbound_addr(self, bar: int, addr: int) -> tuple[int, int]:
        """pci_epf_align_inbound_addr(): (BAR-size aligned base, offset of ``addr`` in it)."""
        b = self.bar[bar]
        align = b.size if b else 1
        return addr & ~(align - 1), addr & (align - 1)

    def alloc_space(self, size: int, bar: int, features: EpcFeatures,
                    interface: int = PRIMARY_INTERFACE) -> PciEpfBar | None:
        """pci_epf_alloc_space(): zeroed EP RAM aligned to the BAR size, recorded in the
        interface's BAR array; None on failure (too big for a fixed BAR, RAM exhausted)."""
        try:
            size, mem_size = required_bar_size(size, bar, features)
            phys = self.controller.ram.alloc(mem_size, align=max(size, features.align, 0x1000))
        except (ValueError, MemoryError) as e:
            self.log.error("cannot allocate BAR%d space: %s", bar, e)
            return None
        flags = PCI_BASE_ADDRESS_MEM_TYPE_64 if size >> 32 or features.bar[bar].only_64bit \
            else 0
        bars = self.bar if interface == PRIMARY_INTERFACE else self.sec_epc_bar
        bars[bar] = PciEpfBar(bar, phys, size, mem_size, flags)
        return bars[bar]

    def free_space(self, bar: int) -> None:
        """pci_epf_free_space(): give BAR ``bar``'s EP RAM back (nothing if it has none)."""
        b = self.bar[bar]
        if b is not None:
            self.controller.ram.free(b.phys_addr, b.mem_size)
            self.bar[bar] = None

    def facts(self) -> dict[str, object]:
        """What a run records of this bound function, and what its guest's suite is told to
        expect (``vfio-ep serve --facts``): its driver, plus what each driver adds.  The
        server that serves the function says so, so no runner rebuilds the model to learn."""
        return {"function": self.name}

    # Driver ops and controller events: overridden by functions.
    def bind(self) -> None:
        """Called once bound: query features, allocate space."""

    def epc_init(self) -> None:
        """The controller is ready: write the header, set BARs and interrupts."""

    def epc_deinit(self) -> None:
        """The controller goes down (PERST#): stop using it."""

    def link_up(self) -> None:
        """An RC is connected."""

    def link_down(self) -> None:
        """The RC went away."""
