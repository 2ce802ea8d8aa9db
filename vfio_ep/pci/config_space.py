"""Type-0 PCIe configuration space with hardware write semantics.

Each byte has a write mask (bits the guest may change) and a write-1-to-clear
mask; everything else is read-only.  BAR sizing falls out of the masks: a BAR
register's writable bits are exactly its address bits, so writing all-ones
reads back ``~(size - 1) | type bits`` as on hardware.  QEMU emulates BAR
addresses, the ROM BAR and the MSI/MSI-X bodies itself but forwards every
write, so our copy also tells the endpoint what the host enabled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

CONFIG_SPACE_SIZE = 4096

# Standard header offsets and bits (include/uapi/linux/pci_regs.h names).
PCI_VENDOR_ID = 0x00
PCI_DEVICE_ID = 0x02
PCI_COMMAND = 0x04
PCI_COMMAND_IO = 0x1
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4
PCI_COMMAND_PARITY = 0x40
PCI_COMMAND_SERR = 0x100
PCI_COMMAND_INTX_DISABLE = 0x400
PCI_STATUS = 0x06
PCI_STATUS_INTERRUPT = 0x08
PCI_STATUS_CAP_LIST = 0x10
PCI_STATUS_W1C = 0xF900  # parity, target/master aborts, SERR, detected parity
PCI_REVISION_ID = 0x08
PCI_CLASS_PROG = 0x09
PCI_CACHE_LINE_SIZE = 0x0C
PCI_LATENCY_TIMER = 0x0D
PCI_HEADER_TYPE = 0x0E
PCI_BASE_ADDRESS_0 = 0x10
PCI_SUBSYSTEM_VENDOR_ID = 0x2C
PCI_SUBSYSTEM_ID = 0x2E
PCI_ROM_ADDRESS = 0x30
PCI_CAPABILITY_LIST = 0x34
PCI_INTERRUPT_LINE = 0x3C
PCI_INTERRUPT_PIN = 0x3D
PCI_CAP_START = 0x40

WriteHook = Callable[[int, int], None]


@dataclass
class CapabilityBlock:
    """A capability body laid out by its own module: bytes plus write masks."""

    cap_id: int
    data: bytes  # whole capability, ID and next byte included
    wmask: bytes
    w1cmask: bytes


class ConfigSpace:
    """4 KiB of config space, its masks, and hooks that run after guest writes."""

    def __init__(self) -> None:
        self.data = bytearray(CONFIG_SPACE_SIZE)
        self.wmask = bytearray(CONFIG_SPACE_SIZE)
        self.w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._next_cap = PCI_CAP_START
        self._last_cap_next: int | None = None

    # Layout helpers used while building the device.
    def set(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self.data[offset : offset + size] = value.to_bytes(size, "little")
        self.wmask[offset : offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset : offset + size] = w1c.to_bytes(size, "little")

    def add_capability(self, cap: CapabilityBlock) -> int:
        """Append a standard capability (dword aligned) and chain it; return its offset."""
        pos = self._next_cap
        end = pos + len(cap.data)
        if end > 0x100:
            raise ValueError("standard capabilities overflow the 256-byte header space")
        self.data[pos:end] = cap.data
        self.wmask[pos:end] = cap.wmask
        self.w1cmask[pos:end] = cap.w1cmask
        self.data[pos + 1] = 0
        if self._last_cap_next is None:
            self.data[PCI_CAPABILITY_LIST] = pos
            self.data[PCI_STATUS] |= PCI_STATUS_CAP_LIST
        else:
            self.data[self._last_cap_next] = pos
        self._last_cap_next = pos + 1
        self._next_cap = (end + 3) & ~3
        return pos

    def find_capability(self, cap_id: int) -> int | None:
        pos = self.data[PCI_CAPABILITY_LIST] if self.data[PCI_STATUS] & PCI_STATUS_CAP_LIST else 0
        while pos:
            if self.data[pos] == cap_id:
                return pos
            pos = self.data[pos + 1]
        return None

    def on_write(self, offset: int, size: int, hook: WriteHook) -> None:
        """Run ``hook(offset, size)`` after a guest write touching [offset, offset+size)."""
        self._hooks.append((offset, offset + size, hook))

    # Guest access.
    def read(self, offset: int, count: int) -> bytes:
        return bytes(self.data[offset : offset + count])

    def write(self, offset: int, data: bytes) -> None:
        for i, val in enumerate(data):
            pos = offset + i
            wm = self.wmask[pos]
            old = self.data[pos]
            self.data[pos] = ((old & ~wm) | (val & wm)) & ~(val & self.w1cmask[pos]) & 0xFF
        end = offset + len(data)
        for start, stop, hook in self._hooks:
            if start < end and offset < stop:
                hook(offset, len(data))

    def u8(self, offset: int) -> int:
        return self.data[offset]

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 4], "little")

    def put(self, offset: int, size: int, value: int) -> None:
        """Device-side update of read-only state (e.g. status bits), masks unchanged."""
        self.data[offset : offset + size] = value.to_bytes(size, "little")
