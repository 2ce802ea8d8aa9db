"""Bulk data over memory views: memcpy, CRC32 and random fill, in steps that yield.

Transfers (pci-epf-test's READ/WRITE/COPY, the eDMA) move megabytes between EP RAM and RC
memory, both shared memory the server maps: they go view to view, never through ``bytes``.
The work is counted in bytes across the loop's tasks and the loop runs other tasks after every
BULK_STEP of it, so a 64 MiB transfer never stalls another connection or the doorbell path for
more than a step (~0.1-0.3 ms of memcpy or CRC), while a small transfer's copy and CRC do not
pay a scheduler pass each (~20 us, more than a 4 KiB copy costs).  The random fill runs in
C (native/vfu_fill.c) where the extension is built.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Sequence
from typing import Protocol

import trio

from vfio_ep.native import native

BULK_STEP = 1 << 20  # bytes copied, summed or filled between two checkpoints
_ZEROS = memoryview(bytes(BULK_STEP))
# Bytes of bulk work done, by any task of this loop, since the loop last ran others.
_UNYIELDED: trio.lowlevel.RunVar[int] = trio.lowlevel.RunVar("bulk_unyielded", default=0)


async def _paced(done: int) -> None:
    """Count ``done`` bytes of work; once BULK_STEP have been done since the last yield,
    let the other tasks run (a checkpoint).  One count for every task of the loop:
    back-to-back small calls share a yield, and no run of them holds the loop for more than
    about two steps.  A cancelled caller stops here either way (work cancelled before its
    first step, a reset's cancel_work_sync(), never goes on to touch the host)."""
    unyielded = _UNYIELDED.get() + done
    if unyielded >= BULK_STEP:
        _UNYIELDED.set(0)
        await trio.lowlevel.checkpoint()
    else:
        _UNYIELDED.set(unyielded)
        await trio.lowlevel.checkpoint_if_cancelled()


def _steps(views: Sequence[memoryview]) -> list[memoryview]:
    """``views`` cut into pieces of at most BULK_STEP bytes, in order."""
    return [v[off : off + BULK_STEP] for v in views for off in range(0, len(v), BULK_STEP)]


async def copy_views(dst: Sequence[memoryview], src: Sequence[memoryview]) -> None:
    """memcpy from one scatter list into another of the same total length.

    Raises ValueError when the lengths differ (a caller's bug: nothing is copied)."""
    if sum(map(len, dst)) != sum(map(len, src)):
        raise ValueError(f"copy of {sum(map(len, src))} bytes into {sum(map(len, dst))}")
    pieces = iter(_steps(src))
    s = next(pieces, memoryview(b""))
    for d in _steps(dst):
        pos = 0
        while pos < len(d):
            n = min(len(d) - pos, len(s))
            d[pos : pos + n] = s[:n]
            pos += n
            s = s[n:] if n < len(s) else next(pieces, memoryview(b""))
        await _paced(len(d))


class BusMemory(Protocol):
    """Memory by bus address (EP address space, RC memory): views where it is shared."""

    def views(self, addr: int, size: int) -> list[memoryview] | None: ...

    async def read(self, addr: int, size: int) -> bytes: ...

    async def write(self, addr: int, data: bytes | memoryview) -> None: ...


async def move(dst: BusMemory, dst_addr: int, src: BusMemory, src_addr: int, size: int) -> None:
    """Copy ``size`` bytes between two memories: view to view where both sides are shared
    memory, through ``bytes`` otherwise (registers, messages to the client).  The memories'
    own errors (a bus error, nothing mapped) propagate."""
    dst_views, src_views = dst.views(dst_addr, size), src.views(src_addr, size)
    if dst_views is None or src_views is None:
        await dst.write(dst_addr, await src.read(src_addr, size))
    else:
        await copy_views(dst_views, src_views)


def zero_views(views: Sequence[memoryview]) -> None:
    """memset(0) over ``views`` (kzalloc), a step at a time from one zero buffer."""
    for piece in _steps(views):
        piece[:] = _ZEROS[: len(piece)]


async def crc32_views(views: Sequence[memoryview], crc: int = 0) -> int:
    """zlib.crc32 over the concatenation of ``views``, continuing from ``crc``."""
    for piece in _steps(views):
        crc = zlib.crc32(piece, crc)
        await _paced(len(piece))
    return crc


async def fill_random(views: Sequence[memoryview]) -> None:
    """Unpredictable bytes into ``views`` (the kernel's get_random_bytes, for test data).

    C: splitmix64 from a fresh OS seed per call, at memory speed; the length passed to C is
    the view's own.  On the Python path (vfio_ep.native): os.urandom (about 300 MB/s)."""
    c = native()
    state = int.from_bytes(os.urandom(8), "little")
    for piece in _steps(views):
        if c is None:
            piece[:] = os.urandom(len(piece))
        else:
            ffi, lib = c
            state = lib.vfu_fill_random(ffi.from_buffer("uint8_t[]", piece,
                                                        require_writable=True),
                                        len(piece), state)
        await _paced(len(piece))
