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

from vfio_ep.epc.address_space import AddressError
from vfio_ep.pci.host import RcMemory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OutboundRegion:
    phys_addr: int  # EP address inside the aperture
    pci_addr: int
    size: int


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


class OutboundAtu:
    """Outbound iATU regions, and the aperture [base, base + size) they make reachable."""

    def __init__(self, base: int, size: int, num_windows: int,
                 rc: Callable[[], RcMemory | None]) -> None:
        self.base = base
        self.size = size
        self.num_windows = num_windows
        self.regions: list[OutboundRegion] = []
        self._rc = rc

    def map_addr(self, phys_addr: int, pci_addr: int, size: int) -> None:
        """Program a region; mapping an address that is mapped already reprograms its
        region (as dw_pcie_ep_map_addr() finds the window by address)."""
        others = [r for r in self.regions if r.phys_addr != phys_addr]
        if len(others) >= self.num_windows:
            raise AddressError(f"no free outbound iATU region ({self.num_windows} in use)")
        if not (self.base <= phys_addr and phys_addr + size <= self.base + self.size):
            raise AddressError(f"outbound map of {phys_addr:#x}+{size:#x} outside the aperture")
        self.regions = [*others, OutboundRegion(phys_addr, pci_addr, size)]

    def unmap_addr(self, phys_addr: int) -> None:
        self.regions = [r for r in self.regions if r.phys_addr != phys_addr]

    def translate(self, offset: int, size: int) -> int:
        addr = self.base + offset
        for r in self.regions:
            if r.phys_addr <= addr and addr + size <= r.phys_addr + r.size:
                return r.pci_addr + addr - r.phys_addr
        raise AddressError(f"outbound access [{addr:#x}, {addr + size:#x}) is not mapped")

    def _table(self) -> RcMemory:
        rc = self._rc()
        if rc is None:
            raise AddressError("outbound access with no RC attached (link down)")
        return rc

    # The Aperture protocol (EpAddressSpace routes the aperture's addresses here).
    async def read(self, offset: int, size: int) -> bytes:
        return await self._table().read(self.translate(offset, size), size)

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        await self._table().write(self.translate(offset, len(data)), data)
