"""Inbound iATU: BAR accesses from the RC translated to EP addresses.

BAR-match mode maps a whole BAR to one EP address (one iATU region);
address-match mode (the kernel's BAR subrange mapping) maps consecutive
pieces of one BAR to different EP addresses, one region each.  Regions can be
reprogrammed while the guest runs; each change re-derives the BAR's windows
in the PCI device's dispatch table, splitting a translation wherever the EP
side changes kind (RAM, watched RAM, an MMIO block, or nothing).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass

from vfio_ep.epc.address_space import ApertureWindow, EpAddressSpace, WatchedRam
from vfio_ep.pci.bar import Window, WindowKind

log = logging.getLogger(__name__)


class NoInboundWindow(Exception):
    """All inbound iATU regions are in use (the kernel's -ENOSPC)."""


@dataclass(frozen=True)
class InboundRegion:
    bar: int
    bar_offset: int
    size: int
    ep_addr: int


class InboundAtu:
    def __init__(self, space: EpAddressSpace, num_windows: int) -> None:
        self.space = space
        self.num_windows = num_windows
        self.regions: dict[int, list[InboundRegion]] = {}

    def program(self, bar: int, pieces: list[tuple[int, int]]) -> None:
        """Translate BAR ``bar`` as consecutive (ep_addr, size) pieces from offset 0."""
        in_use = sum(len(r) for b, r in self.regions.items() if b != bar)
        if in_use + len(pieces) > self.num_windows:
            raise NoInboundWindow(f"BAR{bar} needs {len(pieces)} inbound regions, "
                                  f"{self.num_windows - in_use} free")
        regions = []
        offset = 0
        for ep_addr, size in pieces:
            regions.append(InboundRegion(bar, offset, size, ep_addr))
            offset += size
        self.regions[bar] = regions
        log.debug("iATU inbound BAR%d: %s", bar,
                  ", ".join(f"+{r.bar_offset:#x} -> {r.ep_addr:#x} ({r.size:#x})"
                            for r in regions))

    def clear(self, bar: int) -> None:
        self.regions.pop(bar, None)

    def windows(self, bar: int, mmap: bool) -> list[Window]:
        """The dispatch-table rows for ``bar``; RAM rows may be exported when ``mmap``."""
        rows: list[Window] = []
        for r in self.regions.get(bar, []):
            rows += self._split(r, mmap)
        return rows

    def _split(self, r: InboundRegion, mmap: bool) -> list[Window]:
        space = self.space
        ram = space.ram
        lo, hi = r.ep_addr, r.ep_addr + r.size
        cuts = {lo, hi, ram.base, ram.base + ram.size}
        for b in space.blocks:
            cuts |= {b.base, b.base + b.size}
        for w in space.watches:
            cuts |= {w.start, w.end}
        for d in space.doorbells:
            cuts |= {d.addr, d.addr + 4}
        for base, end in space.aperture_bounds():
            cuts |= {base, end}
        points = sorted(c for c in cuts if lo <= c <= hi)
        rows = []
        for start, end in itertools.pairwise(points):
            bar_start = r.bar_offset + start - lo
            bar_end = bar_start + end - start
            if ram.contains(start, end - start):
                watched = any(w.start < end and start < w.end for w in space.watches)
                for ep, phys, n in ram.extents(start, end - start):
                    b0 = r.bar_offset + ep - lo
                    if watched:
                        rows.append(Window(r.bar, b0, b0 + n, WindowKind.MMIO,
                                           WatchedRam(ram, space.watches, ep - phys), phys))
                    else:
                        rows.append(Window(r.bar, b0, b0 + n, WindowKind.RAM, ram.mem, phys,
                                           mmap=mmap))
                continue
            doorbell = space.doorbell_at(start, end - start)
            if doorbell:
                rows.append(Window(r.bar, bar_start, bar_end, WindowKind.DOORBELL, doorbell))
                continue
            block = space.block_at(start, end - start)
            aperture = space.aperture_at(start, end - start)
            if block:
                rows.append(Window(r.bar, bar_start, bar_end, WindowKind.MMIO, block.handler,
                                   start - block.base))
            elif aperture:
                base, target = aperture
                for off, n, mem in target.shared_extents(start - base, end - start):
                    b0 = bar_start + off - (start - base)
                    rows.append(Window(r.bar, b0, b0 + n, WindowKind.RAM, mem) if mem else
                                Window(r.bar, b0, b0 + n, WindowKind.MMIO,
                                       ApertureWindow(target, off)))
            else:
                log.debug("BAR%d [%#x, %#x) translates to unbacked EP address %#x",
                          r.bar, bar_start, bar_end, start)
        return rows
