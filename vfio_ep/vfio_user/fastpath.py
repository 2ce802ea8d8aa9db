"""The C fast path (``native/``): reads the socket and serves hot messages itself.

It walks a C copy of the device's window table (re-synced whenever the table
changes), applies RAM-window reads and writes and doorbell rings directly,
and returns the first message that needs Python, whole, so the stream's
order is kept.  Without the extension (no compiler at install time) or with
``VFIO_EP_FASTPATH=0``, the server reads every message in Python.
"""

from __future__ import annotations

import logging
import os
from typing import Any, cast

from vfio_ep.memory import ForeignMemory, SharedMemory
from vfio_ep.native import ffi, lib
from vfio_ep.pci.bar import FastDoorbell, WindowKind, WindowTable

log = logging.getLogger(__name__)

AGAIN, MESSAGE, EOF, BROKEN, IOERR, OVERSIZED = 0, 1, 2, 3, 4, 5


class FastPath:
    """One connection's C message pump."""

    def __init__(self, sock_fd: int, windows: WindowTable) -> None:
        self.f = ffi.new("struct vfu_fast *")
        self._buf = ffi.new("uint8_t[]", lib.VFU_MAX_MSG)
        self.f.buf = self._buf
        self.f.sock = sock_fd
        self.windows = windows
        self._synced = -1
        self._keep: list[Any] = []

    def _sync(self) -> None:
        """Copy the window table into C (RAM rows carry their host address)."""
        rows = self.windows.windows
        table = ffi.new("struct vfu_window[]", max(len(rows), 1))
        keep: list[Any] = [table]
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
        self.f.windows = table
        self.f.nwindows = len(rows)
        self._keep = keep
        self._synced = self.windows.version

    def poll(self) -> int:
        if self._synced != self.windows.version:
            self._sync()
        return lib.vfu_fast_poll(self.f)

    def take(self) -> tuple[bytes, list[int], bool]:
        """The message C handed over: (bytes, fds now owned by the caller, fds truncated)."""
        data = bytes(ffi.buffer(self._buf, self.f.have))
        fds = [self.f.fds[i] for i in range(self.f.nfds)]
        truncated = bool(self.f.fds_truncated)
        self.f.have = self.f.nfds = self.f.fds_truncated = 0
        return data, fds, truncated

    @staticmethod
    def errno() -> int:
        """errno of the socket error that vfu_fast_poll() reported."""
        return ffi.errno

    def drop(self) -> None:
        """Release what a broken stream left half-read."""
        for i in range(self.f.nfds):
            os.close(self.f.fds[i])
        self.f.have = self.f.nfds = 0

    def stats(self) -> dict[str, int]:
        s = self.f.stats
        return {k: getattr(s, k) for k in ("fast_reads", "fast_writes", "doorbells",
                                           "to_python")}
