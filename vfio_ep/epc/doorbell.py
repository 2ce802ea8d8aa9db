"""Doorbell targets: an EP address where one 32-bit RC write becomes an EP interrupt.

A :class:`DoorbellTarget` sits on a register of an MMIO block (the MSI
controller's translator, the eDMA's interrupt-emulation register).  The
inbound iATU gives it its own 4-byte window of kind DOORBELL, which the C
fast path serves without the interpreter: a write of a known value marks the
doorbell pending and signals its eventfd; the EP interrupt layer, waiting on
that eventfd, runs the virq's handlers.  The Python path does exactly the
same.  Writes with any other value or width are ignored, counted and logged.

:class:`PollDoorbell` is the backend without hardware: a word in EP RAM checked
every ``interval`` seconds, only while it is allocated (:class:`PolledWords`: by a C thread
that signals an eventfd while the word is set, native/vfu_poll.c, or on the Python path by a
task).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import logging
import os
import weakref
from collections.abc import Callable
from typing import Any

import trio

from vfio_ep.epc.address_space import PAGE, EpRam
from vfio_ep.epc.irq import IrqDomain, Spawn
from vfio_ep.native import native
from vfio_ep.pci.bar import FastDoorbell, MmioHandler

log = logging.getLogger(__name__)

DOORBELL_SIZE = 4


class DoorbellTarget(FastDoorbell):
    """One doorbell register (data value -> virq), which the C fast path rings itself."""

    def __init__(self, name: str, addr: int, irqs: IrqDomain, spawn: Spawn,
                 underlying: MmioHandler | None = None, underlying_offset: int = 0) -> None:
        self.name = name
        self.addr = addr
        self.irqs = irqs
        self.spawn = spawn
        self._running = False
        self.events: dict[int, int] = {}  # data -> virq
        self.underlying = underlying
        self.underlying_offset = underlying_offset
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        weakref.finalize(self, os.close, self.efd)  # lives as long as the target
        self._pending = ctypes.c_uint32(0)  # set by C: the first event was rung
        c = native()  # looked up once: _take_pending runs on every ring
        self._take_c = (None if c is None else
                        (c[1].vfu_take_pending, c[0].cast("uint32_t *", self.pending_ptr())))
        self._rung_values: set[int] = set()  # rung through Python
        self.rung = 0
        self.ignored = 0
        self._scope = trio.CancelScope()
        # Set by the address space: the window table (and the C copy of it) must see events.
        self.on_change: Callable[[], None] = lambda: None

    # Fields the C fast path reads (native/vfu_fast.h: struct vfu_window).
    offset = 0

    def add_event(self, data: int, virq: int) -> None:
        """Make a write of ``data`` raise ``virq``; the eventfd waiter starts with the first."""
        self.events[data] = virq
        self.on_change()
        if not self._running:
            self._running = True
            self.spawn(self._run, f"doorbell-{self.name}")

    def remove_event(self, data: int) -> None:
        self.events.pop(data, None)
        self.on_change()

    @property
    def data(self) -> int:
        """The value C may ring on its own (the first event); others go to Python."""
        return next(iter(self.events), 0xFFFFFFFF)

    def pending_ptr(self) -> int:
        return ctypes.addressof(self._pending)

    def _take_pending(self) -> bool:
        """Whether C rang since the last look (and clear that): atomically, as the
        connection's I/O thread sets the flag from its own thread."""
        if self._take_c is None:  # no C side: nobody else sets it
            was, self._pending.value = self._pending.value, 0
            return bool(was)
        take, flag = self._take_c
        return bool(take(flag))

    def read(self, offset: int, size: int) -> int:
        if self.underlying is None:
            return 0
        return self.underlying.read(self.underlying_offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        if offset or size != DOORBELL_SIZE or value not in self.events:
            self.ignored += 1
            log.warning("doorbell %s: ignored write of %#x (%d bytes at +%#x): not a doorbell "
                        "value", self.name, value, size, offset)
            return
        self._ring(value)

    def _ring(self, value: int) -> None:
        self._rung_values.add(value)
        os.eventfd_write(self.efd, 1)

    async def _run(self) -> None:
        with self._scope:
            while True:
                await trio.lowlevel.wait_readable(self.efd)
                try:
                    os.eventfd_read(self.efd)
                except BlockingIOError:
                    continue
                fired, self._rung_values = self._rung_values, set()
                if self._take_pending():
                    fired.add(self.data)
                for value in fired:
                    self.rung += 1
                    virq = self.events.get(value)
                    if virq is not None:
                        self.irqs.handle_now(virq)

class PolledWords:
    """``count`` consecutive 32-bit words of EP RAM (in one page) that the RC sets to ring,
    looked at every ``interval`` seconds until :meth:`close`: by a C thread that signals an
    eventfd while any is non-zero (native/vfu_poll.c), so that an idle polled doorbell never
    wakes the interpreter; on the Python path, by the event loop every period.  The core's
    poll doorbell (one word) and pci-epf-vntb's polled doorbell BAR (a word per slot)."""

    def __init__(self, ram: EpRam, addr: int, count: int, interval: float) -> None:
        if (addr - ram.base) // PAGE != (addr + 4 * count - 1 - ram.base) // PAGE:
            raise ValueError(f"polled words [{addr:#x}, +{4 * count:#x}) cross a page: "
                             "EP RAM pages move one by one")
        self.ram = ram
        self.addr = addr
        self.count = count
        self.interval = interval
        self._native = native()
        self._poller = _CPoller.start(self, *self._native) if self._native else None

    def host_address(self) -> int:
        """Host address of the first word, where it is now (pages can move)."""
        return self.ram.mem.address + self.ram.phys(self.addr)

    async def wait(self) -> None:
        """Until a word may be set: the C poller's eventfd, or one period."""
        if self._poller is None:
            await trio.sleep(self.interval)
            return
        await trio.lowlevel.wait_readable(self._poller.efd)
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._poller.efd)

    def take(self, i: int) -> int:
        """Word ``i``'s value, cleared (0: not rung).  With the extension, in one atomic
        exchange: a ring landing between the read and the clear is not lost."""
        if self._native is None:
            addr = self.addr + 4 * i
            value = int.from_bytes(self.ram.read(addr, 4), "little")
            if value:
                self.ram.write(addr, bytes(4))
            return value
        ffi, lib = self._native
        return int(lib.vfu_take_pending(ffi.cast("uint32_t *", self.host_address() + 4 * i)))

    def close(self) -> None:
        """Stop looking (the C thread joined): the words may go."""
        if self._poller is not None:
            self._poller.stop()
            self._poller = None


class PollDoorbell:
    """A doorbell word in EP RAM, polled while allocated: the core's fallback backend."""

    def __init__(self, ram: EpRam, irqs: IrqDomain, spawn: Spawn, data: int,
                 interval: float) -> None:
        self.ram = ram
        self.irqs = irqs
        self.data = data
        self.addr = ram.alloc(DOORBELL_SIZE)
        self.virq = irqs.alloc("poll-doorbell")
        self.rung = 0
        self.ignored = 0
        self._scope = trio.CancelScope()
        self.words = PolledWords(ram, self.addr, 1, interval)
        spawn(self._run, "poll-doorbell")

    async def _run(self) -> None:
        with self._scope:
            while True:
                await self.words.wait()
                value = self.words.take(0)
                if not value:
                    continue
                if value != self.data:
                    self.ignored += 1
                    log.warning("poll doorbell: ignored value %#x (expects %#x)", value,
                                self.data)
                    continue
                self.rung += 1
                self.irqs.handle_now(self.virq)

    def close(self) -> None:
        self._scope.cancel()
        self.words.close()
        self.irqs.dispose(self.virq)
        self.ram.free(self.addr, DOORBELL_SIZE)


class _CPoller:
    """The C thread polling PolledWords (native/vfu_poll.h): their address is followed
    across EP RAM remaps, and the thread is joined before the words go away (on close, or
    at interpreter exit, before EP RAM is unmapped)."""

    def __init__(self, words: PolledWords, ffi: Any, lib: Any) -> None:
        self._ffi = ffi
        self._lib = lib
        self.words = words
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.p = ffi.new("struct vfu_poller *")
        self.p.interval_ns = max(1, round(words.interval * 1e9))
        self.p.count = words.count
        self.p.efd = self.efd
        self._point()

    @classmethod
    def start(cls, words: PolledWords, ffi: Any, lib: Any) -> _CPoller:
        poller = cls(words, ffi, lib)
        err = poller._lib.vfu_poller_start(poller.p)
        if err:
            os.close(poller.efd)
            raise OSError(err, f"poll doorbell thread: {os.strerror(err)}")
        words.ram.on_remap.append(poller._point)
        atexit.register(poller.stop)
        return poller

    def _point(self) -> None:
        self.p.word = self._ffi.cast("uint32_t *", self.words.host_address())

    def stop(self) -> None:
        """Join the thread (idempotent), then let the words and the eventfd go."""
        if self.efd < 0:
            return
        self._lib.vfu_poller_stop(self.p)
        atexit.unregister(self.stop)
        self.words.ram.on_remap.remove(self._point)
        with contextlib.suppress(RuntimeError):  # at exit, no event loop waits on it
            trio.lowlevel.notify_closing(self.efd)
        os.close(self.efd)
        self.efd = -1
