"""BARs: their description, and the window table that routes accesses inside them.

A BAR is a list of windows.  A RAM window is backed by shared memory (a
memfd) and, when page-aligned, exported to QEMU as a sparse-mmap area so the
guest reaches it at memory speed.  An MMIO window traps: every access becomes
a call on its handler.  The table is plain data (bar, start, end, kind,
target, target offset) so that the C fast path walks the very same rows.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import mmap
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol, cast, runtime_checkable

from vfio_ep.memory import ForeignMemory, SharedMemory

log = logging.getLogger(__name__)

PCI_BASE_ADDRESS_SPACE_IO = 0x1
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x4
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x8
NUM_BARS = 6
# What a RAM window's target is (a tuple: isinstance against it costs half a union's, on
# every trapped access).
_MEMORY = (SharedMemory, ForeignMemory)


@dataclass(frozen=True)
class BarSpec:
    """One BAR as configured: size is a power of two (0 = absent)."""

    index: int
    size: int
    is_64bit: bool = False
    prefetch: bool = False
    is_io: bool = False

    def __post_init__(self) -> None:
        if self.size and self.size & (self.size - 1):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a power of two")
        if self.is_64bit and self.index == NUM_BARS - 1:
            raise ValueError("BAR5 cannot be 64-bit: it has no upper half")
        if self.is_io and (self.is_64bit or self.prefetch):
            raise ValueError(f"BAR{self.index}: an I/O BAR is neither 64-bit nor prefetchable")
        if self.is_io and self.size > 256:
            raise ValueError(f"BAR{self.index}: I/O BARs are at most 256 bytes")
        if self.size and not self.is_io and self.size < 16:
            raise ValueError(f"BAR{self.index}: memory BARs are at least 16 bytes")

    def type_bits(self) -> int:
        if self.is_io:
            return PCI_BASE_ADDRESS_SPACE_IO
        return ((PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64bit else 0)
                | (PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetch else 0))

    def address_mask(self) -> int:
        """Writable bits of the (64-bit view of the) BAR register: its address bits."""
        if not self.size:
            return 0
        low = 0x3 if self.is_io else 0xF
        width = 64 if self.is_64bit else 32
        return ~(self.size - 1) & ~low & ((1 << width) - 1)


class MmioHandler(Protocol):
    """A trapped register block; offsets are relative to the block.

    A handler whose ``read`` is a plain function of its state (no side effect, nothing
    half-updated between two statements of the event loop's tasks) may say so with a class
    attribute ``read_in_io_thread = True``: the connection's C I/O thread then answers the
    guest's reads by calling it, under the GIL, without waking the event loop
    (vfio_ep/vfio_user/fastpath.py)."""

    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


@runtime_checkable
class MemoryHandler(Protocol):
    """A trapped window that is memory, not registers (another bus's memory behind a bridge):
    accesses of any size and alignment."""

    def read_bytes(self, offset: int, size: int) -> bytes: ...

    def write_bytes(self, offset: int, data: bytes) -> None: ...


class FastDoorbell(MmioHandler, Protocol):
    """A doorbell register the C fast path rings itself (native/vfu_fast.h, struct
    vfu_window): a write of ``data`` at ``offset`` in the window sets the flag at
    ``pending_ptr()`` and signals ``efd``; any other write goes to Python as an MMIO write."""

    efd: int
    offset: int

    @property
    def data(self) -> int: ...

    def pending_ptr(self) -> int: ...


class WindowKind(enum.IntEnum):
    """Values shared with native/vfu_fast.h."""

    RAM = 0
    MMIO = 1
    DOORBELL = 2


@dataclass(frozen=True)
class Window:
    bar: int
    start: int
    end: int
    kind: WindowKind
    target: SharedMemory | ForeignMemory | MmioHandler | MemoryHandler  # DOORBELL: FastDoorbell
    target_offset: int = 0  # offset in the memfd (RAM) or in the handler's space (MMIO)
    mmap: bool = False  # its owner allows exporting it (the translation will not change)
    # MMIO whose target is memory (a MemoryHandler): decided once, as an isinstance against
    # a runtime-checkable Protocol costs more (~15 us) than the access it would route.
    memory: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "memory", isinstance(self.target, MemoryHandler))

    def mappable(self) -> bool:
        """Exportable, page-aligned RAM: QEMU mmaps it and guest accesses bypass the socket."""
        page = mmap.PAGESIZE - 1
        return (self.mmap and self.kind is WindowKind.RAM and not (self.start & page)
                and not (self.end & page) and not (self.target_offset & page))


class BarAccessError(Exception):
    """An access the BAR layout cannot serve (no window, straddling, odd size)."""


class WindowTable:
    """The dispatch table: windows of all BARs, non-overlapping within a BAR."""

    def __init__(self) -> None:
        self.windows: list[Window] = []
        # Called after every change: copies (the C fast path's) re-sync before anything the
        # old rows point at can go away.
        self.listeners: list[Callable[[], None]] = []
        # Entered by :meth:`changing`: each holds a copy's reader still (the C I/O thread).
        self.guards: list[Callable[[], AbstractContextManager[None]]] = []

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Around moving memory the rows point into (EP RAM pages placed into a directly
        mapped BAR) and the new rows: no reader of a copy serves from the old ones meanwhile
        (a write served in between would land in the page being moved away)."""
        with contextlib.ExitStack() as stack:
            for guard in self.guards:
                stack.enter_context(guard())
            yield

    def add(self, window: Window) -> Window:
        self._insert(window)
        self._changed()
        return window

    def replace_bar(self, bar: int, rows: list[Window]) -> None:
        """All of ``bar``'s rows at once (one change for the listeners)."""
        old = self.windows
        self.windows = [w for w in self.windows if w.bar != bar]
        try:
            for w in rows:
                self._insert(w)
        except ValueError:
            self.windows = old
            raise
        self._changed()

    def _insert(self, window: Window) -> None:
        for w in self.windows:
            if w.bar == window.bar and w.start < window.end and window.start < w.end:
                raise ValueError(f"BAR{window.bar} window [{window.start:#x}, {window.end:#x}) "
                                 f"overlaps [{w.start:#x}, {w.end:#x})")
        self.windows.append(window)
        self.windows.sort(key=lambda w: (w.bar, w.start))

    def _changed(self) -> None:
        for listener in self.listeners:
            listener()

    def of_bar(self, bar: int) -> list[Window]:
        return [w for w in self.windows if w.bar == bar]

    def find(self, bar: int, offset: int, size: int) -> Window:
        for w in self.windows:
            if w.bar == bar and w.start <= offset and offset + size <= w.end:
                return w
        raise BarAccessError(f"BAR{bar} [{offset:#x}, {offset + size:#x}) hits no window")

    def read(self, bar: int, offset: int, size: int) -> bytes:
        w = self.find(bar, offset, size)
        rel = offset - w.start + w.target_offset
        if isinstance(w.target, _MEMORY):
            return w.target.read(rel, size)
        if w.memory:
            return cast(MemoryHandler, w.target).read_bytes(rel, size)
        _check_mmio_size(bar, offset, size)
        return cast(MmioHandler, w.target).read(rel, size).to_bytes(size, "little")

    def write(self, bar: int, offset: int, data: bytes) -> None:
        w = self.find(bar, offset, len(data))
        rel = offset - w.start + w.target_offset
        if isinstance(w.target, _MEMORY):
            w.target.write(rel, data)
            return
        if w.memory:
            cast(MemoryHandler, w.target).write_bytes(rel, data)
            return
        _check_mmio_size(bar, offset, len(data))
        cast(MmioHandler, w.target).write(rel, len(data), int.from_bytes(data, "little"))


def _check_mmio_size(bar: int, offset: int, size: int) -> None:
    if size not in (1, 2, 4, 8) or offset % size:
        raise BarAccessError(f"BAR{bar} register access of {size} bytes at {offset:#x} "
                             "is not a naturally aligned 1/2/4/8-byte access")
