"""A DesignWare-like PCIe endpoint controller: the ``pci_epc_ops`` behind the EPC core.

It owns the inbound iATU (BAR match and address match), the outbound iATU and its aperture
on the SoC bus, the integrated eDMA (with its interrupt-emulation doorbell), per-function
state (header, BARs, MSI/MSI-X, as ``dw_pcie_ep_func``), and the PCI device the vfio-user
server exposes once the controller starts.  RAM, the platform MSI controller and the IRQ
domain belong to the SoC around it (:mod:`vfio_ep.epc.soc`).

The BAR mmap rule.  QEMU reads a BAR's mmap layout once per connection and never again, yet
the iATU may be reprogrammed while the guest runs.  So:

* a BAR is *direct* (exported for mmap, guest accesses never reach us) when, at ``start()``,
  it translates to page-aligned EP RAM, holds no watched registers, and is at least
  DIRECT_MIN_SIZE (smaller BARs are cheap to trap, and a subrange of them could not be
  page-aligned);
* a direct BAR's mmap shows one fixed memfd range (its *aperture*).  When its translation
  changes, the EP RAM pages it now translates to are *moved* into the aperture (contents and
  EP addresses kept, see ``EpRam.place``), so the guest sees the new translation at memory
  speed; where it now translates to anything but RAM, scratch pages are swapped in
  (``EpRam.evict``), so guest writes there can never land in EP RAM;
* a BAR its function may point at a doorbell (``PciEpfBar.doorbell_addrs``: the registers of
  the function's doorbell backend) keeps the page each would land on out of the mmap (a
  *hole*): those accesses stay trapped and reach the doorbell; the rest of the BAR is memory;
* a translation a direct BAR cannot show (not page-aligned) is refused with -EBUSY; every
  other BAR stays trapped and follows the current iATU.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from vfio_ep.epc.address_space import PAGE, AddressError, MmioBlock
from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.doorbell import DoorbellTarget
from vfio_ep.epc.edma import EDMA_REGS_SIZE, EMUL_DOORBELL_OFFSET, DmaChannel, DwEdma
from vfio_ep.epc.features import NO_BAR, ControllerProfile, EpcFeatures
from vfio_ep.epc.iatu import InboundAtu, NoInboundWindow
from vfio_ep.epc.outbound import RC_MSI_ADDR, OutboundAtu
from vfio_ep.epc.soc import EpcError, EpSoc
from vfio_ep.pci.bar import (
    PCI_BASE_ADDRESS_MEM_PREFETCH,
    PCI_BASE_ADDRESS_MEM_TYPE_64,
    PCI_BASE_ADDRESS_SPACE_IO,
    BarSpec,
    Window,
)
from vfio_ep.pci.device import MsixPlacement, PciDevice, PciDeviceSpec, PciHeader
from vfio_ep.pci.host import RcMemory
from vfio_ep.ratelimit import Repeats

log = logging.getLogger(__name__)

# Where controller k's blocks sit on the SoC bus.
OUTBOUND_BASE = 0x1_0000_0000
OUTBOUND_SIZE = 0x4000_0000
EDMA_BASE = 0xF000_0000
EDMA_STRIDE = 0x10000
DIRECT_MIN_SIZE = 0x10000  # smallest BAR exported for mmap (see the mmap rule)
MAX_FUNCTIONS = 1  # one vfio-user device is one PCI function


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


@dataclass
class DwPcieEpFunc:
    """struct dw_pcie_ep_func and what the DW core keeps per function."""

    func_no: int
    header: PciHeader = field(default_factory=PciHeader)
    bars: dict[int, PciEpfBar] = field(default_factory=dict)
    msi_interrupts: int = 0
    msix: tuple[int, int, int] | None = None  # (count, bar, table offset)


class DwPcieEp:
    """The controller driver: pci_epc_ops on the emulated DesignWare EP."""

    def __init__(self, profile: ControllerProfile, soc: EpSoc) -> None:
        self.profile = profile
        self.soc = soc
        self.features: EpcFeatures = profile.features
        index = soc.add_controller()
        self.outbound_base = OUTBOUND_BASE + index * OUTBOUND_SIZE
        self.outbound = OutboundAtu(self.outbound_base, OUTBOUND_SIZE, profile.num_ob_windows,
                                    self.rc_memory)
        soc.space.add_aperture(self.outbound_base, OUTBOUND_SIZE, self.outbound)
        self.outbound.on_change.append(soc.space.changed)
        self.outbound.msi = self._rc_msi_write
        self._unraised = Repeats(log)  # a function ringing vectors the RC has not enabled
        self.inbound = InboundAtu(soc.space, profile.num_ib_windows)
        # The integrated eDMA, with its interrupt-emulation doorbell.
        self.edma: DwEdma | None = None
        self.edma_base = EDMA_BASE + index * EDMA_STRIDE
        if profile.edma:
            self.edma = DwEdma(soc.space, soc.irqs, soc.spawn, profile.edma_channels,
                               self.rc_memory)
            soc.space.add_block(MmioBlock(f"dw-edma{index}", self.edma_base, EDMA_REGS_SIZE,
                                          self.edma))
            self.edma_doorbell = DoorbellTarget(
                f"dw-edma{index}-emul", self.edma_base + EMUL_DOORBELL_OFFSET, soc.irqs,
                soc.spawn, self.edma, EMUL_DOORBELL_OFFSET)
            soc.space.add_doorbell(self.edma_doorbell)
        self.funcs = [DwPcieEpFunc(f) for f in range(MAX_FUNCTIONS)]
        self.pci: PciDevice | None = None
        self._bme_told = False
        self.direct: dict[int, int] = {}  # direct BAR -> memfd offset of its aperture
        self.holes: dict[int, set[int]] = {}  # direct BAR -> trapped page offsets
        soc.space.on_layout_change.append(self._refresh_all_bars)
        # The EPC core's notifiers, for PERST# and link changes (set by the core).
        self.on_reset: Callable[[], None] = lambda: None
        self.on_link: Callable[[bool], None] = lambda up: None

    def rc_memory(self) -> RcMemory | None:
        """The RC's memory through the link, or None with no RC attached."""
        host = self.pci.host if self.pci else None
        if host is not None and self.pci and not self.pci.bus_master() and not self._bme_told:
            self._bme_told = True  # once per connection: a guest may take its time
            log.warning("EP access to RC memory while Bus Master Enable is off")
        return host.dma if host is not None else None

    # -- pci_epc_ops -----------------------------------------------------------------
    def get_features(self, func_no: int, vfunc_no: int) -> EpcFeatures:
        return self.features

    def write_header(self, func_no: int, vfunc_no: int, header: PciHeader) -> None:
        func = self.funcs[func_no]
        if self.pci is not None and header != func.header:
            raise EpcError(errno.EBUSY, "the header is fixed once the controller has started")
        func.header = header

    def set_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None:
        """dw_pcie_ep_set_bar(): the inbound iATU; a BAR's size and flags are fixed once the
        controller has started, and a direct BAR can show page-aligned translations only."""
        func = self.funcs[func_no]
        bar, size = epf_bar.barno, epf_bar.size
        old = func.bars.get(bar)
        if self.pci is not None and (old is None or old.size != size or old.flags !=
                                     epf_bar.flags):
            raise EpcError(errno.EBUSY, f"BAR{bar} size/flags cannot change after start")
        pieces = ([(s.phys_addr, s.size) for s in epf_bar.submap] if epf_bar.submap
                  else [(epf_bar.phys_addr, size)])
        if bar in self.direct:
            self._check_direct(bar, pieces)
        try:
            self.inbound.program(bar, pieces)
        except NoInboundWindow as e:
            raise EpcError(errno.ENOSPC, str(e)) from None
        with self.pci.windows.changing() if self.pci else contextlib.nullcontext():
            if bar in self.direct:
                self._show_direct(bar, pieces)
            func.bars[bar] = epf_bar.copy()
            self._refresh_all_bars()  # a placement may have moved pages other BARs show

    def clear_bar(self, func_no: int, vfunc_no: int, epf_bar: PciEpfBar) -> None:
        self.inbound.clear(epf_bar.barno)
        if self.pci is None:
            self.funcs[func_no].bars.pop(epf_bar.barno, None)
        self._refresh_bar(epf_bar.barno)

    def align_addr(self, pci_addr: int, size: int) -> tuple[int, int, int]:
        """dw_pcie_ep_align_addr(): (aligned PCI address, mapping size, offset)."""
        mask = self.profile.region_align - 1
        offset = pci_addr & mask
        page = self.profile.region_align
        return pci_addr & ~mask, (offset + size + page - 1) // page * page, offset

    def map_addr(self, func_no: int, vfunc_no: int, phys_addr: int, pci_addr: int,
                 size: int) -> None:
        try:
            self.outbound.map_addr(phys_addr, pci_addr, size)
        except AddressError as e:
            raise EpcError(errno.ENOMEM, str(e)) from None

    def unmap_addr(self, func_no: int, vfunc_no: int, phys_addr: int) -> None:
        self.outbound.unmap_addr(phys_addr)

    def map_msi_irq(self, func_no: int, vfunc_no: int, phys_addr: int, interrupt_num: int,
                    entry_size: int, msix: bool) -> tuple[int, int]:
        """pci_epc_map_msi_irq(), as Cadence's: ``interrupt_num`` slots of ``entry_size``
        bytes at ``phys_addr`` become MSI (or MSI-X) writes to the RC.  Returns (data,
        offset): slot i rings when ``data | i`` is written at ``offset`` in it.

        Here the outbound region is an interrupt translation and the value written selects
        the vector.  Raises EpcError -EINVAL unless the RC enabled that many vectors."""
        pci = self._started()
        st = pci.msix_state() if msix else pci.msi_state()
        if st is None or not st.enabled or interrupt_num > st.vectors:
            raise EpcError(errno.EINVAL, f"{'MSI-X' if msix else 'MSI'} with "
                           f"{interrupt_num} vectors, RC state {st}")
        raise_irq = self.raise_msix if msix else self.raise_msi

        def write(offset: int, value: int) -> None:
            try:
                raise_irq(func_no, vfunc_no, (value & 0x7FF) + 1)
            except EpcError as e:
                log.warning("interrupt write %#x at +%#x not delivered: %s", value, offset, e)

        try:
            self.outbound.map_irq(phys_addr, interrupt_num * entry_size, write)
        except AddressError as e:
            raise EpcError(errno.EINVAL, str(e)) from None
        return 0, 0

    def set_msi(self, func_no: int, vfunc_no: int, nr_irqs: int) -> None:
        func = self.funcs[func_no]
        vectors = 1 << (nr_irqs - 1).bit_length()
        self._frozen("MSI", func.msi_interrupts, vectors)
        func.msi_interrupts = vectors

    def get_msi(self, func_no: int, vfunc_no: int) -> int:
        st = self.pci.msi_state() if self.pci else None
        if st is None or not st.enabled:
            return -errno.EINVAL
        return st.vectors

    def set_msix(self, func_no: int, vfunc_no: int, nr_irqs: int, bar: int,
                 offset: int) -> None:
        func = self.funcs[func_no]
        self._frozen("MSI-X", func.msix, (nr_irqs, bar, offset))
        func.msix = (nr_irqs, bar, offset)

    def get_msix(self, func_no: int, vfunc_no: int) -> int:
        st = self.pci.msix_state() if self.pci else None
        if st is None or not st.enabled:
            return -errno.EINVAL
        return st.vectors

    def raise_intx(self, func_no: int, vfunc_no: int) -> None:
        pci = self._started()
        pci.set_intx(True)
        pci.set_intx(False)

    def raise_msi(self, func_no: int, vfunc_no: int, interrupt_num: int) -> None:
        if not self._started().raise_msi(interrupt_num - 1):
            raise EpcError(errno.EINVAL, f"MSI {interrupt_num} not raised")

    def raise_msix(self, func_no: int, vfunc_no: int, interrupt_num: int) -> None:
        if not self._started().raise_msix(interrupt_num - 1):
            raise EpcError(errno.EINVAL, f"MSI-X {interrupt_num} not raised")

    def get_aux_resources(self, func_no: int, vfunc_no: int) -> list[PciEpcAuxResource]:
        """dw_pcie_ep_get_aux_resources(): the eDMA interrupt-emulation doorbell, at its EP
        address and, when a reserved BAR shows the eDMA registers, pre-exposed there."""
        if self.edma is None:
            return []
        bar = self.profile.edma_bar
        return [PciEpcAuxResource("doorbell-mmio", self.edma_base + EMUL_DOORBELL_OFFSET, 4,
                                  bar, EMUL_DOORBELL_OFFSET if bar != NO_BAR else 0,
                                  self.edma.emul_virq, 0)]

    def start_doorbell(self, res: PciEpcAuxResource) -> None:
        """Arm the eDMA's interrupt-emulation doorbell ("write 0 to assert")."""
        if self.edma is None:
            raise EpcError(errno.ENODEV, "no embedded doorbell")
        self.edma_doorbell.add_event(res.data, res.irq)

    def dma_channel(self, direction: str, ch: int = 0) -> DmaChannel | None:
        """A private eDMA channel (dma_request_channel), None without an eDMA."""
        if self.edma is None:
            return None
        return DmaChannel(self.edma, self.edma_base, direction, ch)

    def outbound_window(self) -> tuple[int, int, int]:
        """(base, size, page) of the outbound aperture: what pci_epc_mem manages."""
        return self.outbound_base, OUTBOUND_SIZE, self.profile.region_align

    def start(self) -> PciDevice:
        """dw_pcie_ep_start(): freeze the config space and expose the device."""
        if self.pci is not None:
            return self.pci
        func = self.funcs[0]
        spec = PciDeviceSpec(
            header=func.header,
            bars=tuple(self._bar_specs(func)),
            msi_interrupts=func.msi_interrupts,
            msix_interrupts=func.msix[0] if func.msix else 0,
            msix=MsixPlacement(func.msix[1], func.msix[2],
                               func.msix[2] + 16 * func.msix[0]) if func.msix else None,
        )
        ram = self.soc.ram
        self.direct = {bar: ram.phys(b.phys_addr) for bar, b in func.bars.items()
                       if self._can_be_direct(bar, b)}
        self.holes = {bar: _doorbell_pages(func.bars[bar]) for bar in self.direct
                      if func.bars[bar].doorbell_addrs}
        self.pci = PciDevice(spec)
        self.pci.link_hooks.append(self._link_changed)
        self.pci.reset_hooks.append(lambda: self.on_reset())
        self.pci.background.append(self.soc.run)
        self._refresh_all_bars()
        self._fill_msix_table(func)
        return self.pci

    def _fill_msix_table(self, func: DwPcieEpFunc) -> None:
        """The MSI-X table as the EP reads it in its BAR: entry i the message RC_MSI_ADDR,
        data i, unmasked (see RC_MSI_ADDR: the RC's own table stays in its VMM).  A
        function that maps the table's addresses itself (pci-epf-ntb's doorbells) rings
        vector i by writing i there."""
        if func.msix is None or func.msix[1] not in func.bars:
            return
        count, bar, offset = func.msix
        table = b"".join(struct.pack("<IIII", RC_MSI_ADDR, 0, i, 0) for i in range(count))
        addr = func.bars[bar].phys_addr + offset
        try:
            views = self.soc.space.views(addr, len(table))
        except AddressError as e:
            log.warning("MSI-X table at %#x not filled: %s", addr, e)
            return
        if views is None:
            log.warning("MSI-X table at %#x not filled: not memory", addr)
            return
        pos = 0
        for v in views:
            v[:] = table[pos : pos + len(v)]
            pos += len(v)

    def _rc_msi_write(self, offset: int, value: int) -> None:
        """A write the outbound iATU took to the RC's MSI window: the MSI-X vector its data
        names (the message _fill_msix_table gave it), as the RC's interrupt controller."""
        pci = self.pci
        if pci is None or offset != 0 or not pci.raise_msix(value):
            self._unraised.warning("write of %#x to the RC's MSI window +%#x raises no "
                                   "MSI-X vector", value, offset)

    def _link_changed(self, up: bool) -> None:
        """An RC attached or left: what the outbound aperture shows of its memory changed,
        and will change whenever it maps or unmaps memory."""
        host = self.pci.host if self.pci else None
        self._bme_told = False
        if up and host is not None:
            host.dma.on_change.append(self.outbound.changed)
        self.outbound.changed()
        self.on_link(up)

    # -- direct BARs ------------------------------------------------------------------
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
        ram = self.soc.ram
        aperture = self.direct[bar]
        offset = 0
        for ep_addr, n in pieces:
            for page in range(ep_addr, ep_addr + n, PAGE):
                phys = aperture + offset + page - ep_addr
                if ram.contains(page, PAGE):
                    ram.place(page, PAGE, phys)
                else:
                    ram.evict(phys, PAGE)
            offset += n

    def _shown_pages(self, bar: int) -> list[int]:
        """EP addresses of the pages currently shown by direct BAR ``bar``."""
        return [r.ep_addr + off for r in self.inbound.regions.get(bar, [])
                for off in range(0, r.size, PAGE)]

    def _can_be_direct(self, bar: int, b: PciEpfBar) -> bool:
        regions = self.inbound.regions.get(bar, [])
        return (len(regions) == 1 and not b.phys_addr % PAGE
                and b.size >= DIRECT_MIN_SIZE and self.soc.ram.contains(b.phys_addr, b.size)
                and not any(w.start < b.phys_addr + b.size and b.phys_addr < w.end
                            for w in self.soc.space.watches))

    def _bar_specs(self, func: DwPcieEpFunc) -> list[BarSpec]:
        specs = []
        for bar, b in sorted(func.bars.items()):
            specs.append(BarSpec(bar, b.size, is_64bit=bool(b.flags & PCI_BASE_ADDRESS_MEM_TYPE_64),
                                 prefetch=bool(b.flags & PCI_BASE_ADDRESS_MEM_PREFETCH),
                                 is_io=bool(b.flags & PCI_BASE_ADDRESS_SPACE_IO)))
        if self.profile.edma_bar != NO_BAR and self.edma:
            specs.append(BarSpec(self.profile.edma_bar, EDMA_REGS_SIZE))
            self.inbound.program(self.profile.edma_bar, [(self.edma_base, EDMA_REGS_SIZE)])
        return specs

    def _frozen(self, what: str, old: object, new: object) -> None:
        """Capabilities are fixed once QEMU has read the config space."""
        if self.pci is not None and old != new:
            raise EpcError(errno.EBUSY, f"{what} cannot change after start ({old} -> {new})")

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


def _doorbell_pages(bar: PciEpfBar) -> set[int]:
    """BAR offsets of the pages where the BAR's doorbell registers land when it is pointed at
    them (pci_epf_align_inbound_addr: base aligned to the BAR size)."""
    return {(addr & (bar.size - 1)) & ~(PAGE - 1) for addr in bar.doorbell_addrs}


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
