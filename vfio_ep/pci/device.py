"""The PCI device the vfio-user server exposes: config space, BARs and IRQs.

This is the model behind the socket.  It answers region info/read/write for
the nine vfio-user PCI regions, raises INTx/MSI/MSI-X through whatever client
is attached, and hands DMA to the client's DMA table.  What lives behind the
BARs (an endpoint controller and its function) plugs in through the window
table and the hooks.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Annotated

from vfio_ep.config import U8, U16, Range
from vfio_ep.memory import SharedMemory
from vfio_ep.pci import capabilities as caps
from vfio_ep.pci.bar import (
    NUM_BARS,
    BarAccessError,
    BarSpec,
    MmioHandler,
    Window,
    WindowKind,
    WindowTable,
)
from vfio_ep.pci.config_space import (
    PCI_BASE_ADDRESS_0,
    PCI_CACHE_LINE_SIZE,
    PCI_CLASS_PROG,
    PCI_COMMAND,
    PCI_COMMAND_INTX_DISABLE,
    PCI_COMMAND_IO,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
    PCI_COMMAND_PARITY,
    PCI_COMMAND_SERR,
    PCI_DEVICE_ID,
    PCI_INTERRUPT_LINE,
    PCI_INTERRUPT_PIN,
    PCI_LATENCY_TIMER,
    PCI_REVISION_ID,
    PCI_STATUS,
    PCI_STATUS_W1C,
    PCI_SUBSYSTEM_ID,
    PCI_SUBSYSTEM_VENDOR_ID,
    PCI_VENDOR_ID,
    ConfigSpace,
)
from vfio_ep.pci.host import Host
from vfio_ep.pci.regions import (
    REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
    Irq,
    Region,
    RegionError,
)
from vfio_ep.ratelimit import Repeats

log = logging.getLogger(__name__)

PCI_INTERRUPT_INTD = 4
# Region.CONFIG and the number of regions as plain ints: an enum's member and len() cost
# ~0.1 us each, on every access Python serves (a stream of posted register writes).
_CONFIG = int(Region.CONFIG)
_NUM_REGIONS = len(Region)


@dataclass(frozen=True)
class PciHeader:
    """Identity of the function, as configfs names it (pci_epf_header), each field as wide
    as pci-ep-cfs.c's store reads it."""

    vendorid: U16 = 0x16C3
    deviceid: U16 = 0xEDDA
    revid: U8 = 0
    progif_code: U8 = 0
    subclass_code: U8 = 0
    baseclass_code: U8 = 0xFF
    cache_line_size: U8 = 0
    subsys_vendor_id: U16 = 0
    subsys_id: U16 = 0
    # INTA; 0 = no INTx.  The kernel stores any u8; QEMU refuses a device with another pin.
    interrupt_pin: Annotated[U8, Range(0, PCI_INTERRUPT_INTD,
                                       why="0 no INTx, 1-4 INTA-INTD: QEMU takes no other")] = 1


# pci_epc_set_msi()/set_msix() refuse other counts when the function binds; refused here at
# the write, so the error names the attribute.
MSI_VECTORS = Range(1, 32, why="what pci_epc_set_msi() takes")
MSIX_VECTORS = Range(1, 2048, why="what pci_epc_set_msix() takes")


@dataclass(frozen=True)
class FunctionAttributes(PciHeader):
    """What every function's configfs directory has: the header and interrupt counts."""

    msi_interrupts: Annotated[U8, MSI_VECTORS] = 32
    msix_interrupts: Annotated[U16, MSIX_VECTORS] = 32

    def header(self) -> PciHeader:
        return PciHeader(**{f.name: getattr(self, f.name) for f in fields(PciHeader)})


@dataclass(frozen=True)
class MsixPlacement:
    """Where the MSI-X table and PBA live: each in its own page of a memory BAR."""

    bar: int
    table_offset: int
    pba_offset: int


@dataclass(frozen=True)
class PciDeviceSpec:
    header: PciHeader = PciHeader()
    bars: tuple[BarSpec, ...] = ()
    msi_interrupts: int = 0  # 0 = no MSI capability
    msix_interrupts: int = 0  # 0 = no MSI-X capability
    msix: MsixPlacement | None = None


@dataclass(frozen=True)
class RegionInfo:
    size: int
    flags: int
    fd: int | None = None
    offset: int = 0
    areas: tuple[tuple[int, int], ...] = ()


@dataclass
class PciDevice:
    """Config space + BAR windows + interrupts, with the host attached or not."""

    spec: PciDeviceSpec
    windows: WindowTable = field(default_factory=WindowTable)
    host: Host | None = None
    reset_hooks: list[Callable[[], None]] = field(default_factory=list)
    link_hooks: list[Callable[[bool], None]] = field(default_factory=list)
    # Long-lived tasks of the model (an endpoint controller's "CPU"), started by the
    # listener with trio's nursery.start protocol before the first client is served.
    background: list[Callable[..., Awaitable[None]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bars: dict[int, BarSpec] = {b.index: b for b in self.spec.bars}
        self._check_bars()
        self.config = self._build_config()
        self._power_on = bytes(self.config.data)
        self.msi_pos = self.config.find_capability(caps.PCI_CAP_ID_MSI)
        self.msix_pos = self.config.find_capability(caps.PCI_CAP_ID_MSIX)
        self._unraised = Repeats(log)  # a function's raises the host has not enabled
        self.config.on_write(PCI_COMMAND, 2, self._command_written)

    # -- construction -------------------------------------------------------
    def _check_bars(self) -> None:
        for b in self.spec.bars:
            if not 0 <= b.index < NUM_BARS:
                raise ValueError(f"BAR index {b.index} out of range")
            if b.is_64bit and b.index + 1 in self.bars:
                raise ValueError(f"BAR{b.index + 1} is the upper half of 64-bit BAR{b.index}")
        m = self.spec.msix
        if self.spec.msix_interrupts:
            if m is None or m.bar not in self.bars:
                raise ValueError("MSI-X needs a table BAR")
            table_end = m.table_offset + self.spec.msix_interrupts * caps.PCI_MSIX_ENTRY_SIZE
            if (m.table_offset | m.pba_offset) & 7 or max(
                table_end, m.pba_offset + 8
            ) > self.bars[m.bar].size:
                raise ValueError(f"MSI-X table/PBA do not fit (QWORD aligned) in BAR{m.bar}")

    def _build_config(self) -> ConfigSpace:
        h = self.spec.header
        cfg = ConfigSpace()
        cfg.set(PCI_VENDOR_ID, 2, h.vendorid)
        cfg.set(PCI_DEVICE_ID, 2, h.deviceid)
        cfg.set(PCI_COMMAND, 2, 0,
                wmask=PCI_COMMAND_IO | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER
                | PCI_COMMAND_PARITY | PCI_COMMAND_SERR | PCI_COMMAND_INTX_DISABLE)
        cfg.set(PCI_STATUS, 2, 0, w1c=PCI_STATUS_W1C)
        cfg.set(PCI_REVISION_ID, 1, h.revid)
        cfg.set(PCI_CLASS_PROG, 3,
                h.progif_code | h.subclass_code << 8 | h.baseclass_code << 16)
        cfg.set(PCI_CACHE_LINE_SIZE, 1, h.cache_line_size, wmask=0xFF)
        cfg.set(PCI_LATENCY_TIMER, 1, 0, wmask=0xFF)
        for b in self.spec.bars:
            reg = PCI_BASE_ADDRESS_0 + 4 * b.index
            mask = b.address_mask()
            cfg.set(reg, 4, b.type_bits(), wmask=mask & 0xFFFFFFFF)
            if b.is_64bit:
                cfg.set(reg + 4, 4, 0, wmask=mask >> 32)
        cfg.set(PCI_SUBSYSTEM_VENDOR_ID, 2, h.subsys_vendor_id)
        cfg.set(PCI_SUBSYSTEM_ID, 2, h.subsys_id)
        cfg.set(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        cfg.set(PCI_INTERRUPT_PIN, 1, h.interrupt_pin)
        cfg.add_capability(caps.pm_capability())
        if self.spec.msi_interrupts:
            cfg.add_capability(caps.msi_capability(self.spec.msi_interrupts))
        if self.spec.msix_interrupts and self.spec.msix:
            m = self.spec.msix
            cfg.add_capability(caps.msix_capability(
                self.spec.msix_interrupts, m.bar, m.table_offset, m.bar, m.pba_offset))
        cfg.add_capability(caps.pcie_capability())
        return cfg

    def windows_add_mmio(self, bar: int, offset: int, size: int, handler: MmioHandler) -> None:
        self.windows.add(Window(bar, offset, offset + size, WindowKind.MMIO, handler))

    # -- vfio-user regions --------------------------------------------------
    def region_info(self, index: int) -> RegionInfo:
        if not 0 <= index < len(Region):
            raise RegionError(errno.EINVAL, f"region index {index} out of range")
        rw = REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
        if index == Region.CONFIG:
            return RegionInfo(len(self.config.data), rw)
        bar = self.bars.get(index)
        if bar is None or not bar.size:
            return RegionInfo(0, 0)
        fd, offset, areas = self._mmap_areas(index)
        if fd is None:
            return RegionInfo(bar.size, rw)
        return RegionInfo(bar.size, rw | REGION_INFO_FLAG_MMAP, fd, offset, areas)

    def _mmap_areas(self, bar: int) -> tuple[int | None, int, tuple[tuple[int, int], ...]]:
        """The BAR's page-aligned RAM windows that share one memfd at one fd offset.

        QEMU takes one fd per region and maps area i at ``offset + area.offset``,
        so only windows with the same (memfd, target_offset - start) can be
        exported together; the largest such group wins, the rest stays trapped.
        """
        groups: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for w in self.windows.of_bar(bar):
            if w.mappable() and isinstance(w.target, SharedMemory) and w.target_offset >= w.start:
                key = (w.target.fd, w.target_offset - w.start)
                groups.setdefault(key, []).append((w.start, w.end - w.start))
        if not groups:
            return None, 0, ()
        (fd, offset), areas = max(groups.items(), key=lambda kv: sum(s for _, s in kv[1]))
        return fd, offset, tuple(areas)

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        self._check_access(index, offset, count)
        if index == _CONFIG:
            return self.config.read(offset, count)
        try:
            return self.windows.read(index, offset, count)
        except BarAccessError as e:
            raise RegionError(errno.EINVAL, str(e)) from None

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._check_access(index, offset, len(data))
        if index == _CONFIG:
            self.config.write(offset, data)
            return
        try:
            self.windows.write(index, offset, data)
        except BarAccessError as e:
            raise RegionError(errno.EINVAL, str(e)) from None

    def _check_access(self, index: int, offset: int, count: int) -> None:
        if not 0 <= index < _NUM_REGIONS:
            raise RegionError(errno.EINVAL, f"region index {index} out of range")
        size = len(self.config.data) if index == _CONFIG else (
            self.bars[index].size if index in self.bars else 0)
        if count == 0 or offset + count > size:
            raise RegionError(errno.EINVAL, f"{Region(index).name} access [{offset:#x}+"
                                f"{count:#x}) outside the region ({size:#x} bytes)")

    def irq_counts(self) -> dict[Irq, int]:
        return {
            Irq.INTX: 1 if self.spec.header.interrupt_pin else 0,
            Irq.MSI: self.spec.msi_interrupts,
            Irq.MSIX: self.spec.msix_interrupts,
            Irq.ERR: 0,
            Irq.REQ: 0,
        }

    # -- lifecycle ----------------------------------------------------------
    def attach(self, host: Host) -> None:
        self.host = host
        for hook in self.link_hooks:
            hook(True)

    def detach(self) -> None:
        self.host = None
        for hook in self.link_hooks:
            hook(False)

    def reset(self) -> None:
        """Power-on state: config space back to its first image, functions told."""
        self.config.data[:] = self._power_on
        if self.host:
            self.host.irqs.set_intx(False)
            self.host.irqs.set_intx_disabled(False)
        for hook in self.reset_hooks:
            hook()

    def _command_written(self, offset: int, size: int) -> None:
        if self.host:
            cmd = self.config.u16(PCI_COMMAND)
            self.host.irqs.set_intx_disabled(bool(cmd & PCI_COMMAND_INTX_DISABLE))

    # -- interrupts towards the host (what pci_epc_raise_irq ends in) -------
    def bus_master(self) -> bool:
        return bool(self.config.u16(PCI_COMMAND) & PCI_COMMAND_MASTER)

    def msi_state(self) -> caps.MsiState | None:
        return caps.msi_state(self.config, self.msi_pos) if self.msi_pos else None

    def msix_state(self) -> caps.MsixState | None:
        return caps.msix_state(self.config, self.msix_pos) if self.msix_pos else None

    def set_intx(self, level: bool) -> bool:
        if self.host is None or not self.spec.header.interrupt_pin:
            log.warning("INTx %s with no INTx pin or no client", "assert" if level else "deassert")
            return False
        self.host.irqs.set_intx(level)
        return True

    def raise_msi(self, vector: int) -> bool:
        """Signal 0-based MSI ``vector`` if the host enabled that many."""
        st = self.msi_state()
        if self.host is None or st is None or not st.enabled or vector >= st.vectors:
            self._unraised.warning("MSI vector %d not raised: %s", vector,
                        "no client" if self.host is None else f"host enabled {st}")
            return False
        return self.host.irqs.trigger(Irq.MSI, vector)

    def raise_msix(self, vector: int) -> bool:
        st = self.msix_state()
        if self.host is None or st is None or not st.enabled or vector >= st.vectors:
            self._unraised.warning("MSI-X vector %d not raised: %s", vector,
                        "no client" if self.host is None else f"host state {st}")
            return False
        return self.host.irqs.trigger(Irq.MSIX, vector)
