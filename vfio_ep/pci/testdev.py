"""``testdev``: a plain PCI device to prove the transport, before any endpoint controller.

BAR0 holds scratch registers and a raise-interrupt command; its layout
borrows pci-epf-test's offsets for the interrupt path (COMMAND, STATUS,
IRQ_TYPE, IRQ_NUMBER), so the guest's own ``pci_endpoint_test`` driver can
ask it for INTx, MSI and MSI-X.  Every other BAR is plain RAM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any

from vfio_ep.config import U8, U16, U32, Range, attributes
from vfio_ep.memory import SharedMemory
from vfio_ep.pci.bar import BarSpec, Window, WindowKind
from vfio_ep.pci.device import (
    MSI_VECTORS,
    MSIX_VECTORS,
    FunctionAttributes,
    MsixPlacement,
    PciDevice,
    PciDeviceSpec,
)

log = logging.getLogger(__name__)

REG_COMMAND = 0x04
REG_STATUS = 0x08
REG_IRQ_TYPE = 0x24
REG_IRQ_NUMBER = 0x28
COMMAND_RAISE_INTX = 1 << 0
COMMAND_RAISE_MSI = 1 << 1
COMMAND_RAISE_MSIX = 1 << 2
STATUS_IRQ_RAISED = 1 << 6
REGS_SIZE = 0x1000
MSIX_TABLE = 0x1000
MSIX_PBA = 0x2000


@dataclass(frozen=True)
class TestdevAttributes(FunctionAttributes):
    """The header, interrupt counts (0: no such capability) and BAR sizes (0: no BAR)."""

    msi_interrupts: Annotated[U8, Range(0, MSI_VECTORS.hi, why="0 for no MSI")] = 32
    msix_interrupts: Annotated[U16, Range(0, MSIX_VECTORS.hi, why="0 for no MSI-X")] = 32
    bar0_size: U32 = 16 << 10
    bar1_size: U32 = 64 << 10
    bar2_size: U32 = 1 << 20
    bar2_64bit: bool = True
    bar2_prefetch: bool = True
    bar4_size: U32 = 0


class TestdevRegisters:
    """Scratch dwords; a COMMAND write raises IRQ_TYPE/IRQ_NUMBER and sets IRQ_RAISED."""

    read_in_io_thread = True  # a read is a slice of the dwords

    def __init__(self, pci: PciDevice) -> None:
        self.pci = pci
        self.regs = bytearray(REGS_SIZE)

    def read(self, offset: int, size: int) -> int:
        return int.from_bytes(self.regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.regs[offset : offset + size] = value.to_bytes(size, "little")
        if offset == REG_COMMAND and value:
            self._command(value)

    def _u32(self, offset: int) -> int:
        return self.read(offset, 4)

    def _command(self, command: int) -> None:
        vector = self._u32(REG_IRQ_NUMBER)
        if command & COMMAND_RAISE_INTX:
            ok = self.pci.set_intx(True)
            self.pci.set_intx(False)
        elif command & COMMAND_RAISE_MSI:
            ok = vector >= 1 and self.pci.raise_msi(vector - 1)
        elif command & COMMAND_RAISE_MSIX:
            ok = vector >= 1 and self.pci.raise_msix(vector - 1)
        else:
            log.info("testdev: command %#x is not an interrupt request", command)
            return
        if ok:
            self.write(REG_STATUS, 4, self._u32(REG_STATUS) | STATUS_IRQ_RAISED)
        log.info("testdev: command %#x vector %d -> %s", command, vector,
                 "raised" if ok else "not raised")

    def reset(self) -> None:
        self.regs[:] = bytes(REGS_SIZE)


def build(values: dict[str, Any]) -> PciDevice:
    a = attributes(TestdevAttributes, values, "testdev")
    bars = [BarSpec(0, a.bar0_size), BarSpec(1, a.bar1_size),
            BarSpec(2, a.bar2_size, is_64bit=a.bar2_64bit, prefetch=a.bar2_prefetch),
            BarSpec(4, a.bar4_size)]
    if a.bar0_size < MSIX_PBA + 0x1000:
        raise ValueError(f"testdev: bar0_size must be at least {MSIX_PBA + 0x1000:#x}")
    spec = PciDeviceSpec(
        header=a.header(),
        bars=tuple(b for b in bars if b.size),
        msi_interrupts=a.msi_interrupts,
        msix_interrupts=a.msix_interrupts,
        msix=MsixPlacement(0, MSIX_TABLE, MSIX_PBA),
    )
    pci = PciDevice(spec)
    regs = TestdevRegisters(pci)
    pci.windows_add_mmio(0, 0, REGS_SIZE, regs)
    pci.reset_hooks.append(regs.reset)
    # The MSI-X table is QEMU's; the PBA reads back our (never pending) RAM.
    msix_pages = SharedMemory("testdev-msix", MSIX_PBA + 0x1000 - MSIX_TABLE)
    pci.windows.add(Window(0, MSIX_TABLE, MSIX_PBA + 0x1000, WindowKind.RAM, msix_pages))
    for b in spec.bars[1:]:
        mem = SharedMemory(f"testdev-bar{b.index}", b.size)
        pci.windows.add(Window(b.index, 0, b.size, WindowKind.RAM, mem, mmap=True))
    return pci
