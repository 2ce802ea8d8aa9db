"""Outbound: the EP's window onto RC memory (``pci_epc_mem`` + the outbound iATU).

``pci_epc_mem_alloc_addr`` hands out pages of the outbound aperture (EP
addresses); ``map_addr`` points an outbound iATU region from such an EP
address to an RC bus address.  An EP access inside a mapped region becomes an
access to RC memory (the attached client's ``RcMemory``); anything outside
is an error that the caller reports, never an exception that escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from vfio_ep.epc.address_space import AddressError, Aperture
from vfio_ep.memory import ForeignMemory
from vfio_ep.pci.host import RcBusError, RcMemory

log = logging.getLogger(__name__)


IrqWrite = Callable[[int, int], None]  # (offset in the region, value written)

# Where the RC's MSI-X messages point: x86's interrupt window, which a write reaches as an
# interrupt, never as memory.  The RC's VMM keeps the MSI-X table a BAR holds to itself
# (QEMU's vfio-user client emulates it and takes vectors as eventfds), so what the EP reads
# of that table is what the controller puts there (DwPcieEp: entry i is this address with
# data i) and an outbound write here, as the RC's interrupt controller would, raises the
# vector its data names (pci-epf-ntb's doorbells: it maps the table's addresses itself).
RC_MSI_ADDR = 0xFEE00000
RC_MSI_SIZE = 0x1000


@dataclass(frozen=True)
class OutboundRegion:
    phys_addr: int  # EP address inside the aperture
    pci_addr: int
    size: int
    irq: IrqWrite | None = None  # an MSI translation: writes raise an interrupt on the RC


class PciEpcMem:
    """struct pci_epc_mem: a page bitmap over the outbound aperture."""

    def __init__(self, phys_base: int, size: int, page_size: int) -> None:
        self.phys_base = phys_base
        self.size = size
        self.page_size = page_size
        self.used = [False] * (size // page_size)

    def alloc_addr(self, size: int) -> int | None:
        """pci_epc_mem_alloc_addr(): first fit, None when the aperture is full."""
        pages = -(-size // self.page_size)
        run = 0
        for i, used in enumerate(self.used):
            run = 0 if used else run + 1
            if run == pages:
                first = i - pages + 1
                self.used[first : i + 1] = [True] * pages
                return self.phys_base + first * self.page_size
        return None

    def free_addr(self, phys_addr: int, size: int) -> None:
        first = (phys_addr - self.phys_base) // self.page_size
        pages = -(-size // self.page_size)
        self.used[first : first + pages] = [False] * pages


class OutboundAtu(Aperture):
    """Outbound iATU regions, and the aperture [base, base + size) they make reachable."""

    def __init__(self, base: int, size: int, num_windows: int,
                 rc: Callable[[], RcMemory | None]) -> None:
        self.base = base
        self.size = size
        self.num_windows = num_windows
        self.regions: list[OutboundRegion] = []
        self._rc = rc
        # Set when another controller's BAR translates onto this aperture: such BARs show
        # RC memory through it (shared_extents), so every change must refresh them.
        self.shown = False
        self.on_change: list[Callable[[], None]] = []
        # The RC's interrupt controller: a write mapped into [RC_MSI_ADDR, +RC_MSI_SIZE)
        # (offset there, value); None: such writes go to RC memory like any other.
        self.msi: IrqWrite | None = None

    def changed(self) -> None:
        """The translation or the RC memory behind it changed: refresh BARs showing it."""
        if self.shown:
            for hook in self.on_change:
                hook()

    def map_addr(self, phys_addr: int, pci_addr: int, size: int) -> None:
        """Program a region; mapping an address that is mapped already reprograms its
        region (as dw_pcie_ep_map_addr() finds the window by address)."""
        others = [r for r in self.regions if r.phys_addr != phys_addr]
        if len(others) >= self.num_windows:
            raise AddressError(f"no free outbound iATU region ({self.num_windows} in use)")
        if not (self.base <= phys_addr and phys_addr + size <= self.base + self.size):
            raise AddressError(f"outbound map of {phys_addr:#x}+{size:#x} outside the aperture")
        self.regions = [*others, OutboundRegion(phys_addr, pci_addr, size)]
        self.changed()

    def map_irq(self, phys_addr: int, size: int, irq: IrqWrite) -> None:
        """A region whose writes are MSI writes: ``irq(offset, value)`` raises them."""
        self.map_addr(phys_addr, 0, size)
        self.regions = [r if r.phys_addr != phys_addr else OutboundRegion(
            phys_addr, 0, size, irq) for r in self.regions]
        self.changed()

    def unmap_addr(self, phys_addr: int) -> None:
        before = len(self.regions)
        self.regions = [r for r in self.regions if r.phys_addr != phys_addr]
        if len(self.regions) != before:
            self.changed()

    def clear(self) -> None:
        """Every region unmapped (the controller reset with its SoC)."""
        if self.regions:
            self.regions = []
            self.changed()

    def shared_extents(self, offset: int, size: int) -> list[tuple[int, int, ForeignMemory | None]]:
        """[(offset, length, memory)] covering [offset, offset + size): where the range is
        mapped onto RC memory the server shares, that memory (accessed directly, by C too);
        elsewhere None (an interrupt region, nothing mapped, no RC, no shared fd)."""
        self.shown = True
        rc = self._rc()
        out: list[tuple[int, int, ForeignMemory | None]] = []
        pos, end = self.base + offset, self.base + offset + size
        while pos < end:
            region = next((r for r in self.regions
                           if r.phys_addr <= pos < r.phys_addr + r.size), None)
            if region is None:
                nxt = min([r.phys_addr for r in self.regions if r.phys_addr > pos] + [end])
                out.append((pos - self.base, nxt - pos, None))
                pos = nxt
                continue
            n = min(end, region.phys_addr + region.size) - pos
            mem = None
            pci = region.pci_addr + pos - region.phys_addr
            in_msi = self.msi is not None and pci < RC_MSI_ADDR + RC_MSI_SIZE \
                and pci + n > RC_MSI_ADDR
            if region.irq is None and rc is not None and not in_msi:
                try:
                    mem = ForeignMemory(rc.view(pci, n))
                except RcBusError:
                    mem = None
            out.append((pos - self.base, n, mem))
            pos += n
        return out

    def _region(self, offset: int, size: int) -> OutboundRegion:
        addr = self.base + offset
        for r in self.regions:
            if r.phys_addr <= addr and addr + size <= r.phys_addr + r.size:
                return r
        raise AddressError(f"outbound access [{addr:#x}, {addr + size:#x}) is not mapped")

    def translate(self, offset: int, size: int) -> int:
        r = self._region(offset, size)
        return r.pci_addr + self.base + offset - r.phys_addr

    def _table(self) -> RcMemory:
        rc = self._rc()
        if rc is None:
            raise AddressError("outbound access with no RC attached (link down)")
        return rc

    def _msi_offset(self, r: OutboundRegion, offset: int, size: int) -> int | None:
        """Where [offset, +size) of region ``r`` lands in the RC's MSI window (None: not
        there, or no interrupt controller modelled)."""
        if self.msi is None or r.irq is not None:
            return None
        pci = r.pci_addr + self.base + offset - r.phys_addr
        if pci >= RC_MSI_ADDR and pci + size <= RC_MSI_ADDR + RC_MSI_SIZE:
            return pci - RC_MSI_ADDR
        return None

    def _interrupt(self, offset: int, data: bytes | memoryview) -> bool:
        """Deliver a write that lands in an interrupt region or the RC's MSI window; False
        for any other region."""
        r = self._region(offset, len(data))
        value = int.from_bytes(data, "little")
        if r.irq is not None:
            r.irq(self.base + offset - r.phys_addr, value)
            return True
        msi = self._msi_offset(r, offset, len(data))
        if msi is None or self.msi is None:
            return False
        self.msi(msi, value)
        return True

    def _not_memory(self, offset: int, size: int) -> bool:
        r = self._region(offset, size)
        return r.irq is not None or self._msi_offset(r, offset, size) is not None

    # The Aperture protocol (EpAddressSpace routes the aperture's addresses here).
    def views(self, offset: int, size: int) -> list[memoryview] | None:
        if self._not_memory(offset, size):
            return None
        try:
            return self._table().views(self.translate(offset, size), size)
        except RcBusError as e:
            raise AddressError(str(e)) from None

    async def read(self, offset: int, size: int) -> bytes:
        return await self._table().read(self.translate(offset, size), size)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        if not self._interrupt(offset, data):
            await self._table().write(self.translate(offset, len(data)), data)

    def read_sync(self, offset: int, size: int) -> bytes:
        if self._not_memory(offset, size):
            return bytes(size)  # MSI targets read as zero
        return bytes(self._view(offset, size))

    def write_sync(self, offset: int, data: bytes) -> None:
        if not self._interrupt(offset, data):
            self._view(offset, len(data))[:] = data

    def _view(self, offset: int, size: int) -> memoryview:
        try:
            return self._table().view(self.translate(offset, size), size)
        except RcBusError as e:
            raise AddressError(str(e)) from None
