"""The C fast path (``native/``): a C thread reads the socket and serves hot messages itself.

Each connection gets an I/O thread (native/vfu_io.c) that blocks on the socket without the
interpreter, applies RAM-window reads and writes and doorbell rings from a C copy of the
device's window table, and hands the first message that needs Python over whole (an eventfd
wakes the trio loop), then waits until Python has handled it, so the stream's order is kept.
The copy is re-made the moment the table changes, under the thread's lock, and Python's own
messages (replies, DMA requests) go out through the same lock.  After VERSION, a BAR write
Python applies (a watched register) is acknowledged by the thread first, as PCIe posts a
memory write, and queued: the thread reads on, queueing further such writes (a guest's
sustained register writes do not wait for Python one by one), and serves or hands over
anything else only behind them, once Python has applied them in order.  Without the extension
(no compiler at install time) or with ``VFIO_EP_FASTPATH=0``, the server reads every message
in Python (and never imports this module, which needs the extension).

A register read in an MMIO window whose handler says its reads are safe anywhere
(``read_in_io_thread``: a plain function of its state, no side effect) is answered by the I/O
thread itself, calling the handler under the GIL (:func:`vfu_py_read_reg`): no hand-over,
no wake-up of the event loop, and the stream's order kept (the thread calls it where it
would have handed the read over).

The C headers are the contract's one source: the result codes are the extension's, and at
import the Python side of the wire (protocol.py's sizes, flags and commands, the window kinds)
is checked against them, so a stale extension or a one-sided edit fails at once.  Python
writes no field of ``struct vfu_io`` itself: it calls C, which takes the thread's lock (or
checks the thread is parked).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
from collections.abc import Iterator
from typing import Any, cast

import trio

from vfio_ep._native import ffi, lib
from vfio_ep.memory import ForeignMemory, SharedMemory
from vfio_ep.pci.bar import FastDoorbell, MmioHandler, WindowKind, WindowTable
from vfio_ep.vfio_user import protocol as p

log = logging.getLogger(__name__)

_U32 = 0xFFFFFFFF  # the queue's counters are uint32_t, counting up and wrapping
# struct vfu_posted, field by field: the queue is copied out in one piece and unpacked by
# struct, ~4x cheaper a write (0.7 -> 0.2 us) than reading each entry's fields through cffi.
# The fields' offsets and the size are checked against C's below.
_POSTED_FIELDS = (("offset", "Q"), ("region", "I"), ("count", "I"), ("data", "8s"),
                  ("msg_id", "H"))
_POSTED = struct.Struct("<" + "".join(code for _, code in _POSTED_FIELDS) + "6x")
SEND_RETRY = 0.001  # seconds between tries while the thread's own reply waits for room


def contract_mismatches() -> list[str]:
    """Where the Python side of the wire and of the window table disagrees with native/'s
    headers as the extension was built from them; empty when they agree."""
    commands = ffi.typeof("enum vfu_command").relements
    pairs: dict[str, tuple[object, object]] = {
        "HEADER_SIZE": (p.HEADER_SIZE, lib.VFU_HDR_SIZE),
        "Header": (p.Header.sizeof(), ffi.sizeof("struct vfu_hdr")),
        "REGION_ACCESS_SIZE": (p.REGION_ACCESS_SIZE, ffi.sizeof("struct vfu_access")),
        "WriteMultiEntry": (p.WriteMultiEntry.sizeof(), ffi.sizeof("struct vfu_multi_entry")),
        "WRITE_MULTI_MAX": (p.WRITE_MULTI_MAX, lib.VFU_WRITE_MULTI_MAX),
        "MAX_MSG_FDS": (p.MAX_MSG_FDS, lib.VFU_MAX_FDS),
        "MAX_MESSAGE_SIZE": (p.MAX_MESSAGE_SIZE, lib.VFU_MAX_MSG),
        **{name: (getattr(p, name), getattr(lib, f"VFU_{name}"))
           for name in ("FLAG_TYPE_MASK", "FLAG_REPLY", "FLAG_NO_REPLY", "FLAG_ERROR")},
        **{f"Command.{c.removeprefix('VFU_CMD_')}":
           (p.Command.__members__.get(c.removeprefix("VFU_CMD_")), value)
           for c, value in commands.items()},
        **{f"WindowKind.{k.name}": (int(k), getattr(lib, f"VFU_WINDOW_{k.name}"))
           for k in WindowKind},
        "vfu_posted": (_POSTED.size, ffi.sizeof("struct vfu_posted")),
        **{f"vfu_posted.{name}": (struct.calcsize("<" + "".join(c for _, c in _POSTED_FIELDS[:i])),
                                  ffi.offsetof("struct vfu_posted", name))
           for i, (name, _) in enumerate(_POSTED_FIELDS)},
    }
    return [f"{name}: Python {py}, C {c}" for name, (py, c) in pairs.items() if py != c]


if _mismatches := contract_mismatches():
    raise ImportError("the C extension and the Python side of the wire disagree (a stale "
                      "build? make install): " + "; ".join(_mismatches))


def _read_reg_failed(exc_type: type[BaseException], value: BaseException, tb: Any) -> None:
    """A handler's read raised in the I/O thread: the read goes to Python after all, which
    answers or refuses it as it would any other (and logs why)."""


def vfu_py_read_reg(handle: Any, offset: int, count: int, value: Any) -> int:
    """struct vfu_fast.read_reg: called by the connection's I/O thread (holding its lock) for
    a register read of a window whose handler allows it; its value in ``*value``."""
    read, base = ffi.from_handle(handle)
    value[0] = read(base + offset, count)
    return 0


ffi.def_extern(error=-1, onerror=_read_reg_failed)(vfu_py_read_reg)


class FastPath:
    """One connection's C I/O thread: :meth:`start` it, :meth:`stop` it before the socket
    and anything its windows point at go away."""

    # What handed() reports: C's result codes (vfu_fast.h, vfu_io.h), not copies of them.
    # MESSAGE and OVERSIZED leave a message to take(); POSTED, writes queued to apply first.
    MESSAGE: int = lib.VFU_MESSAGE
    EOF: int = lib.VFU_EOF
    BROKEN: int = lib.VFU_BROKEN
    OVERSIZED: int = lib.VFU_OVERSIZED
    POSTED: int = lib.VFU_POSTED

    def __init__(self, sock_fd: int, windows: WindowTable) -> None:
        self.io = ffi.new("struct vfu_io *")
        self._buf = ffi.new("uint8_t[]", lib.VFU_MAX_MSG)
        self._out = ffi.new("uint8_t[]", lib.VFU_MAX_MSG)
        self.notify_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        lib.vfu_io_init(self.io, sock_fd, self._buf, self._out, self.notify_fd,
                        os.eventfd(0, os.EFD_CLOEXEC), lib.vfu_py_read_reg)
        self.windows = windows
        self._keep: list[Any] = []
        self._recheck = False  # queued writes were applied: look again without a signal

    @property
    def _running(self) -> bool:
        return bool(self.io.running)

    def start(self) -> None:
        table, n, handles = self._table()
        err = lib.vfu_io_start(self.io, table, n)
        if err:
            raise OSError(err, f"cannot start the connection's I/O thread: {os.strerror(err)}")
        self._keep = [table, handles]
        self.windows.listeners.append(self._sync)
        self.windows.guards.append(self._still)

    def stop(self) -> None:
        """Join the thread, then release what a half-read message left (fds) and the
        eventfds."""
        if self._running:
            lib.vfu_io_stop(self.io)
            self.windows.listeners.remove(self._sync)
            self.windows.guards.remove(self._still)
        lib.vfu_io_close(self.io)

    @contextlib.contextmanager
    def _still(self) -> Iterator[None]:
        """The thread held between two messages while the table's memory moves."""
        lib.vfu_io_lock(self.io)
        try:
            yield
        finally:
            lib.vfu_io_unlock(self.io)

    def _sync(self) -> None:
        """Swap a new copy of the window table in under the thread's lock: from its next
        message on, C serves from it (and the old copy is unused)."""
        table, n, handles = self._table()
        lib.vfu_io_set_windows(self.io, table, n)
        self._keep = [table, handles]

    def _table(self) -> tuple[Any, int, list[Any]]:
        """The window table as C rows (RAM rows carry their host address, MMIO rows whose
        reads the thread may answer a handle to the handler's read), and those handles, to
        keep while C may use them."""
        rows = self.windows.windows
        table = ffi.new("struct vfu_window[]", max(len(rows), 1))
        handles = []
        for i, w in enumerate(rows):
            c = table[i]
            c.bar, c.start, c.end = w.bar, w.start, w.end
            if w.kind is WindowKind.RAM and isinstance(w.target,
                                                         SharedMemory | ForeignMemory):
                c.kind = lib.VFU_WINDOW_RAM
                c.ram = ffi.cast("uint8_t *", w.target.address + w.target_offset)
            elif w.kind is WindowKind.DOORBELL:
                db = cast(FastDoorbell, w.target)
                c.kind = lib.VFU_WINDOW_DOORBELL
                c.efd, c.db_offset, c.db_data = db.efd, db.offset, db.data
                c.db_pending = ffi.cast("uint32_t *", db.pending_ptr())
            else:
                c.kind = lib.VFU_WINDOW_MMIO
                if not w.memory and getattr(w.target, "read_in_io_thread", False):
                    handles.append(ffi.new_handle((cast(MmioHandler, w.target).read,
                                                   w.target_offset)))
                    c.read_handle = handles[-1]
        return table, len(rows), handles

    def handed(self) -> int | None:
        """The result the thread handed over (MESSAGE, OVERSIZED, EOF, ...), or None while
        it is still reading; POSTED while queued writes wait (:meth:`posted`).  The thread
        signals only after it has handed over, or queued a write into an empty queue, so
        without a signal there is nothing to look at (and the loop never waits for its
        lock); after :meth:`posted_done` it looks again regardless: the writes queued behind
        those applied came without a signal."""
        if self._recheck:
            self._recheck = False
        else:
            try:
                os.eventfd_read(self.notify_fd)
            except BlockingIOError:
                return None
        r = lib.vfu_io_handed(self.io)
        return None if r < 0 else int(r)

    def allow_early_ack(self) -> None:
        """From now on (the client negotiated), BAR writes Python applies are acknowledged
        by the thread first, as PCIe posts memory writes."""
        lib.vfu_io_allow_early_ack(self.io)

    def resume(self) -> None:
        """Python is done with the handed-over message: the thread reads on."""
        lib.vfu_io_resume(self.io)

    def posted(self) -> list[tuple[int, int, bytes, int]]:
        """The queued BAR writes, oldest first: (region, offset, data, msg_id) each, already
        acknowledged (or posted by the client).  C checked each is a naturally aligned 1-8
        byte access inside a window; they stay queued until :meth:`posted_done`.  Copied
        with the thread held still; after :meth:`stop` (no thread, no lock), what it left
        queued, to apply before the device goes."""
        with self._still() if self._running else contextlib.nullcontext():
            f = self.io.f
            ring = ffi.buffer(f.posted)
            start = f.posted_tail % lib.VFU_POSTED_MAX * _POSTED.size
            end = start + (f.posted_head - f.posted_tail & _U32) * _POSTED.size
            raw = ring[start:end] if end <= len(ring) else ring[start:] + ring[: end - len(ring)]
        return [(region, offset, data[:count], msg_id)
                for offset, region, count, data, msg_id in _POSTED.iter_unpack(raw)]

    def posted_done(self, n: int) -> None:
        """The ``n`` oldest queued writes are applied: what waited behind them goes on."""
        lib.vfu_io_posted_done(self.io, n)
        self._recheck = self._running

    def idle(self) -> bool:
        """Whether every message the client sent so far has been handled (the thread waits
        for more, nothing is handed over)."""
        return not self._running or bool(lib.vfu_io_idle(self.io))

    def take(self) -> tuple[bytes, list[int], bool]:
        """The message C handed over: (bytes, fds now owned by the caller, fds truncated)."""
        f = self.io.f
        data = bytes(ffi.buffer(self._buf, f.have))
        fds = [f.fds[i] for i in range(f.nfds)]
        truncated = bool(f.fds_truncated)
        self._release(close_fds=False)
        return data, fds, truncated

    async def send(self, data: bytes, fd: int | None = None) -> None:
        """A whole message from Python, between the thread's own replies (one sender at a
        time: the caller serialises).  A full socket is waited for in the event loop, so a
        client that stops reading stalls only its own connection.  Once begun, a message is
        finished even if the sender is cancelled (half a message would corrupt the stream),
        or the connection is cut."""
        sent = 0
        try:
            with trio.CancelScope(shield=True):
                while True:
                    if not self._running:  # the connection ended meanwhile
                        raise OSError(errno.EPIPE, "send: the connection's I/O thread has "
                                      "stopped")
                    r = lib.vfu_io_send(self.io, data, len(data), sent,
                                        -1 if fd is None or sent else fd)
                    if r == -errno.EBUSY:  # the thread's reply is half out, waiting for room
                        await trio.sleep(SEND_RETRY)
                        continue
                    if r < 0:
                        raise OSError(-r, f"send: {os.strerror(-r)}")
                    if r == len(data):
                        return
                    sent = r
                    await trio.lowlevel.wait_writable(self.io.f.sock)
        except trio.ClosedResourceError:  # the connection's socket closed under the wait
            raise OSError(errno.EPIPE, "send: the connection has ended") from None
        except BaseException:
            if 0 < sent < len(data) and self._running:
                lib.vfu_io_abort(self.io)  # the stream cannot be trusted: cut it
            raise

    def errno(self) -> int:
        """errno of the socket error the thread reported (IOERR)."""
        return self.io.err or errno.EIO

    def drop(self) -> None:
        """Release what a broken stream left half-read (its fds closed)."""
        self._release(close_fds=True)

    def _release(self, close_fds: bool) -> None:
        """Empty the thread's message buffer for the next message: only while the thread is
        parked (it handed a result over, or has stopped), which C checks."""
        err = lib.vfu_io_release(self.io, close_fds)
        if err:
            raise RuntimeError(f"the I/O thread's message released while it reads on "
                               f"({os.strerror(-err)}): a bug in the caller")

    def stats(self) -> dict[str, int]:
        """The thread's counters, by struct vfu_fast_stats's field names."""
        s = self.io.f.stats
        return {name: getattr(s, name)
                for name, _ in ffi.typeof("struct vfu_fast_stats").fields}
