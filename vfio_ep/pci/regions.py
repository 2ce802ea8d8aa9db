"""The device's regions and interrupts as VFIO numbers them (include/uapi/linux/vfio.h):
what QEMU's vfio-user-pci asks for by index, and what the device model answers."""

from __future__ import annotations

import enum

from vfio_ep.errors import ErrnoError


class Region(enum.IntEnum):
    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


class Irq(enum.IntEnum):
    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


REGION_INFO_FLAG_READ = 0x1
REGION_INFO_FLAG_WRITE = 0x2
REGION_INFO_FLAG_MMAP = 0x4


class RegionError(ErrnoError):
    """An access or a question about a region the device refuses (with its errno)."""
