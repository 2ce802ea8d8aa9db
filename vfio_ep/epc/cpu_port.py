"""The controller as the EP's CPU sees it, for an EP guest running Linux's own functions.

``vfio-ep run --ep-guest`` moves the function side into a second guest: its kernel runs
pci-epf-test (or vNTB, NTB, nvmet) on this controller through the EPC driver in
``qemu/kernel/epc``.  That guest's QEMU attaches :attr:`EpcCpuPort.pci` over
vfio-user: a PCI function whose registers carry ``pci_epc_ops`` (a command, its arguments,
its errno) and events (link, PERST#), whose BAR0 also shows the eDMA block, and whose BAR2
is the outbound aperture.  The register interface is declared once, in the driver's header
(``vfio-ep-epc.h``), whose ``#define``s this module reads.

The SoC around the controller becomes the EP guest: its RAM is the SoC's DRAM on the bus
(below ``VEPC_BUS_RAM_END``, reached through the guest's vfio-user DMA mappings), so BARs
its kernel allocates (``pci_epf_alloc_space``) translate there, and the eDMA copies between
it and RC memory.  Such BARs are never mapped directly by the RC's QEMU (their translation
may change, and only vfio-ep can follow it); the C fast path serves them from the EP guest's
memory.  Every value the guest writes is checked as the RC side's are: a wrong one is an
errno in ``VEPC_CMD_STATUS`` and a log line, never an exception in the server.
"""

from __future__ import annotations

import collections
import errno
import logging
import re
from pathlib import Path

from vfio_ep.config import attributes
from vfio_ep.epc.address_space import AddressError, Aperture, ApertureWindow, EpAddressSpace
from vfio_ep.epc.bar import PciEpfBar, PciEpfBarSubmap
from vfio_ep.epc.core import EpcError, EpcEvents, IrqType, PciEpc
from vfio_ep.epc.dw import DwPcieEp, PciEpcAuxResource
from vfio_ep.epc.edma import EDMA_REGS_SIZE, EMUL_DOORBELL_OFFSET
from vfio_ep.epc.features import NO_BAR
from vfio_ep.epc.irq import IRQ_HANDLED, IRQF_SHARED
from vfio_ep.memory import ForeignMemory, SharedMemory
from vfio_ep.pci.bar import NUM_BARS, BarSpec, MmioHandler, Window, WindowKind
from vfio_ep.pci.device import MsixPlacement, PciDevice, PciDeviceSpec, PciHeader
from vfio_ep.pci.host import Host, RcBusError, RcMemory
from vfio_ep.qemu_dir import EPC_HEADER
from vfio_ep.ratelimit import Repeats

log = logging.getLogger(__name__)


def header_defines(path: Path) -> dict[str, int]:
    """The ``#define NAME NUMBER`` lines of a C header (the driver's register interface)."""
    pattern = re.compile(r"^#define\s+(\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", re.MULTILINE)
    return {name: int(value, 0) for name, value in pattern.findall(path.read_text())}


_H = header_defines(EPC_HEADER)
VENDOR_ID, DEVICE_ID = _H["VEPC_PCI_VENDOR_ID"], _H["VEPC_PCI_DEVICE_ID"]
REGS_BAR, REGS_SIZE, OB_BAR = _H["VEPC_REGS_BAR"], _H["VEPC_REGS_SIZE"], _H["VEPC_OB_BAR"]
MAGIC, MAGIC_VALUE = _H["VEPC_MAGIC"], _H["VEPC_MAGIC_VALUE"]
VERSION, VERSION_VALUE = _H["VEPC_VERSION"], _H["VEPC_VERSION_VALUE"]
NAME, NAME_SIZE = _H["VEPC_NAME"], _H["VEPC_NAME_SIZE"]
FEATURES, ALIGN = _H["VEPC_FEATURES"], _H["VEPC_ALIGN"]
BAR_DESC, BAR_DESC_STRIDE = _H["VEPC_BAR_DESC"], _H["VEPC_BAR_DESC_STRIDE"]
BAR_TYPE, BAR_ONLY_64BIT = _H["VEPC_BAR_TYPE"], _H["VEPC_BAR_ONLY_64BIT"]
BAR_FIXED_SIZE = _H["VEPC_BAR_FIXED_SIZE"]
BUS_RAM_END = _H["VEPC_BUS_RAM_END"]
OB_BUS_ADDR, OB_PAGE_SIZE = _H["VEPC_OB_BUS_ADDR"], _H["VEPC_OB_PAGE_SIZE"]
EDMA_BUS_ADDR, EDMA_CHANNELS = _H["VEPC_EDMA_BUS_ADDR"], _H["VEPC_EDMA_CHANNELS"]
EDMA_BAR, REG_NO_BAR = _H["VEPC_EDMA_BAR"], _H["VEPC_NO_BAR"]
DMA_CHANNELS = _H["VEPC_DMA_CHANNELS"]
# The controller's dma_channels, as the driver reads it
DMA_KINDS = {"memcpy": _H["VEPC_DMA_MEMCPY"], "slave": _H["VEPC_DMA_SLAVE"],
             "dw-edma": _H["VEPC_DMA_DW_EDMA"]}
CMD, CMD_STATUS, CMD_RESULT = _H["VEPC_CMD"], _H["VEPC_CMD_STATUS"], _H["VEPC_CMD_RESULT"]
CMD_FUNC, CMD_ARG, CMD_ARGS = _H["VEPC_CMD_FUNC"], _H["VEPC_CMD_ARG"], _H["VEPC_CMD_ARGS"]
SUBMAP, SUBMAP_STRIDE, SUBMAP_MAX = (_H["VEPC_SUBMAP"], _H["VEPC_SUBMAP_STRIDE"],
                                     _H["VEPC_SUBMAP_MAX"])
EVENT, LINK = _H["VEPC_EVENT"], _H["VEPC_LINK"]
EV_NONE, EV_LINK_UP, EV_LINK_DOWN = (_H["VEPC_EV_NONE"], _H["VEPC_EV_LINK_UP"],
                                     _H["VEPC_EV_LINK_DOWN"])
EV_DEINIT, EV_INIT = _H["VEPC_EV_DEINIT"], _H["VEPC_EV_INIT"]
EVENT_NAMES = {EV_LINK_UP: "link up", EV_LINK_DOWN: "link down",
               EV_DEINIT: "PERST# asserted (deinit)", EV_INIT: "PERST# deasserted (init)"}
EDMA_OFFSET, EDMA_SIZE = _H["VEPC_EDMA_OFFSET"], _H["VEPC_EDMA_SIZE"]
MSIX_TABLE, MSIX_PBA = _H["VEPC_MSIX_TABLE"], _H["VEPC_MSIX_PBA"]
VEC_EVENT, VEC_EDMA, VEC_DOORBELL = (_H["VEPC_VEC_EVENT"], _H["VEPC_VEC_EDMA"],
                                     _H["VEPC_VEC_DOORBELL"])
NR_VECTORS = _H["VEPC_NR_VECTORS"]

OPS = {_H[f"VEPC_OP_{op}"]: op for op in (
    "WRITE_HEADER", "SET_BAR", "CLEAR_BAR", "MAP_ADDR", "UNMAP_ADDR", "SET_MSI", "GET_MSI",
    "SET_MSIX", "GET_MSIX", "RAISE_IRQ", "MAP_MSI_IRQ", "START", "STOP")}
FEATURE_BITS = ("LINKUP_NOTIFIER", "DYNAMIC_INBOUND_MAPPING", "SUBRANGE_MAPPING",
                "MSI_CAPABLE", "MSIX_CAPABLE", "INTX_CAPABLE")
# Registers the driver writes: the command's function and arguments, set_bar's pieces.
WRITABLE = ((CMD_FUNC, CMD_ARG + 8 * CMD_ARGS), (SUBMAP, SUBMAP + SUBMAP_STRIDE * SUBMAP_MAX))
EVENT_QUEUE = 64  # events the guest has not read yet (it reads them as they come)
PCI_CLASS_SYSTEM_OTHER = 0x0880
U64 = (1 << 64) - 1

if EDMA_SIZE != EDMA_REGS_SIZE:  # the header and the eDMA model must agree
    raise ImportError(f"{EPC_HEADER}: VEPC_EDMA_SIZE {EDMA_SIZE:#x} is not the eDMA's "
                      f"{EDMA_REGS_SIZE:#x}")


class GuestRam(Aperture):
    """The EP guest's RAM on the SoC bus [0, BUS_RAM_END): the Aperture protocol over the
    guest's vfio-user DMA mappings (none while no EP guest is attached).

    Without an EP guest the RC still reaches its BARs, which translate here: as over a link
    that went down, its reads return all ones and its writes go nowhere (logged once), so an
    RC driver sees a dead device rather than an error from its VMM.  The link stays down
    (``linked`` False) from the EP guest leaving until its successor starts the controller:
    the successor's RAM is not the RC's to read while it boots, whatever the BARs still
    translate to, as a rebooting board's controller shows the RC nothing until it trains
    the link again.

    One EP guest may hold several controllers of the SoC (pci-epf-ntb's two): each device's
    connection maps the same RAM, and any one attached serves it (:meth:`attach`)."""

    def __init__(self) -> None:
        self.memory: RcMemory | None = None
        self.linked = True
        self._told = False
        self._mappings: dict[str, RcMemory] = {}

    @classmethod
    def on(cls, space: EpAddressSpace) -> GuestRam:
        """The SoC's guest RAM on its bus, put there by its first controller's port."""
        found = space.aperture_at(0, BUS_RAM_END)
        if found is not None and isinstance(found[1], GuestRam):
            return found[1]
        ram = cls()
        space.add_aperture(0, BUS_RAM_END, ram)
        return ram

    def attach(self, controller: str, memory: RcMemory | None) -> None:
        """``controller``'s device got the EP guest's DMA mappings (None: it left)."""
        if memory is None:
            self._mappings.pop(controller, None)
        else:
            self._mappings[controller] = memory
        self.memory = next(iter(self._mappings.values()), None)

    def _mem(self) -> RcMemory:
        if self.memory is None:
            raise AddressError("EP guest RAM: no EP guest attached")
        return self.memory

    async def read(self, offset: int, size: int) -> bytes:
        try:
            return await self._mem().read(offset, size)
        except RcBusError as e:
            raise AddressError(f"EP guest RAM: {e}") from None

    async def write(self, offset: int, data: bytes | memoryview) -> None:
        try:
            await self._mem().write(offset, data)
        except RcBusError as e:
            raise AddressError(f"EP guest RAM: {e}") from None

    def views(self, offset: int, size: int) -> list[memoryview] | None:
        try:
            return self._mem().views(offset, size)
        except RcBusError as e:
            raise AddressError(f"EP guest RAM: {e}") from None

    def read_sync(self, offset: int, size: int) -> bytes:
        if self._gone():
            return b"\xff" * size
        return b"".join(bytes(v) for v in self._shared(offset, size))

    def write_sync(self, offset: int, data: bytes) -> None:
        if self._gone():
            return
        pos = 0
        for v in self._shared(offset, len(data)):
            v[:] = data[pos : pos + len(v)]
            pos += len(v)

    def _gone(self) -> bool:
        """No EP guest, or none that started the controller since: the RC's access is
        answered as a dead link's (said once)."""
        if self.memory is not None and self.linked:
            self._told = False
            return False
        if not self._told:
            self._told = True
            log.warning("the RC reaches EP guest RAM while no EP guest has the controller "
                        "started: reads return all ones, writes are dropped")
        return True

    def _shared(self, offset: int, size: int) -> list[memoryview]:
        views = self.views(offset, size)
        if views is None:
            raise AddressError(f"EP guest RAM [{offset:#x}+{size:#x}) is not shared memory")
        return views

    def shared_extents(self, offset: int, size: int) -> list[tuple[int, int, ForeignMemory | None]]:
        """Where the range is shared guest memory, that memory (the C fast path serves a
        BAR translating there); None where it is not, or while the link is down."""
        if not self.linked:
            return [(offset, size, None)]
        try:
            views = self.views(offset, size)
        except AddressError:
            views = None
        if not views:
            return [(offset, size, None)]
        out: list[tuple[int, int, ForeignMemory | None]] = []
        for v in views:
            out.append((offset, len(v), ForeignMemory(v)))
            offset += len(v)
        return out


class EpcCpuPort(MmioHandler, EpcEvents):
    """``controllers/<name>`` seen from the EP guest's CPU: its PCI device, its registers
    (an MmioHandler), and the core's events it passes on (an EpcEvents)."""

    def __init__(self, epc: PciEpc, name: str, dma_channels: str = "memcpy") -> None:
        if not isinstance(epc.ops, DwPcieEp):
            raise TypeError("an EP guest drives the DesignWare-like controller")
        raw = name.encode()
        if not 0 < len(raw) < NAME_SIZE or "/" in name:
            raise ValueError(f"controller name {name!r}: 1-{NAME_SIZE - 1} bytes, no '/' "
                             "(it becomes the EP guest's configfs controllers/<name>)")
        self.epc = epc
        self.dw: DwPcieEp = epc.ops
        self.name = name
        self._refused = Repeats(log)  # a function's retries: nvmet-pci-epf's raises, say
        self.guest_ram = GuestRam.on(epc.space)
        self.regs = bytearray(EDMA_OFFSET)
        self.events: collections.deque[int] = collections.deque(maxlen=EVENT_QUEUE)
        self._fill_identity(raw)
        self._put(DMA_CHANNELS, 4, DMA_KINDS[dma_channels])
        # Under Linux's dw-edma the emulation doorbell asserts the eDMA's own interrupt,
        # which dw-edma's handler hands to the doorbell's IRQ; else it has its own vector.
        self._doorbell_vector = VEC_EDMA if dma_channels == "dw-edma" else VEC_DOORBELL
        self.pci = self._device()
        self._refresh_aperture()
        self.dw.outbound.on_change.append(self._refresh_aperture)
        self.pci.link_hooks.append(self._ep_guest_link)
        self.pci.background.append(epc.soc.run)
        self._wire_edma()
        epc.add_epf(self)

    # -- construction --------------------------------------------------------------
    def _fill_identity(self, raw: bytes) -> None:
        """The registers the driver reads once: identity, features, the SoC's addresses."""
        f = self.epc.get_features()
        self._put(MAGIC, 4, MAGIC_VALUE)
        self._put(VERSION, 4, VERSION_VALUE)
        self.regs[NAME : NAME + len(raw)] = raw
        bits = sum(_H[f"VEPC_F_{b}"] for b in FEATURE_BITS if getattr(f, b.lower(), False))
        self._put(FEATURES, 4, bits)
        self._put(ALIGN, 4, f.align)
        for bar, desc in enumerate(f.bar):
            base = BAR_DESC + bar * BAR_DESC_STRIDE
            self._put(base + BAR_TYPE, 4, desc.type)
            self._put(base + BAR_ONLY_64BIT, 4, int(desc.only_64bit))
            self._put(base + BAR_FIXED_SIZE, 8, desc.fixed_size)
        base, _, page = self.dw.outbound_window()
        self._put(OB_BUS_ADDR, 8, base)
        self._put(OB_PAGE_SIZE, 4, page)
        edma = self.dw.edma is not None
        self._put(EDMA_BUS_ADDR, 8, self.dw.edma_base)
        self._put(EDMA_CHANNELS, 4, self.dw.profile.edma_channels if edma else 0)
        self._put(EDMA_BAR, 4, REG_NO_BAR if self.dw.profile.edma_bar == NO_BAR
                  else self.dw.profile.edma_bar)

    def _device(self) -> PciDevice:
        _, ob_size, _ = self.dw.outbound_window()
        spec = PciDeviceSpec(
            header=PciHeader(vendorid=VENDOR_ID, deviceid=DEVICE_ID,
                             subclass_code=PCI_CLASS_SYSTEM_OTHER & 0xFF,
                             baseclass_code=PCI_CLASS_SYSTEM_OTHER >> 8, interrupt_pin=0),
            # The aperture is prefetchable (reads have no side effects) so that, 1 GiB large,
            # it goes to the bridge's 64-bit window above 4 GiB.
            bars=(BarSpec(REGS_BAR, REGS_SIZE),
                  BarSpec(OB_BAR, ob_size, is_64bit=True, prefetch=True)),
            msi_interrupts=0,
            msix_interrupts=NR_VECTORS,
            msix=MsixPlacement(REGS_BAR, MSIX_TABLE, MSIX_PBA),
        )
        pci = PciDevice(spec)
        pci.windows_add_mmio(REGS_BAR, 0, EDMA_OFFSET, self)
        if self.dw.edma is not None:
            pci.windows_add_mmio(REGS_BAR, EDMA_OFFSET, EDMA_SIZE, self.dw.edma)
        # The MSI-X table is QEMU's; the PBA reads back our (never pending) memory.
        msix = SharedMemory("vfio-ep-epc-msix", REGS_SIZE - MSIX_TABLE)
        pci.windows.add(Window(REGS_BAR, MSIX_TABLE, REGS_SIZE, WindowKind.RAM, msix))
        return pci

    def _refresh_aperture(self) -> None:
        """BAR2 as the outbound iATU maps it: RC memory the C fast path reads and writes
        itself where a region reaches shared RC memory (memcpy_fromio's 4-byte reads would
        each wait for Python otherwise), trapped for Python elsewhere (interrupt regions,
        nothing mapped: a bus error the access reports)."""
        outbound = self.dw.outbound
        rows = [Window(OB_BAR, off, off + n, WindowKind.RAM, mem) if mem else
                Window(OB_BAR, off, off + n, WindowKind.MMIO, ApertureWindow(outbound, off))
                for off, n, mem in outbound.shared_extents(0, outbound.size)]
        self.pci.windows.replace_bar(OB_BAR, rows)

    def _wire_edma(self) -> None:
        """The eDMA's interrupts become MSI-X vectors of the EP guest, and its
        interrupt-emulation register a doorbell the RC can ring (any time, as on the
        hardware: "write 0 to assert")."""
        edma = self.dw.edma
        if edma is None:
            return
        irqs = self.epc.irqs
        irqs.request_irq(edma.virq, lambda virq, dev: self._forward(VEC_EDMA), IRQF_SHARED,
                         "vfio-ep-epc-edma", self)
        irqs.request_irq(edma.emul_virq, lambda virq, dev: self._forward(self._doorbell_vector),
                         IRQF_SHARED, "vfio-ep-epc-doorbell", self)
        self.dw.start_doorbell(PciEpcAuxResource(
            "doorbell-mmio", self.dw.edma_base + EMUL_DOORBELL_OFFSET, 4, NO_BAR, 0,
            edma.emul_virq, 0))

    def _forward(self, vector: int) -> int:
        self.pci.raise_msix(vector)
        return IRQ_HANDLED

    # -- the EP guest attaching and leaving ------------------------------------------
    def _ep_guest_link(self, up: bool) -> None:
        """A new EP guest starts afresh: no events of the one before; its RAM is the SoC's.
        One that left took the SoC down with it: the outbound iATU and the eDMA reset (its
        successor maps afresh), the link is down until the successor starts the controller;
        the BARs keep translating, to RAM that is gone for now."""
        host: Host | None = self.pci.host
        self.events.clear()
        self.guest_ram.attach(self.name, host.dma if up and host is not None else None)
        if up and host is not None:
            host.dma.on_change.append(self.epc.space.changed)
        else:
            self.guest_ram.linked = False
            self.dw.outbound.clear()
            if self.dw.edma is not None:
                self.dw.edma.stop_all()
        self.epc.space.changed()
        log.info("%s: EP guest %s", self.name, "attached" if up else "gone")

    # -- EpcEvents: what the core tells a bound function goes to the EP guest ---------
    def epc_init(self) -> None:
        self._event(EV_INIT)

    def epc_deinit(self) -> None:
        self._event(EV_DEINIT)

    def link_up(self) -> None:
        self._event(EV_LINK_UP)

    def link_down(self) -> None:
        self._event(EV_LINK_DOWN)

    def _event(self, event: int) -> None:
        if self.pci.host is None:
            return  # no EP guest: its driver starts from the controller's state
        log.info("%s: the EP guest is told %s", self.name, EVENT_NAMES[event])
        if len(self.events) == self.events.maxlen:
            log.warning("%s: the EP guest reads no events; the oldest is dropped", self.name)
        self.events.append(event)
        self.pci.raise_msix(VEC_EVENT)

    # -- MmioHandler -------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset == EVENT and size == 4:
            return self.events.popleft() if self.events else EV_NONE
        if offset == LINK and size == 4:
            rc = self.epc.pci
            return int(rc is not None and rc.host is not None)
        return int.from_bytes(self.regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == CMD and size == 4:
            self._run(value)
            return
        if not any(lo <= offset and offset + size <= hi for lo, hi in WRITABLE):
            log.warning("%s: EP guest wrote %#x to read-only register %#x", self.name, value,
                        offset)
            return
        self._put(offset, size, value)

    def _put(self, offset: int, size: int, value: int) -> None:
        self.regs[offset : offset + size] = value.to_bytes(size, "little")

    def _u64(self, offset: int) -> int:
        return int.from_bytes(self.regs[offset : offset + 8], "little")

    # -- commands ----------------------------------------------------------------------
    def _run(self, op: int) -> None:
        """Run command ``op``; its errno (or 0) in CMD_STATUS, its result in CMD_RESULT."""
        name = OPS.get(op)
        status, result = 0, 0
        try:
            if name is None:
                raise EpcError(errno.EOPNOTSUPP, f"unknown command {op}")
            result = self._op(name)
        except (EpcError, ValueError) as e:  # ConfigError: an attribute refused
            status = -(e.errno if isinstance(e, EpcError) else errno.EINVAL)
            self._refused.warning("%s: %s from the EP guest refused: %s", self.name,
                                  name or op, e)
        except Exception:
            status = -errno.EIO
            log.exception("%s: %s from the EP guest failed", self.name, name or op)
        self._put(CMD_STATUS, 4, status & 0xFFFFFFFF)
        self._put(CMD_RESULT, 8, result & U64)

    def _op(self, name: str) -> int:
        """One pci_epc_ops call with the arguments in the registers; its result."""
        func = int.from_bytes(self.regs[CMD_FUNC : CMD_FUNC + 4], "little")
        fn, vfn = func & 0xFF, func >> 8 & 0xFF
        a = [self._u64(CMD_ARG + 8 * i) for i in range(CMD_ARGS)]
        epc = self.epc
        match name:
            case "WRITE_HEADER":
                epc.write_header(fn, vfn, _header(a[0], a[1]))
            case "SET_BAR":
                epc.set_bar(fn, vfn, self._epf_bar(a))
            case "CLEAR_BAR":
                epc.clear_bar(fn, vfn, PciEpfBar(_barno(a[0])))
            case "MAP_ADDR":
                epc.map_addr(fn, vfn, a[0], a[1], a[2])
            case "UNMAP_ADDR":
                epc.unmap_addr(fn, vfn, a[0])
            case "SET_MSI":
                epc.set_msi(fn, vfn, a[0])
            case "GET_MSI":
                return _count(epc.get_msi(fn, vfn))
            case "SET_MSIX":
                epc.set_msix(fn, vfn, a[0], _barno(a[1]), a[2])
            case "GET_MSIX":
                return _count(epc.get_msix(fn, vfn))
            case "RAISE_IRQ":
                epc.raise_irq(fn, vfn, IrqType(a[0]), a[1])
            case "MAP_MSI_IRQ":
                data, offset = epc.map_msi_irq(fn, vfn, a[0], a[1], a[2])
                return data | offset << 32
            case "START":
                self._start()
            case "STOP":
                log.info("%s: stop (the link stays up: the RC keeps its device)", self.name)
        return 0

    def _epf_bar(self, a: list[int]) -> PciEpfBar:
        nsub = a[4]
        if nsub > SUBMAP_MAX:
            raise EpcError(errno.EINVAL, f"{nsub} submap pieces, at most {SUBMAP_MAX}")
        submap = [PciEpfBarSubmap(self._u64(SUBMAP + i * SUBMAP_STRIDE),
                                  self._u64(SUBMAP + i * SUBMAP_STRIDE + 8))
                  for i in range(nsub)]
        flags = a[1] & 0xFFFFFFFF
        return PciEpfBar(_barno(a[0]), phys_addr=a[3], size=a[2], flags=flags, submap=submap)

    def _start(self) -> None:
        """pci_epc_start(): the RC's device exists from now on; an RC already attached (the
        EP guest came back) is a link that is up."""
        rc = self.epc.start()
        if not self.guest_ram.linked:
            self.guest_ram.linked = True
            self.epc.space.changed()
        if rc.host is not None:
            self.link_up()


def _barno(value: int) -> int:
    if not 0 <= value < NUM_BARS:
        raise EpcError(errno.EINVAL, f"BAR {value} does not exist")
    return value


def _count(value: int) -> int:
    """get_msi/get_msix: a vector count, or the -EINVAL the core returns (MSI disabled)."""
    if value < 0:
        raise EpcError(-value, "not enabled by the RC")
    return value


def _header(a0: int, a1: int) -> PciHeader:
    """VEPC_OP_WRITE_HEADER's two arguments, as vepc_write_header() packs them, checked as
    the header's attributes are (an interrupt pin QEMU refuses is -EINVAL)."""
    values = dict(vendorid=a0 & 0xFFFF, deviceid=a0 >> 16 & 0xFFFF, revid=a0 >> 32 & 0xFF,
                  progif_code=a0 >> 40 & 0xFF, subclass_code=a0 >> 48 & 0xFF,
                  baseclass_code=a0 >> 56 & 0xFF, cache_line_size=a1 & 0xFF,
                  subsys_vendor_id=a1 >> 8 & 0xFFFF, subsys_id=a1 >> 24 & 0xFFFF,
                  interrupt_pin=a1 >> 40 & 0xFF)
    return attributes(PciHeader, values, "the EP guest's header")
