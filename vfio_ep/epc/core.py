"""The EPC core (drivers/pci/endpoint/pci-epc-core.c, pci-epc-mem.c): the calls a function
makes on its controller.

The core owns no policy: each call checks what pci-epc-core.c checks (a valid function
number, the BAR rules of the controller's ``epc_features``) and hands the rest to the
controller driver behind :class:`PciEpcOps`, as ``epc->ops`` does.  It also manages the
outbound address space (``pci_epc_mem``) and tells the bound functions about the controller's
events (``epc_init``/``epc_deinit`` on PERST#, ``link_up``/``link_down``).

Besides the EPC, a function uses what the SoC around it offers (EP RAM, the bus, IRQs, a
CPU, the platform MSI controller, the eDMA): :attr:`PciEpc.soc`, with the common parts
forwarded (``epc.ram``, ``epc.space``, ``epc.irqs``, ``epc.spawn``).
"""

from __future__ import annotations

import enum
import errno
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Protocol

from vfio_ep.config import U32, Range
from vfio_ep.epc.address_space import PAGE, EpAddressSpace, EpRam
from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.dw import EDMA_BASE, DwPcieEp, PciEpcAuxResource
from vfio_ep.epc.edma import DmaChannel
from vfio_ep.epc.features import BarType, EpcFeatures, profile
from vfio_ep.epc.irq import IrqDomain
from vfio_ep.epc.msi_controller import PlatformMsiController
from vfio_ep.epc.outbound import PciEpcMem
from vfio_ep.epc.soc import EP_RAM_BASE, EpcError, EpSoc, EpWork
from vfio_ep.pci.bar import NUM_BARS, PCI_BASE_ADDRESS_MEM_TYPE_64, PCI_BASE_ADDRESS_SPACE_IO
from vfio_ep.pci.device import PciDevice, PciHeader

__all__ = ["EpcError", "IrqType", "PciEpc", "PciEpcAttributes", "PciEpcMap", "PciEpcOps"]

PCI_BASE_ADDRESS_IO_MASK = ~0x3
SZ_1M = 1 << 20
RESIZABLE_MAX = 128 << 40  # SZ_128G * 1024
DMA_CHANNEL_KINDS = ("memcpy", "slave", "dw-edma")


class IrqType(enum.IntEnum):
    """PCI_IRQ_INTX / PCI_IRQ_MSI / PCI_IRQ_MSIX as pci_epc_raise_irq() takes them."""

    INTX = 1
    MSI = 2
    MSIX = 4


@dataclass
class PciEpcMap:
    """struct pci_epc_map: an RC address range reachable at ``phys_addr`` (EP address)."""

    pci_addr: int
    pci_size: int
    map_pci_addr: int
    map_size: int
    phys_base: int
    phys_addr: int


@dataclass(frozen=True)
class PciEpcAttributes:
    """The SoC behind ``controllers/<name>``: what a kernel EPC driver hard-codes (its
    profile, reserved BARs), the EP RAM size, and the period of the core's poll doorbell."""

    profile: str = "generic"
    ram_size: Annotated[int, Range(PAGE, EDMA_BASE - EP_RAM_BASE, sizes=True,
                                   why="EP RAM ends where the SoC's MMIO begins")] = 256 << 20
    # More reserved BARs than the profile has, e.g. (0, 1) puts pci-epf-test's registers
    # in BAR2 as on AM654.
    reserved_bars: tuple[Annotated[int, Range(0, NUM_BARS - 1)], ...] = ()
    msi_mutable: bool = False
    # pci-epf-test's command handler polls every 1 ms, and so does the core's poll doorbell;
    # pci-epf-vntb brings its own default, the kernel's 5 ms (its CONTROLLER_DEFAULTS).
    doorbell_poll_interval_us: Annotated[U32, Range(1, 0xFFFF_FFFF)] = 1000
    # An EP guest's dmaengine view of the eDMA: its EPC driver's "memcpy" channels
    # (pci-epf-test's generic DMA path) or "slave" channels as dw-edma offers them
    # (nvmet-pci-epf's), or "dw-edma": Linux's own dw-edma driver in linked-list mode, with
    # its interrupt-emulation doorbell, as on a DesignWare SoC.
    dma_channels: str = "memcpy"
    # False: a SoC without the eDMA, so with no embedded doorbell either: an EP guest's
    # pci-epf-vntb then polls its doorbells every 5 ms, as on such a board.
    edma: bool = True

    def __post_init__(self) -> None:
        if self.dma_channels not in DMA_CHANNEL_KINDS:
            raise ValueError(f"dma_channels {self.dma_channels!r}: one of "
                             f"{', '.join(DMA_CHANNEL_KINDS)}")


class PciEpcOps(Protocol):
    """struct pci_epc_ops: what a controller driver implements (errors are EpcError)."""

    def get_features(self, func_no: int, vfunc_no: int) -> EpcFeatures: ...

    def write_header(self, func_no: int, vfunc_no: int, header: PciHeader) -> None: ...

    def set_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None: ...

    def clear_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None: ...

    def align_addr(self, pci_addr: int, size: int) -> tuple[int, int, int]: ...

    def map_addr(self, func_no: int, vfunc_no: int, phys_addr: int, pci_addr: int,
                 size: int) -> None: ...

    def unmap_addr(self, func_no: int, vfunc_no: int, phys_addr: int) -> None: ...

    def map_msi_irq(self, func_no: int, vfunc_no: int, phys_addr: int, interrupt_num: int,
                    entry_size: int, msix: bool) -> tuple[int, int]: ...

    def set_msi(self, func_no: int, vfunc_no: int, nr_irqs: int) -> None: ...

    def get_msi(self, func_no: int, vfunc_no: int) -> int: ...

    def set_msix(self, func_no: int, vfunc_no: int, nr_irqs: int, bar: int,
                 offset: int) -> None: ...

    def get_msix(self, func_no: int, vfunc_no: int) -> int: ...

    def raise_intx(self, func_no: int, vfunc_no: int) -> None: ...

    def raise_msi(self, func_no: int, vfunc_no: int, interrupt_num: int) -> None: ...

    def raise_msix(self, func_no: int, vfunc_no: int, interrupt_num: int) -> None: ...

    def get_aux_resources(self, func_no: int, vfunc_no: int) -> list[PciEpcAuxResource]: ...

    def start_doorbell(self, res: PciEpcAuxResource) -> None: ...

    def dma_channel(self, direction: str, ch: int) -> DmaChannel | None: ...

    def outbound_window(self) -> tuple[int, int, int]: ...

    def start(self) -> PciDevice: ...

    # The core's notifiers, called by the controller on PERST# and link changes.
    on_reset: Callable[[], None]
    on_link: Callable[[bool], None]


class EpcEvents(Protocol):
    """What a bound function hears from its controller (pci_epc_event_ops)."""

    def epc_init(self) -> None: ...

    def epc_deinit(self) -> None: ...

    def link_up(self) -> None: ...

    def link_down(self) -> None: ...


class PciEpc:
    """struct pci_epc: the core in front of one controller driver."""

    def __init__(self, name: str, ops: PciEpcOps, soc: EpSoc, max_functions: int = 1) -> None:
        self.name = name
        self.ops = ops
        self.soc = soc
        self.max_functions = max_functions
        base, size, page = ops.outbound_window()
        self.mem = PciEpcMem(base, size, page)
        self.epfs: list[EpcEvents] = []
        self.pci: PciDevice | None = None
        ops.on_reset = self._perst
        ops.on_link = self._link_changed

    @classmethod
    def create(cls, name: str, a: PciEpcAttributes, soc: EpSoc | None = None) -> PciEpc:
        """``controllers/<name>``: a DesignWare-like controller of profile ``a.profile``,
        on ``soc`` or on a SoC of its own.  ValueError for an unknown profile or BAR."""
        prof = profile(a.profile, reserved_bars=a.reserved_bars, msi_mutable=a.msi_mutable,
                       edma=a.edma)
        if soc is None:
            soc = EpSoc(name, prof, a.ram_size, a.doorbell_poll_interval_us / 1e6)
        return cls(name, DwPcieEp(prof, soc), soc)

    # -- what the SoC offers, forwarded for functions ---------------------------------
    @property
    def ram(self) -> EpRam:
        """The SoC's DRAM (pci_epf_alloc_space and DMA buffers come from it)."""
        return self.soc.ram

    @property
    def space(self) -> EpAddressSpace:
        """The SoC's bus: the EP CPU's loads, stores and memcpy (RAM, MMIO, outbound)."""
        return self.soc.space

    @property
    def irqs(self) -> IrqDomain:
        """The SoC's interrupt domain (request_irq/free_irq on its virqs)."""
        return self.soc.irqs

    @property
    def msi(self) -> PlatformMsiController | None:
        """The platform MSI controller doorbells are allocated from (None: the SoC has
        none, as R-Car S4 and the seeds' RK3588)."""
        return self.soc.msi

    @property
    def doorbell_poll_interval(self) -> float:
        """Seconds between two looks at a poll-mode doorbell (doorbell_poll_interval_us)."""
        return self.soc.doorbell_poll_interval

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> EpWork:
        """queue_work() on the EP's CPU; the handle cancels it (cancel_work_sync())."""
        return self.soc.spawn(fn, name)

    def dma_channel(self, direction: str, ch: int = 0) -> DmaChannel | None:
        """dma_request_channel() for this controller's eDMA (None without one)."""
        return self.ops.dma_channel(direction, ch)

    # -- pci_epc_* -------------------------------------------------------------------
    def _check_function(self, func_no: int, vfunc_no: int) -> None:
        """pci_epc_function_is_valid(): -EINVAL otherwise (no virtual functions here)."""
        if not 0 <= func_no < self.max_functions or vfunc_no > 0:
            raise EpcError(errno.EINVAL, f"{self.name}: function {func_no}.{vfunc_no} does "
                           f"not exist ({self.max_functions} function(s), no VFs)")

    def get_features(self, func_no: int = 0, vfunc_no: int = 0) -> EpcFeatures:
        """pci_epc_get_features(): the controller's features for this function.

        Raises EpcError -EINVAL for an invalid function number."""
        self._check_function(func_no, vfunc_no)
        return self.ops.get_features(func_no, vfunc_no)

    def write_header(self, func_no: int, vfunc_no: int, header: PciHeader) -> None:
        """pci_epc_write_header(): the function's configuration header.

        Raises EpcError: -EINVAL (invalid function), -EBUSY (a different header after
        start: QEMU has read the config space)."""
        self._check_function(func_no, vfunc_no)
        self.ops.write_header(func_no, vfunc_no, header)

    def set_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None:
        """pci_epc_set_bar(): program BAR ``epf_bar.barno`` to translate to
        ``epf_bar.phys_addr`` (or to its submap pieces).

        Raises EpcError: -EINVAL for what pci-epc-core.c refuses (a submap the controller
        cannot do, a resizable BAR outside 1 MiB-128 TiB, a fixed BAR of another size, a size
        not a power of two, a 64-bit BAR5, an I/O BAR with a memory flag, more than 4 GiB
        without the 64-bit flag) and for a reserved or disabled BAR; -EBUSY for a size change
        after start or a translation a directly mapped BAR cannot show; -ENOSPC when the
        inbound iATU has no free region."""
        self._check_function(func_no, vfunc_no)
        features = self.ops.get_features(func_no, vfunc_no)
        bar, size, flags = epf_bar.barno, epf_bar.size, epf_bar.flags
        desc = features.bar[bar]
        if epf_bar.submap and not (features.dynamic_inbound_mapping
                                   and features.subrange_mapping):
            raise EpcError(errno.EINVAL, "subrange mapping not supported")
        if desc.type == BarType.RESIZABLE and not SZ_1M <= size <= RESIZABLE_MAX:
            raise EpcError(errno.EINVAL, f"resizable BAR{bar} size {size:#x}")
        if desc.type == BarType.FIXED and desc.fixed_size != size:
            raise EpcError(errno.EINVAL, f"BAR{bar} is fixed at {desc.fixed_size:#x}")
        if not size or size & (size - 1):
            raise EpcError(errno.EINVAL, f"BAR{bar} size {size:#x} is not a power of two")
        if ((bar == NUM_BARS - 1 and flags & PCI_BASE_ADDRESS_MEM_TYPE_64)
                or (flags & PCI_BASE_ADDRESS_SPACE_IO and flags & PCI_BASE_ADDRESS_IO_MASK)
                or (size >> 32 and not flags & PCI_BASE_ADDRESS_MEM_TYPE_64)):
            raise EpcError(errno.EINVAL, f"BAR{bar} flags {flags:#x} for size {size:#x}")
        if desc.type in (BarType.RESERVED, BarType.DISABLED):
            raise EpcError(errno.EINVAL, f"BAR{bar} is {desc.type.name.lower()}")
        if epf_bar.submap and sum(s.size for s in epf_bar.submap) != size:
            raise EpcError(errno.EINVAL, f"BAR{bar} submap does not cover the BAR")
        self.ops.set_bar(func_no, vfunc_no, epf_bar)

    def clear_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None:
        """pci_epc_clear_bar(): stop translating the BAR (its address stays assigned).

        Raises EpcError -EINVAL for a function that does not exist."""
        self._check_function(func_no, vfunc_no)
        self.ops.clear_bar(func_no, vfunc_no, epf_bar)

    def map_addr(self, func_no: int, vfunc_no: int, phys_addr: int, pci_addr: int,
                 size: int) -> None:
        """pci_epc_map_addr(): EP addresses [phys_addr, +size) reach RC ``pci_addr``.

        Raises EpcError -EINVAL (invalid function), -ENOMEM (no free outbound region, or a
        range outside the outbound aperture)."""
        self._check_function(func_no, vfunc_no)
        self.ops.map_addr(func_no, vfunc_no, phys_addr, pci_addr, size)

    def unmap_addr(self, func_no: int, vfunc_no: int, phys_addr: int) -> None:
        """pci_epc_unmap_addr(): the outbound region at ``phys_addr`` stops reaching the RC
        (nothing there: nothing to do).  Raises EpcError -EINVAL for a function that does
        not exist."""
        self._check_function(func_no, vfunc_no)
        self.ops.unmap_addr(func_no, vfunc_no, phys_addr)

    def map_msi_irq(self, func_no: int, vfunc_no: int, phys_addr: int, interrupt_num: int,
                    entry_size: int, msix: bool = False) -> tuple[int, int]:
        """pci_epc_map_msi_irq(): make ``interrupt_num`` slots of ``entry_size`` bytes at EP
        address ``phys_addr`` raise the RC's MSI vectors; (data, offset): slot i rings with
        ``data | i`` written at ``offset`` in the slot.  ``msix`` (a vfio-ep extension) does
        the same for MSI-X vectors, whose table only QEMU sees.

        Raises EpcError -EINVAL (invalid function, fewer vectors enabled, outside the
        outbound aperture)."""
        self._check_function(func_no, vfunc_no)
        return self.ops.map_msi_irq(func_no, vfunc_no, phys_addr, interrupt_num, entry_size,
                                    msix)

    def set_msi(self, func_no: int, vfunc_no: int, nr_irqs: int) -> None:
        """pci_epc_set_msi(): advertise ``nr_irqs`` MSI vectors (rounded up to a power of 2).

        Raises EpcError: -EINVAL outside 1..32 or on a controller without MSI; -EBUSY for
        a change after start."""
        self._check_function(func_no, vfunc_no)
        if not self.ops.get_features(func_no, vfunc_no).msi_capable or not 1 <= nr_irqs <= 32:
            raise EpcError(errno.EINVAL, f"MSI with {nr_irqs} vectors")
        self.ops.set_msi(func_no, vfunc_no, nr_irqs)

    def get_msi(self, func_no: int = 0, vfunc_no: int = 0) -> int:
        """pci_epc_get_msi(): how many vectors the RC enabled; -EINVAL (returned, as in
        Linux) with MSI disabled.  Raises EpcError -EINVAL for a function that does not
        exist."""
        self._check_function(func_no, vfunc_no)
        return self.ops.get_msi(func_no, vfunc_no)

    def set_msix(self, func_no: int, vfunc_no: int, nr_irqs: int, bar: int,
                 offset: int) -> None:
        """pci_epc_set_msix(): ``nr_irqs`` MSI-X vectors, table at ``offset`` of ``bar``.

        Raises EpcError: -EINVAL outside 1..2048 or without MSI-X; -EBUSY after start."""
        self._check_function(func_no, vfunc_no)
        if not self.ops.get_features(func_no, vfunc_no).msix_capable or \
                not 1 <= nr_irqs <= 2048:
            raise EpcError(errno.EINVAL, f"MSI-X with {nr_irqs} vectors")
        self.ops.set_msix(func_no, vfunc_no, nr_irqs, bar, offset)

    def get_msix(self, func_no: int = 0, vfunc_no: int = 0) -> int:
        """pci_epc_get_msix(): how many vectors the RC enabled; -EINVAL (returned, as in
        Linux) with MSI-X disabled.  Raises EpcError -EINVAL for a function that does not
        exist."""
        self._check_function(func_no, vfunc_no)
        return self.ops.get_msix(func_no, vfunc_no)

    def raise_irq(self, func_no: int, vfunc_no: int, irq_type: IrqType,
                  interrupt_num: int) -> None:
        """pci_epc_raise_irq(): INTx, or MSI/MSI-X ``interrupt_num`` (1-based, as in Linux).

        Raises EpcError -EINVAL: a controller without INTx, no RC attached, or a vector the
        RC did not enable."""
        self._check_function(func_no, vfunc_no)
        if irq_type == IrqType.INTX:
            if not self.ops.get_features(func_no, vfunc_no).intx_capable:
                raise EpcError(errno.EINVAL, "this controller cannot raise INTx")
            self.ops.raise_intx(func_no, vfunc_no)
        elif irq_type == IrqType.MSI:
            self.ops.raise_msi(func_no, vfunc_no, interrupt_num)
        else:
            self.ops.raise_msix(func_no, vfunc_no, interrupt_num)

    def get_aux_resources(self, func_no: int = 0, vfunc_no: int = 0
                          ) -> list[PciEpcAuxResource]:
        """pci_epc_get_aux_resources(): platform resources beside the EPC (an embedded
        doorbell), possibly pre-exposed in a BAR."""
        self._check_function(func_no, vfunc_no)
        return self.ops.get_aux_resources(func_no, vfunc_no)

    def start_doorbell(self, res: PciEpcAuxResource) -> None:
        """Arm the doorbell register behind an aux resource ("write 0 to assert").

        Raises EpcError -ENODEV on a controller without one."""
        self.ops.start_doorbell(res)

    # -- pci_epc_mem --------------------------------------------------------------
    def mem_alloc_addr(self, size: int) -> int | None:
        """pci_epc_mem_alloc_addr(): outbound address space, None when exhausted."""
        return self.mem.alloc_addr(size)

    def mem_free_addr(self, phys_addr: int, size: int) -> None:
        """pci_epc_mem_free_addr(): give back what mem_alloc_addr() returned."""
        self.mem.free_addr(phys_addr, size)

    def mem_map(self, func_no: int, vfunc_no: int, pci_addr: int, pci_size: int) -> PciEpcMap:
        """pci_epc_mem_map(): align, allocate outbound space, program an outbound region.

        ``pci_size`` of the result may be smaller than asked (one region's reach).  Raises
        EpcError -EINVAL (size 0), -ENOMEM (no outbound space or region)."""
        if not pci_size:
            raise EpcError(errno.EINVAL, "zero-sized map")
        map_pci, map_size, offset = self.ops.align_addr(pci_addr, pci_size)
        size = min(pci_size, map_pci + map_size - pci_addr)
        phys = self.mem.alloc_addr(map_size)
        if phys is None:
            raise EpcError(errno.ENOMEM, f"outbound aperture cannot hold {map_size:#x} bytes")
        try:
            self.map_addr(func_no, vfunc_no, phys, map_pci, map_size)
        except EpcError:
            self.mem.free_addr(phys, map_size)
            raise
        return PciEpcMap(pci_addr, size, map_pci, map_size, phys, phys + offset)

    def mem_unmap(self, func_no: int, vfunc_no: int, m: PciEpcMap) -> None:
        """pci_epc_mem_unmap(): undo mem_map() (its outbound region and address space)."""
        self.unmap_addr(func_no, vfunc_no, m.phys_base)
        self.mem.free_addr(m.phys_base, m.map_size)

    # -- lifecycle --------------------------------------------------------------------
    def add_epf(self, epf: EpcEvents) -> None:
        """pci_epc_add_epf(): bind ``epf`` (it hears epc_init, link and reset events)."""
        self.epfs.append(epf)

    def init_notify(self) -> None:
        """pci_epc_init_notify(): the controller is ready, functions program it (epc_init)."""
        for epf in self.epfs:
            epf.epc_init()

    def start(self) -> PciDevice:
        """pci_epc_start(): freeze the config space and expose the device (the one the
        vfio-user server serves); after it, what QEMU has read is fixed: a header, BAR size or
        flags, or MSI/MSI-X change raises EpcError -EBUSY."""
        self.pci = self.ops.start()
        return self.pci

    def _link_changed(self, up: bool) -> None:
        """pci_epc_linkup() / pci_epc_linkdown()."""
        for epf in self.epfs:
            if up:
                epf.link_up()
            else:
                epf.link_down()

    def _perst(self) -> None:
        """A device reset is PERST#: functions tear down and re-initialise the controller."""
        for epf in self.epfs:
            epf.epc_deinit()
        for epf in self.epfs:
            epf.epc_init()
