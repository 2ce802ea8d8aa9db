"""Shared memory backed by a memfd: what BAR RAM (and EP RAM) lives in.

A memfd can be handed to QEMU with a region-info reply, which mmaps it into
the guest's BAR so guest accesses never reach the socket, while the server
keeps its own mapping of the same pages.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref


class SharedMemory:
    """A named, page-rounded, zero-filled memfd and the server's mapping of it."""

    def __init__(self, name: str, size: int) -> None:
        self.size = (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        # Collected unclosed (a composition built and dropped), the mapping goes with the
        # mmap object and the fd with this.
        self._close_fd = weakref.finalize(self, os.close, self.fd)
        os.ftruncate(self.fd, self.size)
        self._map = mmap.mmap(self.fd, self.size, flags=mmap.MAP_SHARED,
                              prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self.view = memoryview(self._map)
        # Host address of the mapping, for the C fast path (the export is dropped at once).
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self._map))

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.view[offset : offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check(offset, len(data))
        self.view[offset : offset + len(data)] = data

    def _check(self, offset: int, size: int) -> None:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"[{offset:#x}, {offset + size:#x}) outside {self.size:#x} bytes")

    def close(self) -> None:
        self.view.release()
        self._map.close()
        self._close_fd()


class ForeignMemory:
    """Memory the server has mapped but does not own (a guest's RAM, shared with its QEMU):
    a window onto it that the C fast path can copy into directly.  Never exported to a
    client, and valid only until its owner changes its mappings (whoever hands one out
    must replace it before then)."""

    def __init__(self, view: memoryview) -> None:
        self.view = view
        self.size = len(view)
        anchor = (ctypes.c_char * max(len(view), 1)).from_buffer(view)
        self.address = ctypes.addressof(anchor)
        del anchor  # the address stays valid while ``view`` holds the mapping

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.view[offset : offset + size])

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.view[offset : offset + len(data)] = data
