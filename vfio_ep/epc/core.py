"""The emulated endpoint controller: ``pci_epc_ops`` on a DesignWare-like SoC.

Functions program it exactly as they program a kernel EPC (write_header,
set_bar, map_addr, set_msi, raise_irq, ...).  Behind the ops sit the EP
address space, the inbound and outbound iATU, the eDMA and the EP interrupt
domain; in front of them, the PCI device that the vfio-user server exposes.

The BAR mmap rule.  QEMU reads a BAR's mmap layout once per connection and
never again, yet the iATU may be reprogrammed while the guest runs.  So:

* a BAR is *direct* (exported for mmap, guest accesses never reach us) when,
  at ``start()``, it translates to page-aligned EP RAM, holds no watched
  registers, and is at least DIRECT_MIN_SIZE (smaller BARs are cheap to trap,
  and a subrange of them could not be page-aligned);
* a direct BAR's mmap shows one fixed memfd range (its *aperture*).  When its
  translation changes, the EP RAM pages it now translates to are *moved*
  into the aperture (contents and EP addresses kept, see ``EpRam.place``),
  so the guest sees the new translation at memory speed; where it now
  translates to anything but RAM, scratch pages are swapped in
  (``EpRam.evict``), so guest writes there can never land in EP RAM;
* a BAR its function may point at a doorbell (``PciEpfBar.doorbell_target``)
  keeps the pages a doorbell register would land on out of the mmap
  (*holes*): those accesses stay trapped and reach the doorbell;
* a translation a direct BAR cannot show (not page-aligned) is refused with
  -EBUSY; every other BAR stays trapped and follows the current iATU.
"""

from __future__ import annotations

import enum
import errno
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import trio

from vfio_ep.epc.address_space import PAGE, AddressError, EpAddressSpace, EpRam, MmioBlock
from vfio_ep.epc.doorbell import DoorbellTarget
from vfio_ep.epc.edma import EDMA_REGS_SIZE, EMUL_DOORBELL_OFFSET, DmaChannel, DwEdma
from vfio_ep.epc.features import BarType, ControllerProfile, EpcFeatures, profile
from vfio_ep.epc.iatu import InboundAtu, NoInboundWindow
from vfio_ep.epc.irq import IrqDomain
from vfio_ep.epc.msi_controller import PlatformMsiController
from vfio_ep.epc.outbound import OutboundAtu, PciEpcMem
from vfio_ep.pci.bar import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    BarSpec,
    Window,
)
from vfio_ep.pci.device import MsixPlacement, PciDevice, PciDeviceSpec, PciHeader
from vfio_ep.vfio_user.dma import DmaError, DmaTable

if TYPE_CHECKING:
    from vfio_ep.epf.core import PciEpf, PciEpfBar

log = logging.getLogger(__name__)

# The SoC memory map.
EP_RAM_BASE = 0x8000_0000
OUTBOUND_BASE = 0x1_0000_0000
OUTBOUND_SIZE = 0x4000_0000
EDMA_BASE = 0xF000_0000
MSI_BASE = 0xF010_0000
DIRECT_MIN_SIZE = 0x10000  # smallest BAR exported for mmap (see the mmap rule)


@dataclass(frozen=True)
class PciEpcAuxResource:
    """struct pci_epc_aux_resource (type PCI_EPC_AUX_DOORBELL_MMIO is "doorbell-mmio")."""

    type: str
    phys_addr: int
    size: int
    bar: int
    bar_offset: int
    irq: int
    data: int


class EpcError(Exception):
    """An op refused, with the errno the kernel's EPC core would return."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err


class IrqType(enum.IntEnum):
    """PCI_IRQ_INTX / PCI_IRQ_MSI / PCI_IRQ_MSIX as pci_epc_raise_irq() takes them."""

    INTX = 1
    MSI = 2
    MSIX = 4


@dataclass
class PciEpcMap:
    """struct pci_epc_map."""

    pci_addr: int
    pci_size: int
    map_pci_addr: int
    map_size: int
    phys_base: int
    phys_addr: int


@dataclass(frozen=True)
class PciEpcAttributes:
    """The SoC behind ``controllers/<name>``: what a kernel EPC driver hard-codes (its
    profile, reserved BARs), the EP RAM size, and the period of the core's poll doorbell."""

    profile: str = "generic"
    ram_size: int = 256 << 20
    # More reserved BARs than the profile has, e.g. (0, 1) puts pci-epf-test's registers
    # in BAR2 as on AM654.
    reserved_bars: tuple[int, ...] = ()
    msi_mutable: bool = False
    doorbell_poll_interval_us: int = 1000

    def __post_init__(self) -> None:
        if self.doorbell_poll_interval_us <= 0:
            raise ValueError("doorbell_poll_interval_us must be positive")
        if self.ram_size < PAGE:
            raise ValueError(f"ram_size {self.ram_size} is smaller than a page")


@dataclass
class PciEpc:
    profile: ControllerProfile
    ram_size: int = 256 << 20
    doorbell_poll_interval: float = 0.001
    epfs: list[PciEpf] = field(default_factory=list)
    name: str = "ep0"

    @classmethod
    def create(cls, name: str, a: PciEpcAttributes) -> PciEpc:
        """The controller ``controllers/<name>`` (ValueError for an unknown profile/BAR)."""
        prof = profile(a.profile, reserved_bars=a.reserved_bars, msi_mutable=a.msi_mutable)
        return cls(prof, ram_size=a.ram_size,
                   doorbell_poll_interval=a.doorbell_poll_interval_us / 1e6, name=name)

    def __post_init__(self) -> None:
        self.features: EpcFeatures = self.profile.features
        self.ram = EpRam(EP_RAM_BASE, self.ram_size)
        self.space = EpAddressSpace(self.ram)
        self.irqs = IrqDomain(self.spawn)
        page = self.profile.region_align
        self.mem = PciEpcMem(OUTBOUND_BASE, OUTBOUND_SIZE, page)
        self.outbound = OutboundAtu(self.mem, self.profile.num_ob_windows, self._rc_dma)
        self.space.add_aperture(OUTBOUND_BASE, OUTBOUND_SIZE, self.outbound)
        self.inbound = InboundAtu(self.space, self.profile.num_ib_windows)
        self.pci: PciDevice | None = None
        self.edma: DwEdma | None = None
        if self.profile.edma:
            self.edma = DwEdma(self.space, self.irqs, self.spawn, self.profile.edma_channels,
                               self._rc_dma)
            self.space.add_block(MmioBlock("dw-edma", EDMA_BASE, EDMA_REGS_SIZE, self.edma))
            self.edma_doorbell = DoorbellTarget("dw-edma-emul", EDMA_BASE + EMUL_DOORBELL_OFFSET,
                                                self.irqs, self.spawn, self.edma,
                                                EMUL_DOORBELL_OFFSET)
            self.space.add_doorbell(self.edma_doorbell)
        self.msi = (PlatformMsiController(MSI_BASE, self.space, self.irqs, self.spawn,
                                          immutable=not self.profile.msi_mutable)
                    if self.profile.msi_controller else None)
        self.header = PciHeader()
        self.bars: dict[int, PciEpfBar] = {}
        self.msi_interrupts = 0
        self.msix: tuple[int, int, int] | None = None  # (count, bar, table offset)
        self.space.on_layout_change.append(self._refresh_all_bars)
        self.direct: dict[int, int] = {}  # direct BAR -> memfd offset of its aperture
        self.holes: dict[int, set[int]] = {}  # direct BAR -> trapped page offsets
        self._nursery: trio.Nursery | None = None
        self._queued: list[tuple[Callable[[], Awaitable[None]], str]] = []

    # -- the EP "CPU": where functions' work and IRQ handlers run ------------
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for fn, name in self._queued:
                nursery.start_soon(self._guarded, fn, name, name=name)
            self._queued.clear()
            task_status.started()
            await trio.sleep_forever()

    def spawn(self, fn: Callable[[], Awaitable[None]], name: str) -> None:
        """Run ``fn`` on the EP's CPU; work queued before it runs (at bind) starts with it."""
        if self._nursery is None:
            self._queued.append((fn, name))
            return
        self._nursery.start_soon(self._guarded, fn, name, name=name)

    @staticmethod
    async def _guarded(fn: Callable[[], Awaitable[None]], name: str) -> None:
        """EP work never takes the server down: a bus error is logged, a bug too."""
        try:
            await fn()
        except (AddressError, EpcError, DmaError) as e:
            log.warning("%s failed: %s", name, e)
        except Exception:
            log.exception("%s crashed", name)

    def _rc_dma(self) -> DmaTable | None:
        host = self.pci.host if self.pci else None
        if host is not None and self.pci and not self.pci.bus_master():
            log.warning("EP access to RC memory while Bus Master Enable is off")
        return host.dma if host is not None else None

    # -- pci_epc_ops ---------------------------------------------------------
    def get_features(self) -> EpcFeatures:
        return self.features

    def write_header(self, header: PciHeader) -> None:
        if self.pci is not None and header != self.header:
            raise EpcError(errno.EBUSY, "the header is fixed once the controller has started")
        self.header = header

    def set_bar(self, epf_bar: PciEpfBar) -> None:
        """pci_epc_set_bar(): checks as pci-epc-core.c, then program the inbound iATU."""
        bar = epf_bar.barno
        desc = self.features.bar[bar]
        if epf_bar.submap and not (self.features.dynamic_inbound_mapping
                                   and self.features.subrange_mapping):
            raise EpcError(errno.EINVAL, "subrange mapping not supported")
        if desc.type == BarType.RESIZABLE and not (1 << 20 <= epf_bar.size <= 1 << 47):
            raise EpcError(errno.EINVAL, f"resizable BAR{bar} size {epf_bar.size:#x}")
        if desc.type == BarType.FIXED and desc.fixed_size != epf_bar.size:
            raise EpcError(errno.EINVAL, f"BAR{bar} is fixed at {desc.fixed_size:#x}")
        if desc.type in (BarType.RESERVED, BarType.DISABLED):
            raise EpcError(errno.EINVAL, f"BAR{bar} is {desc.type.name.lower()}")
        size = epf_bar.size
        if size & (size - 1) or not size:
            raise EpcError(errno.EINVAL, f"BAR{bar} size {size:#x} is not a power of two")
        is64 = bool(epf_bar.flags & PCI_BASE_ADDRESS_MEM_TYPE_64)
        if (bar == 5 and is64) or (size >> 32 and not is64):
            raise EpcError(errno.EINVAL, f"BAR{bar} flags {epf_bar.flags:#x} for size {size:#x}")
        old = self.bars.get(bar)
        if self.pci is not None and (old is None or old.size != size or old.flags !=
                                     epf_bar.flags):
            raise EpcError(errno.EBUSY, f"BAR{bar} size/flags cannot change after start")
        pieces = ([(s.phys_addr, s.size) for s in epf_bar.submap] if epf_bar.submap
                  else [(epf_bar.phys_addr, size)])
        if epf_bar.submap and sum(n for _, n in pieces) != size:
            raise EpcError(errno.EINVAL, f"BAR{bar} submap does not cover the BAR")
        if bar in self.direct:
            self._check_direct(bar, pieces)
        try:
            self.inbound.program(bar, pieces)
        except NoInboundWindow as e:
            raise EpcError(errno.ENOSPC, str(e)) from None
        if bar in self.direct:
            self._show_direct(bar, pieces)
        self.bars[bar] = epf_bar.copy()
        self._refresh_all_bars()  # a placement may have moved pages other BARs show

    def _check_direct(self, bar: int, pieces: list[tuple[int, int]]) -> None:
        """Refuse what a directly mapped BAR cannot show (see the mmap rule above)."""
        pinned = {ep // PAGE for b in self.direct if b != bar for ep in self._shown_pages(b)}
        for ep_addr, n in pieces:
            if ep_addr % PAGE or n % PAGE:
                raise EpcError(errno.EBUSY, f"BAR{bar} is mapped directly by the client: it "
                               f"cannot translate to [{ep_addr:#x}+{n:#x}) (not page-aligned) "
                               "until the client reconnects")
            if any(p in pinned for p in range(ep_addr // PAGE, (ep_addr + n) // PAGE)):
                raise EpcError(errno.EBUSY, f"BAR{bar}: [{ep_addr:#x}+{n:#x}) is shown by "
                               "another directly mapped BAR")

    def _show_direct(self, bar: int, pieces: list[tuple[int, int]]) -> None:
        """Make the aperture of direct BAR ``bar`` hold what ``pieces`` translate to."""
        aperture = self.direct[bar]
        offset = 0
        for ep_addr, n in pieces:
            for page in range(ep_addr, ep_addr + n, PAGE):
                phys = aperture + offset + page - ep_addr
                if self.ram.contains(page, PAGE):
                    self.ram.place(page, PAGE, phys)
                else:
                    self.ram.evict(phys, PAGE)
            offset += n

    def _shown_pages(self, bar: int) -> list[int]:
        """EP addresses of the pages currently shown by direct BAR ``bar``."""
        return [r.ep_addr + off for r in self.inbound.regions.get(bar, [])
                for off in range(0, r.size, PAGE)]

    def clear_bar(self, epf_bar: PciEpfBar) -> None:
        self.inbound.clear(epf_bar.barno)
        if self.pci is None:
            self.bars.pop(epf_bar.barno, None)
        self._refresh_bar(epf_bar.barno)

    def align_addr(self, pci_addr: int, size: int) -> tuple[int, int, int]:
        """dw_pcie_ep_align_addr(): (aligned PCI address, mapping size, offset)."""
        mask = self.profile.region_align - 1
        offset = pci_addr & mask
        page = self.mem.page_size
        return pci_addr & ~mask, (offset + size + page - 1) // page * page, offset

    def map_addr(self, phys_addr: int, pci_addr: int, size: int) -> None:
        self.outbound.map_addr(phys_addr, pci_addr, size)

    def unmap_addr(self, phys_addr: int) -> None:
        self.outbound.unmap_addr(phys_addr)

    def set_msi(self, nr_irqs: int) -> None:
        if not self.features.msi_capable or not 1 <= nr_irqs <= 32:
            raise EpcError(errno.EINVAL, f"MSI with {nr_irqs} vectors")
        self._frozen("MSI", self.msi_interrupts, 1 << (nr_irqs - 1).bit_length())
        self.msi_interrupts = 1 << (nr_irqs - 1).bit_length()

    def _frozen(self, what: str, old: object, new: object) -> None:
        """Capabilities are fixed once QEMU has read the config space."""
        if self.pci is not None and old != new:
            raise EpcError(errno.EBUSY, f"{what} cannot change after start ({old} -> {new})")

    def get_msi(self) -> int:
        st = self.pci.msi_state() if self.pci else None
        if st is None or not st.enabled:
            return -errno.EINVAL
        return st.vectors

    def set_msix(self, nr_irqs: int, bar: int, offset: int) -> None:
        if not self.features.msix_capable or not 1 <= nr_irqs <= 2048:
            raise EpcError(errno.EINVAL, f"MSI-X with {nr_irqs} vectors")
        self._frozen("MSI-X", self.msix, (nr_irqs, bar, offset))
        self.msix = (nr_irqs, bar, offset)

    def get_msix(self) -> int:
        st = self.pci.msix_state() if self.pci else None
        if st is None or not st.enabled:
            return -errno.EINVAL
        return st.vectors

    def raise_irq(self, irq_type: IrqType, interrupt_num: int) -> None:
        """pci_epc_raise_irq(); MSI/MSI-X numbers are 1-based as in the kernel."""
        pci = self._started()
        if irq_type == IrqType.INTX:
            if not self.features.intx_capable:
                raise EpcError(errno.EINVAL, "this controller cannot raise INTx")
            pci.set_intx(True)
            pci.set_intx(False)
        elif irq_type == IrqType.MSI:
            if not pci.raise_msi(interrupt_num - 1):
                raise EpcError(errno.EINVAL, f"MSI {interrupt_num} not raised")
        elif not pci.raise_msix(interrupt_num - 1):
            raise EpcError(errno.EINVAL, f"MSI-X {interrupt_num} not raised")

    def get_aux_resources(self) -> list[PciEpcAuxResource]:
        """dw_pcie_ep_get_aux_resources(): the eDMA interrupt-emulation doorbell, at its
        EP address and, when a reserved BAR shows the eDMA registers, pre-exposed there."""
        if self.edma is None:
            return []
        bar = self.profile.edma_bar
        return [PciEpcAuxResource("doorbell-mmio", EDMA_BASE + EMUL_DOORBELL_OFFSET, 4, bar,
                                  EMUL_DOORBELL_OFFSET if bar >= 0 else 0,
                                  self.edma.emul_virq, 0)]

    def start_doorbell(self, res: PciEpcAuxResource) -> None:
        """Arm the doorbell register behind an aux resource ("write 0 to assert")."""
        self.edma_doorbell.add_event(res.data, res.irq)

    # -- pci_epc_mem ---------------------------------------------------------
    def mem_map(self, pci_addr: int, pci_size: int) -> PciEpcMap:
        """pci_epc_mem_map(): align, allocate outbound space, program an outbound region."""
        if not pci_size:
            raise EpcError(errno.EINVAL, "zero-sized map")
        map_pci, map_size, offset = self.align_addr(pci_addr, pci_size)
        size = min(pci_size, map_pci + map_size - pci_addr)
        phys = self.mem.alloc_addr(map_size)
        if phys is None:
            raise EpcError(errno.ENOMEM, f"outbound aperture cannot hold {map_size:#x} bytes")
        try:
            self.map_addr(phys, map_pci, map_size)
        except AddressError as e:
            self.mem.free_addr(phys, map_size)
            raise EpcError(errno.ENOMEM, str(e)) from None
        return PciEpcMap(pci_addr, size, map_pci, map_size, phys, phys + offset)

    def mem_unmap(self, m: PciEpcMap) -> None:
        self.unmap_addr(m.phys_base)
        self.mem.free_addr(m.phys_base, m.map_size)

    def dma_channel(self, direction: str, ch: int = 0) -> DmaChannel | None:
        """The private eDMA channel pci-epf-test asks dmaengine for (None without eDMA)."""
        if self.edma is None:
            return None
        return DmaChannel(self.edma, EDMA_BASE, direction, ch)

    # -- lifecycle -----------------------------------------------------------
    def add_epf(self, epf: PciEpf) -> None:
        self.epfs.append(epf)

    def init_notify(self) -> None:
        """pci_epc_init_notify(): the controller is ready, functions program it (epc_init)."""
        for epf in self.epfs:
            epf.epc_init()

    def start(self) -> PciDevice:
        """pci_epc_start(): freeze the config space and expose the device."""
        if self.pci is not None:
            return self.pci
        spec = PciDeviceSpec(
            header=self.header,
            bars=tuple(self._bar_specs()),
            msi_interrupts=self.msi_interrupts,
            msix_interrupts=self.msix[0] if self.msix else 0,
            msix=MsixPlacement(self.msix[1], self.msix[2],
                               self._pba_offset()) if self.msix else None,
        )
        self.direct = {bar: self.ram.phys(b.phys_addr) for bar, b in self.bars.items()
                       if self._can_be_direct(bar, b)}
        self.holes = {bar: self._doorbell_pages(self.bars[bar].size) for bar in self.direct
                      if self.bars[bar].doorbell_target}
        self.pci = PciDevice(spec)
        self.pci.link_hooks.append(self._link_changed)
        self.pci.reset_hooks.append(self._perst)
        self.pci.background.append(self.run)
        self._refresh_all_bars()
        return self.pci

    def _doorbell_pages(self, size: int) -> set[int]:
        """BAR offsets of the pages where a doorbell register lands when a BAR of ``size``
        is pointed at it (pci_epf_align_inbound_addr: base aligned to the BAR size)."""
        return {(d.addr & (size - 1)) & ~(PAGE - 1) for d in self.space.doorbells}

    def _can_be_direct(self, bar: int, b: PciEpfBar) -> bool:
        regions = self.inbound.regions.get(bar, [])
        return (len(regions) == 1 and not b.phys_addr % PAGE
                and b.size >= DIRECT_MIN_SIZE and self.ram.contains(b.phys_addr, b.size)
                and not any(w.start < b.phys_addr + b.size and b.phys_addr < w.end
                            for w in self.space.watches))

    def _pba_offset(self) -> int:
        count, _, table = self.msix or (0, 0, 0)
        return table + 16 * count

    def _bar_specs(self) -> list[BarSpec]:
        specs = []
        for bar, b in sorted(self.bars.items()):
            specs.append(BarSpec(bar, b.size, is_64bit=bool(b.flags & PCI_BASE_ADDRESS_MEM_TYPE_64),
                                 prefetch=bool(b.flags & PCI_BASE_ADDRESS_MEM_PREFETCH),
                                 is_io=bool(b.flags & PCI_BASE_ADDRESS_SPACE_IO)))
        if self.profile.edma_bar >= 0 and self.edma:
            specs.append(BarSpec(self.profile.edma_bar, EDMA_REGS_SIZE))
            self.inbound.program(self.profile.edma_bar, [(EDMA_BASE, EDMA_REGS_SIZE)])
        return specs

    def _started(self) -> PciDevice:
        if self.pci is None:
            raise EpcError(errno.EINVAL, "controller not started")
        return self.pci

    def _refresh_bar(self, bar: int) -> None:
        if self.pci is None:
            return
        rows = self.inbound.windows(bar, bar in self.direct)
        for hole in self.holes.get(bar, ()):
            rows = [part for w in rows for part in _cut(w, hole, hole + PAGE)]
        self.pci.windows.replace_bar(bar, rows)

    def _refresh_all_bars(self) -> None:
        for bar in range(6):
            self._refresh_bar(bar)

    def _link_changed(self, up: bool) -> None:
        for epf in self.epfs:
            if up:
                epf.link_up()
            else:
                epf.link_down()

    def _perst(self) -> None:
        """A device reset is PERST#: functions tear down and re-initialise the controller."""
        for epf in self.epfs:
            epf.epc_deinit()
        for epf in self.epfs:
            epf.epc_init()


def _cut(w: Window, start: int, end: int) -> list[Window]:
    """Split ``w`` so that [start, end) is its own, never exported, row."""
    if end <= w.start or w.end <= start:
        return [w]
    parts = []
    for lo, hi, mmap in ((w.start, start, w.mmap), (start, end, False), (end, w.end, w.mmap)):
        lo, hi = max(lo, w.start), min(hi, w.end)
        if lo < hi:
            parts.append(replace(w, start=lo, end=hi, mmap=mmap,
                                 target_offset=w.target_offset + lo - w.start))
    return parts
