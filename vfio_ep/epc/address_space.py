"""The endpoint SoC's physical address space: EP RAM, MMIO blocks, the outbound aperture.

Everything the EP side touches has an EP address, as on the SoC: the EPF's
BAR backing (``pci_epf_alloc_space``) and DMA buffers live in EP RAM, the
eDMA and the MSI controller are MMIO blocks, and the outbound aperture
(``pci_epc_mem``) reaches RC memory through the outbound iATU.  Inbound BAR
accesses are routed here by the inbound iATU.

EP RAM may carry write watches: an inbound write into a watched range runs a
callback right after it lands, which is how a function reacts to a register
write without polling (pci-epf-test's 1 ms COMMAND poll becomes a trap).
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from vfio_ep.bulk import move, zero_views
from vfio_ep.memory import SharedMemory
from vfio_ep.pci.bar import MmioHandler
from vfio_ep.ratelimit import Repeats

PAGE = 0x1000

log = logging.getLogger(__name__)

WatchCallback = Callable[[int, int], None]


class AddressError(Exception):
    """An EP-side access that hits nothing (a bus error on the SoC)."""


class Aperture(Protocol):
    """An address range whose accesses leave the SoC (the outbound iATU).

    The EP's CPU uses the async calls (RC memory may need messages to the client); a BAR
    of another controller translating onto the aperture (pci-epf-ntb) uses the sync ones,
    which reach RC memory only where it is shared (AddressError otherwise)."""

    async def read(self, offset: int, size: int) -> bytes: ...

    async def write(self, offset: int, data: bytes | memoryview) -> None: ...

    def read_sync(self, offset: int, size: int) -> bytes: ...

    def write_sync(self, offset: int, data: bytes) -> None: ...

    def shared_extents(self, offset: int, size: int) -> list[tuple[int, int, Any]]: ...

    def views(self, offset: int, size: int) -> list[memoryview] | None:
        """Zero-copy windows where the range is shared RC memory, None where any of it is
        not (messages, an interrupt region); AddressError where nothing is mapped."""
        ...


@dataclass(frozen=True)
class MmioBlock:
    name: str
    base: int
    size: int
    handler: MmioHandler


@dataclass(frozen=True)
class Watch:
    start: int
    end: int
    callback: WatchCallback


class EpRam:
    """EP DRAM: pages of one memfd, a first-fit allocator, and a page remap table.

    EP addresses normally sit at the same offset in the memfd.  Pages can be
    remapped (their contents move with them) so that a BAR the client maps
    directly keeps showing, at each BAR offset, whatever EP address the
    inbound iATU translates it to: see :meth:`place`.  Behind the EP RAM the
    memfd has as many *scratch* pages, never addressed by the EP, that
    :meth:`evict` swaps in where a directly mapped BAR must not show EP RAM.
    """

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = -(-size // PAGE) * PAGE
        self.mem = SharedMemory("ep-ram", 2 * self.size)  # RAM, then scratch (sparse)
        self._free: list[tuple[int, int]] = [(0, self.size)]  # (offset, size), sorted
        self._ep2phys: dict[int, int] = {}  # page -> physical page, non-identity only
        self._phys2ep: dict[int, int] = {}
        self._next_scratch = self.size // PAGE
        # Run after pages moved (place/evict): whoever holds a memfd address of EP RAM
        # (the poll doorbell's C poller) looks it up again.
        self.on_remap: list[Callable[[], None]] = []

    def contains(self, addr: int, size: int) -> bool:
        return self.base <= addr and addr + size <= self.base + self.size

    def alloc(self, size: int, align: int = PAGE, *, zeroed: bool = True) -> int:
        """Allocate EP RAM, zeroed unless the caller fills all of it before anyone reads it
        (``zeroed=False`` saves a memset of the size, ~30 us per MiB); returns its EP
        address.  Raises MemoryError when no free range of ``size`` is ``align``-aligned."""
        align = max(align, PAGE)
        size = -(-size // PAGE) * PAGE
        for i, (off, length) in enumerate(self._free):
            start = (off + align - 1) // align * align
            if start + size <= off + length:
                pieces = [(off, start - off), (start + size, off + length - start - size)]
                self._free[i : i + 1] = [(o, n) for o, n in pieces if n]
                if zeroed:
                    zero_views(self.views(self.base + start, size))
                return self.base + start
        raise MemoryError(f"EP RAM exhausted: no {size:#x} bytes aligned to {align:#x}")

    def free(self, addr: int, size: int) -> None:
        off = addr - self.base
        size = -(-size // PAGE) * PAGE
        i = bisect.bisect(self._free, (off, size))
        self._free.insert(i, (off, size))
        merged: list[tuple[int, int]] = []
        for o, n in self._free:
            if merged and merged[-1][0] + merged[-1][1] == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        self._free = merged

    # -- translation ---------------------------------------------------------
    def phys(self, addr: int) -> int:
        """Offset in the memfd of EP address ``addr``."""
        off = addr - self.base
        page = off // PAGE
        return self._ep2phys.get(page, page) * PAGE + off % PAGE

    def _in_one_page(self, addr: int, size: int) -> int | None:
        """The memfd offset of [addr, addr+size) when it is EP RAM within one page."""
        off = addr - self.base
        if size <= 0 or off < 0 or off + size > self.size:
            return None
        return self.phys(addr) if off // PAGE == (off + size - 1) // PAGE else None

    def extents(self, addr: int, size: int) -> list[tuple[int, int, int]]:
        """[(ep address, memfd offset, length)] of physically contiguous pieces."""
        if not self.contains(addr, size):
            raise AddressError(f"[{addr:#x}, {addr + size:#x}) is not EP RAM")
        out: list[tuple[int, int, int]] = []
        end = addr + size
        # Runs of identity-mapped pages are one piece each: walk only the remapped pages
        # (a direct BAR's few), not every page of a 64 MiB transfer.
        first, last = (addr - self.base) // PAGE, (end - 1 - self.base) // PAGE
        cuts = sorted({c for page in self._ep2phys if first <= page <= last
                       for c in (page, page + 1)} | {last + 1})
        for cut in cuts:
            stop = min(end, self.base + cut * PAGE)
            if addr >= stop:
                continue
            phys = self.phys(addr)
            if out and out[-1][1] + out[-1][2] == phys:
                out[-1] = (out[-1][0], out[-1][1], out[-1][2] + stop - addr)
            else:
                out.append((addr, phys, stop - addr))
            addr = stop
        return out

    def view(self, addr: int, size: int) -> memoryview:
        """Zero-copy window; the range must be physically contiguous."""
        ext = self.extents(addr, size)
        if len(ext) > 1:
            raise AddressError(f"EP RAM [{addr:#x}, {addr + size:#x}) is remapped in pieces")
        _, phys, _ = ext[0] if ext else (addr, self.phys(addr), 0)
        return self.mem.view[phys : phys + size]

    def views(self, addr: int, size: int) -> list[memoryview]:
        """Zero-copy windows on [addr, addr+size), one per physically contiguous piece."""
        return [self.mem.view[p : p + n] for _, p, n in self.extents(addr, size)]

    def read(self, addr: int, size: int) -> bytes:
        if (phys := self._in_one_page(addr, size)) is not None:  # a register: one lookup
            return bytes(self.mem.view[phys : phys + size])
        return b"".join(bytes(self.mem.view[p : p + n]) for _, p, n in self.extents(addr, size))

    def write(self, addr: int, data: bytes | memoryview) -> None:
        if (phys := self._in_one_page(addr, len(data))) is not None:
            self.mem.view[phys : phys + len(data)] = data
            return
        pos = 0
        for _, p, n in self.extents(addr, len(data)):
            self.mem.view[p : p + n] = data[pos : pos + n]
            pos += n

    def place(self, addr: int, size: int, phys: int) -> None:
        """Move the pages of [addr, addr+size) (contents included) to memfd offset ``phys``.

        Whatever EP pages sat there are swapped out to the pages freed.
        """
        if (addr - self.base) % PAGE or size % PAGE or phys % PAGE:
            raise AddressError(f"remap of [{addr:#x}+{size:#x}) -> {phys:#x} is not "
                               "page-aligned")
        first = (addr - self.base) // PAGE
        for i in range(size // PAGE):
            self._swap(first + i, self._phys2ep.get(phys // PAGE + i, phys // PAGE + i))
        self._remapped()

    def evict(self, phys: int, size: int) -> None:
        """Make memfd [phys, phys+size) hold scratch pages; EP RAM there moves aside."""
        for page in range(phys // PAGE, (phys + size) // PAGE):
            owner = self._phys2ep.get(page, page)
            if owner < self.size // PAGE:
                self._swap(owner, self._free_scratch())
        self._remapped()

    def _remapped(self) -> None:
        for hook in self.on_remap:
            hook()

    def _free_scratch(self) -> int:
        """A scratch page still at its own place (not swapped into some BAR)."""
        first = self.size // PAGE
        for i in range(self.size // PAGE):
            page = first + (self._next_scratch - first + i) % (self.size // PAGE)
            if self._ep2phys.get(page, page) == page:
                self._next_scratch = page + 1
                return page
        raise MemoryError("no scratch page left")

    def _swap(self, a: int, b: int) -> None:
        pa, pb = self._ep2phys.get(a, a), self._ep2phys.get(b, b)
        if pa == pb:
            return
        va = bytes(self.mem.view[pa * PAGE : (pa + 1) * PAGE])
        self.mem.view[pa * PAGE : (pa + 1) * PAGE] = self.mem.view[pb * PAGE : (pb + 1) * PAGE]
        self.mem.view[pb * PAGE : (pb + 1) * PAGE] = va
        for page, p in ((a, pb), (b, pa)):
            if page == p:
                self._ep2phys.pop(page, None)
                self._phys2ep.pop(p, None)
            else:
                self._ep2phys[page] = p
                self._phys2ep[p] = page


class EpAddressSpace:
    """EP RAM + MMIO blocks + outbound apertures, addressed like the SoC's bus."""

    def __init__(self, ram: EpRam) -> None:
        self.ram = ram
        self.blocks: list[MmioBlock] = []
        self.apertures: list[tuple[int, int, Aperture]] = []
        self.watches: list[Watch] = []
        self.doorbells: list[Any] = []  # DoorbellTarget: a 4-byte register at .addr
        self.on_layout_change: list[Callable[[], None]] = []

    def add_block(self, block: MmioBlock) -> MmioBlock:
        self.blocks.append(block)
        return block

    def add_aperture(self, base: int, size: int, aperture: Aperture) -> None:
        self.apertures.append((base, size, aperture))

    def block_at(self, addr: int, size: int = 1) -> MmioBlock | None:
        for b in self.blocks:
            if b.base <= addr and addr + size <= b.base + b.size:
                return b
        return None

    def watch(self, addr: int, size: int, callback: WatchCallback) -> Watch:
        w = Watch(addr, addr + size, callback)
        self.watches.append(w)
        self.changed()
        return w

    def unwatch(self, w: Watch) -> None:
        self.watches.remove(w)
        self.changed()

    def add_doorbell(self, target: Any) -> None:
        self.doorbells.append(target)
        target.on_change = self.changed  # its data values are part of the window table
        self.changed()

    def doorbell_at(self, addr: int, size: int) -> Any:
        for d in self.doorbells:
            if d.addr == addr and size == 4:
                return d
        return None

    def changed(self) -> None:
        """Something the BAR windows are made of changed: every controller re-derives them."""
        for hook in self.on_layout_change:
            hook()

    # EP-side "CPU" accesses.  RC memory is only reachable through an aperture,
    # which may have to wait for the client (DMA messages): hence async.
    async def read(self, addr: int, size: int) -> bytes:
        if self.ram.contains(addr, size):
            return self.ram.read(addr, size)
        target = self.aperture_at(addr, size)
        if target:
            base, aperture = target
            return await aperture.read(addr - base, size)
        block = self.block_at(addr, size)
        if block:
            return block.handler.read(addr - block.base, size).to_bytes(size, "little")
        raise AddressError(f"EP read of [{addr:#x}, {addr + size:#x}) hits nothing")

    async def write(self, addr: int, data: bytes | memoryview) -> None:
        size = len(data)
        if self.ram.contains(addr, size):
            self.ram.write(addr, data)
            return
        target = self.aperture_at(addr, size)
        if target:
            base, aperture = target
            await aperture.write(addr - base, data)
            return
        block = self.block_at(addr, size)
        if block:
            block.handler.write(addr - block.base, size, int.from_bytes(data, "little"))
            return
        raise AddressError(f"EP write of [{addr:#x}, {addr + size:#x}) hits nothing")

    def views(self, addr: int, size: int) -> list[memoryview] | None:
        """Zero-copy windows on [addr, addr+size) when it is EP RAM or shared RC memory
        behind the aperture; None when it must go through read/write (registers, messages,
        an interrupt region); AddressError when it hits nothing."""
        if self.ram.contains(addr, size):
            return self.ram.views(addr, size)
        target = self.aperture_at(addr, size)
        if target:
            base, aperture = target
            return aperture.views(addr - base, size)
        if self.block_at(addr, size):
            return None
        raise AddressError(f"EP access to [{addr:#x}, {addr + size:#x}) hits nothing")

    async def copy(self, dst: int, src: int, size: int) -> None:
        """The EP CPU's memcpy (memcpy_fromio/memcpy_toio through the outbound aperture):
        view to view where both sides are memory, through bytes otherwise."""
        await move(self, dst, self, src, size)

    def aperture_bounds(self) -> list[tuple[int, int]]:
        return [(base, base + size) for base, size, _ in self.apertures]

    def aperture_at(self, addr: int, size: int) -> tuple[int, Aperture] | None:
        for base, length, aperture in self.apertures:
            if base <= addr and addr + size <= base + length:
                return base, aperture
        return None


class WatchedRam:
    """A trapped window onto watched EP RAM: plain memory, then the watch callbacks.

    Offsets are memfd offsets; ``ep_delta`` turns them back into EP addresses.
    """

    read_in_io_thread = True  # a read is a load from EP RAM (pages move under the I/O lock)

    def __init__(self, ram: EpRam, watches: list[Watch], ep_delta: int) -> None:
        self.ram = ram
        self.watches = watches
        self.ep_delta = ep_delta

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.ram.mem.view[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.ram.mem.view[offset : offset + size] = value.to_bytes(size, "little")
        addr = offset + self.ep_delta
        for w in self.watches:
            if w.start < addr + size and addr < w.end:
                w.callback(addr, size)


class ApertureWindow:
    """A BAR window translating onto an outbound aperture (a MemoryHandler): another
    controller's inbound access, or an EP guest's CPU access, leaving the SoC through this
    one's outbound iATU.  One the link cannot carry (no RC attached, nothing mapped there)
    ends as on PCIe: a read returns all ones, a write is dropped, and the reason is logged
    once while it repeats (not for each of a memcpy_toio's accesses)."""

    def __init__(self, aperture: Aperture, base_offset: int) -> None:
        self.aperture = aperture
        self.base_offset = base_offset
        self._refused = Repeats(log)

    def read_bytes(self, offset: int, size: int) -> bytes:
        try:
            data = self.aperture.read_sync(self.base_offset + offset, size)
        except AddressError as e:
            self._refused.warning("aperture access at %#x: %s: reads return all ones",
                                  self.base_offset, e, key="read")
            return b"\xff" * size
        self._refused.clear()
        return data

    def write_bytes(self, offset: int, data: bytes) -> None:
        try:
            self.aperture.write_sync(self.base_offset + offset, data)
        except AddressError as e:
            self._refused.warning("aperture access at %#x: %s: writes are dropped",
                                  self.base_offset, e, key="write")
            return
        self._refused.clear()
