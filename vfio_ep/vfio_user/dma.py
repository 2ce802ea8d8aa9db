"""Guest memory as the device sees it: the DMA table of one connection.

QEMU maps guest RAM sections with DMA_MAP.  Sections backed by a shared fd
(memory-backend-memfd, share=on) are mmapped here and accessed directly;
sections without an fd are reached with DMA_READ/DMA_WRITE messages through
the connection.  Every device model goes through this table, which checks
bounds: an address outside every mapping is a :class:`DmaError`, never a
crash.
"""

from __future__ import annotations

import bisect
import fcntl
import logging
import mmap
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from vfio_ep.pci.host import RcBusError, RcMemory

log = logging.getLogger(__name__)


class DmaError(RcBusError):
    """An access to guest memory that no mapping covers."""


@dataclass(eq=False)
class DmaRegion:
    iova: int
    size: int
    prot: int
    view: memoryview | None  # None: reachable only through DMA messages
    file: tuple[int, int] | None  # the backing fd's (st_dev, st_ino)

    @property
    def end(self) -> int:
        return self.iova + self.size


MessageRead = Callable[[int, int], Awaitable[bytes]]
MessageWrite = Callable[[int, bytes], Awaitable[None]]


class DmaTable(RcMemory):
    """Sorted, non-overlapping iova ranges with a bounds-checked read/write API: the RC's
    memory as the device model reaches it."""

    def __init__(self) -> None:
        self._regions: list[DmaRegion] = []
        self._starts: list[int] = []
        # QEMU sends a dup of the same memfd with every section: map each file once.
        self._files: dict[tuple[int, int], mmap.mmap] = {}
        # Installed by the connection: message-based access for fd-less ranges.
        self.message_read: MessageRead | None = None
        self.message_write: MessageWrite | None = None
        # Run after every map/unmap: whoever holds views (a bridge's windows) re-derives them.
        self.on_change: list[Callable[[], None]] = []

    def __len__(self) -> int:
        return len(self._regions)

    def map(self, iova: int, size: int, prot: int, fd: int | None, offset: int) -> None:
        """Add a mapping; an overlap replaces the old range (QEMU aborts on failed maps).

        Memory behind an fd is accessed directly only when the client cannot shrink it
        under us (a truncated mapping is a SIGBUS in the server): the fd is sealed against
        shrinking (QEMU's memfd already is), else its range is reached with DMA messages.
        """
        if size == 0:
            return
        if iova + size > 1 << 64:
            raise DmaError(f"DMA_MAP [{iova:#x}+{size:#x}) wraps past 2^64")
        self.unmap(iova, size)
        view = None
        ident = None
        if fd is not None:
            st = os.fstat(fd)
            if offset + size > st.st_size:
                raise DmaError(f"DMA_MAP [{offset:#x}+{size:#x}) beyond its fd ({st.st_size:#x})")
            if not _sealed_against_shrinking(fd):
                log.warning("DMA_MAP [%#x, %#x): its fd can be shrunk by the client and cannot "
                            "be sealed; reaching it with DMA messages", iova, iova + size)
                fd = None
        if fd is not None:
            ident = (st.st_dev, st.st_ino)
            if ident not in self._files:
                self._files[ident] = mmap.mmap(fd, st.st_size, flags=mmap.MAP_SHARED,
                                               prot=mmap.PROT_READ | mmap.PROT_WRITE)
            view = memoryview(self._files[ident])[offset : offset + size]
        region = DmaRegion(iova, size, prot, view, ident)
        i = bisect.bisect_left(self._starts, iova)
        self._regions.insert(i, region)
        self._starts.insert(i, iova)
        self._changed()

    def unmap(self, iova: int, size: int) -> int:
        """Drop every mapping overlapping [iova, iova+size); return how many went."""
        end = iova + size
        keep = [r for r in self._regions if r.end <= iova or r.iova >= end]
        gone = [r for r in self._regions if not (r.end <= iova or r.iova >= end)]
        for r in gone:
            if r.iova < iova or r.end > end:
                log.warning("DMA_UNMAP [%#x, %#x) cuts mapping [%#x, %#x): dropping it whole",
                            iova, end, r.iova, r.end)
            if r.view is not None:
                r.view.release()
        self._regions = keep
        self._starts = [r.iova for r in keep]
        if gone:
            self._changed()
        self._close_unused_files()
        return len(gone)

    def _changed(self) -> None:
        for hook in self.on_change:
            hook()

    def clear(self) -> None:
        self.unmap(0, 1 << 64)

    def _close_unused_files(self) -> None:
        used = {r.file for r in self._regions}
        for ident in [i for i in self._files if i not in used]:
            try:
                self._files.pop(ident).close()
            except BufferError:
                # A DMA in flight still holds a view; the mapping goes when it does.
                log.debug("guest memory file %s still exported; unmap deferred", ident)

    def _find(self, iova: int, size: int) -> DmaRegion:
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            r = self._regions[i]
            if iova + size <= r.end:
                return r
        raise DmaError(f"guest address range [{iova:#x}, {iova + size:#x}) is not mapped")

    def _chunks(self, iova: int, size: int) -> list[tuple[DmaRegion, int, int]]:
        """Split an access into (region, offset in region, length) pieces, or raise."""
        pieces = []
        while size:
            r = self._find(iova, 1)
            n = min(size, r.end - iova)
            pieces.append((r, iova - r.iova, n))
            iova += n
            size -= n
        return pieces

    def view(self, iova: int, size: int) -> memoryview:
        """Zero-copy window on guest memory; the range must lie in one fd-backed mapping."""
        r = self._find(iova, size)
        if r.view is None:
            raise DmaError(f"guest range [{iova:#x}, {iova + size:#x}) has no shared fd")
        off = iova - r.iova
        return r.view[off : off + size]

    def views(self, iova: int, size: int) -> list[memoryview] | None:
        if size < 0:
            raise DmaError(f"negative DMA size {size}")
        views = []
        for r, off, n in self._chunks(iova, size):
            if r.view is None:
                return None
            views.append(r.view[off : off + n])
        return views

    async def read(self, iova: int, size: int) -> bytes:
        if size < 0:
            raise DmaError(f"negative DMA size {size}")
        out = bytearray()
        for r, off, n in self._chunks(iova, size):
            if r.view is not None:
                out += r.view[off : off + n]
            else:
                out += await self._message_read(r.iova + off, n)
        return bytes(out)

    async def write(self, iova: int, data: bytes | memoryview) -> None:
        pos = 0
        for r, off, n in self._chunks(iova, len(data)):
            if r.view is not None:
                r.view[off : off + n] = data[pos : pos + n]
            else:
                await self._message_write(r.iova + off, bytes(data[pos : pos + n]))
            pos += n

    async def _message_read(self, iova: int, size: int) -> bytes:
        if self.message_read is None:
            raise DmaError(f"no client to serve DMA_READ at {iova:#x}")
        return await self.message_read(iova, size)

    async def _message_write(self, iova: int, data: bytes) -> None:
        if self.message_write is None:
            raise DmaError(f"no client to serve DMA_WRITE at {iova:#x}")
        await self.message_write(iova, data)


def _sealed_against_shrinking(fd: int) -> bool:
    """Whether ``fd``'s file cannot shrink: F_SEAL_SHRINK is on, or we could add it."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd (a regular or hugetlbfs file): no seals at all
        return False
    if seals & fcntl.F_SEAL_SHRINK:
        return True
    if seals & fcntl.F_SEAL_SEAL:  # made without MFD_ALLOW_SEALING, or sealed shut
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    except OSError:
        return False
    return True
