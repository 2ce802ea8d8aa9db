"""A DesignWare eDMA (v0, unrolled register map) and the dmaengine view of it.

The register block sits at an EP address like on the SoC.  Write channels
move EP memory to RC (PCI) addresses, read channels RC to EP; a channel is
started by writing its number to the direction's doorbell register, and
moves either what its SAR/DAR/transfer size registers say (non-linked-list
mode, what our own drivers program) or, with LLE in CH_CONTROL1, the linked
list at its LLP in EP memory (what Linux's dw-edma programs): data elements
while their cycle bit matches the channel's consumer cycle state (CCS), link
elements followed (toggling CCS with TCB), stopping at the first element the
producer has not handed over.  A data element with LIE, or a non-LL transfer,
sets the DONE (or ABORT) status bit and raises the eDMA interrupt unless
masked.  CTRL reports the channels per direction, as dw_edma_probe() reads.

Interrupt emulation: as in Linux 7.3.4 (dw-edma-v0-core.c), any write to
``rd_int_status`` asserts a dedicated "dw-edma-emul" interrupt without
touching the status bits, and a zero write to ``int_clear`` acknowledges
it.  That register is what the "embedded" doorbell backend hands out.

Emulator extension: CH_CONTROL2 bit 0 (``CTRL2_LOCAL_COPY``) makes both SAR
and DAR EP addresses, a memcpy channel (dw-edma has none; pci-epf-test's
COPY with DMA needs one).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

import trio
from construct import Int32ul, Struct

from vfio_ep.bulk import BusMemory, move
from vfio_ep.epc.address_space import AddressError, EpAddressSpace
from vfio_ep.epc.irq import IRQ_HANDLED, IRQ_NONE, IRQF_SHARED, Cancellable, IrqDomain, Spawn
from vfio_ep.pci.host import RcBusError, RcMemory

log = logging.getLogger(__name__)

EDMA_REGS_SIZE = 0x2000
MAX_CHANNELS = 8

# Global registers (struct dw_edma_v0_regs).
CTRL = 0x08  # read-only: write channels in bits 3:0, read channels in bits 19:16
CTRL_RD_CH_SHIFT = 16
WR_ENGINE_EN = 0x0C
WR_DOORBELL = 0x10
RD_ENGINE_EN = 0x2C
RD_DOORBELL = 0x30
WR_INT_STATUS = 0x4C
WR_INT_MASK = 0x54
WR_INT_CLEAR = 0x58
RD_INT_STATUS = 0xA0
RD_INT_MASK = 0xA8
RD_INT_CLEAR = 0xAC
# Unrolled per-channel registers: write channel at CH_BASE + n*CH_STRIDE, read at +RD_OFFSET.
CH_BASE = 0x200
CH_STRIDE = 0x200
RD_OFFSET = 0x100
CH_CONTROL1 = 0x00
CH_CONTROL2 = 0x04
TRANSFER_SIZE = 0x08
SAR_LO = 0x0C
SAR_HI = 0x10
DAR_LO = 0x14
DAR_HI = 0x18
LLP_LO = 0x1C
LLP_HI = 0x20

DOORBELL_CH_MASK = 0x7
DOORBELL_STOP = 1 << 31
DONE_INT = 0xFF
ABORT_SHIFT = 16
CH_STATUS_SHIFT = 5  # CH_CONTROL1 bits 6:5
CH_RUNNING, CH_HALTED, CH_STOPPED = 1, 2, 3
CTRL2_LOCAL_COPY = 1 << 0
# CH_CONTROL1 and linked-list element control bits (dw-edma-v0-core.c, enum dw_edma_control)
LL_CB, LL_TCB, LL_LLP, LL_LIE, LL_RIE = 1 << 0, 1 << 1, 1 << 2, 1 << 3, 1 << 4
CTRL1_CCS, CTRL1_LLE = 1 << 8, 1 << 9
# struct dw_edma_v0_lli: control, transfer_size, sar, dar; a link element (struct
# dw_edma_v0_llp) has its pointer where a data element has its SAR.
LLI = struct.Struct("<IIQQ")
# Link elements followed with no data element between them: past this the list loops.
MAX_LINK_HOPS = 16

# Offset of the interrupt-emulation doorbell (dw_edma_v0_core_db_offset()).
EMUL_DOORBELL_OFFSET = RD_INT_STATUS

ChannelRegs = Struct(
    "control1" / Int32ul, "control2" / Int32ul, "size" / Int32ul,
    "sar_lo" / Int32ul, "sar_hi" / Int32ul, "dar_lo" / Int32ul, "dar_hi" / Int32ul,
)
CH_REGS_SIZE = ChannelRegs.sizeof()


@dataclass
class Direction:
    """One direction's engine state: write (EP -> RC) or read (RC -> EP)."""

    name: str
    int_status: int = 0
    int_mask: int = 0
    engine_en: int = 0


class DwEdma:
    """The register block (an MmioHandler) and the engine behind it."""

    def __init__(self, space: EpAddressSpace, irqs: IrqDomain, spawn: Spawn,
                 channels: int, rc_dma: Callable[[], RcMemory | None]) -> None:
        self.space = space
        self.rc_dma = rc_dma
        self.spawn = spawn
        self.channels = min(channels, MAX_CHANNELS)
        self.regs = bytearray(EDMA_REGS_SIZE)
        self._put(CTRL, self.channels | self.channels << CTRL_RD_CH_SHIFT)
        self.dirs = {"wr": Direction("write"), "rd": Direction("read")}
        self.irqs = irqs
        self.virq = irqs.alloc("dw-edma")
        # dw_edma_emul_irqchip: handle_level_irq, acked by a zero write to INT_CLEAR.
        self.emul_virq = irqs.alloc("dw-edma-emul", ack=lambda: self.write(RD_INT_CLEAR, 4, 0))
        self._engines: dict[tuple[str, int], Cancellable] = {}  # (direction, ch) running
        # Linked-list channels rung while running: they look at the list again when done.
        self._rings: set[tuple[str, int]] = set()

    # -- MmioHandler -------------------------------------------------------
    # A read is a load of the registers or of a direction's status, each changed by one
    # statement (no register is half-updated between two): the connection's I/O thread may
    # answer it (MmioHandler).  A driver reads INT_STATUS on every transfer's interrupt;
    # answered there, it costs no wake-up of the event loop.
    read_in_io_thread = True

    def read(self, offset: int, size: int) -> int:
        if size == 4 and offset in (WR_INT_STATUS, RD_INT_STATUS):
            return self.dirs["wr" if offset == WR_INT_STATUS else "rd"].int_status
        return int.from_bytes(self.regs[offset : offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        if size != 4:
            self.regs[offset : offset + size] = value.to_bytes(size, "little")
            return
        wr, rd = self.dirs["wr"], self.dirs["rd"]
        match offset:
            case 0x4C | 0xA0:  # WR/RD_INT_STATUS: interrupt emulation
                self.irqs.handle(self.emul_virq)
            case 0x58 | 0xAC:  # WR/RD_INT_CLEAR (W1C; a zero write acks emulation)
                (wr if offset == WR_INT_CLEAR else rd).int_status &= ~value
            case 0x54 | 0xA8:
                (wr if offset == WR_INT_MASK else rd).int_mask = value
            case 0x0C | 0x2C:
                (wr if offset == WR_ENGINE_EN else rd).engine_en = value
            case 0x10 | 0x30:
                self._doorbell("wr" if offset == WR_DOORBELL else "rd", value)
            case 0x08:  # CTRL: the channel counts are the hardware's
                pass
            case _:
                self.regs[offset : offset + 4] = value.to_bytes(4, "little")

    # -- engine --------------------------------------------------------------
    def _ch_base(self, direction: str, ch: int) -> int:
        return CH_BASE + ch * CH_STRIDE + (RD_OFFSET if direction == "rd" else 0)

    def _get(self, offset: int, size: int = 4) -> int:
        return int.from_bytes(self.regs[offset : offset + size], "little")

    def _put(self, offset: int, value: int, size: int = 4) -> None:
        self.regs[offset : offset + size] = value.to_bytes(size, "little")

    def _set_ch_status(self, direction: str, ch: int, status: int) -> None:
        base = self._ch_base(direction, ch)
        ctrl = int.from_bytes(self.regs[base : base + 4], "little")
        ctrl = (ctrl & ~(0x3 << CH_STATUS_SHIFT)) | status << CH_STATUS_SHIFT
        self.regs[base : base + 4] = ctrl.to_bytes(4, "little")

    def _doorbell(self, direction: str, value: int) -> None:
        ch = value & DOORBELL_CH_MASK
        d = self.dirs[direction]
        if value & DOORBELL_STOP and ch < self.channels:
            self._stop(direction, ch)
            return
        if ch >= self.channels or not d.engine_en & 1:
            log.warning("eDMA %s doorbell %#x ignored (channel %d, engine %s)", d.name, value,
                        ch, "on" if d.engine_en & 1 else "off")
            return
        base = self._ch_base(direction, ch)
        if self._get(base) & CTRL1_LLE:
            if (direction, ch) in self._engines:  # it walks the list on from where it is
                self._rings.add((direction, ch))
                return
            self._set_ch_status(direction, ch, CH_RUNNING)
            self._engines[(direction, ch)] = self.spawn(
                lambda: self._run_list(direction, ch), f"edma-{direction}{ch}")
            return
        regs = ChannelRegs.parse(bytes(self.regs[base : base + CH_REGS_SIZE]))
        self._set_ch_status(direction, ch, CH_RUNNING)
        self._engines[(direction, ch)] = self.spawn(lambda: self._run(direction, ch, regs),
                                                    f"edma-{direction}{ch}")

    def stop_all(self) -> None:
        """Every running transfer halted, no interrupt (the SoC around the eDMA reset)."""
        for direction, ch in list(self._engines):
            self._stop(direction, ch)

    def _stop(self, direction: str, ch: int) -> None:
        """A doorbell write with STOP: the channel's transfer ends where it is, halted,
        without an interrupt (whoever stops it is not waiting for one), so that it can never
        complete into the channel's next transfer."""
        work = self._engines.pop((direction, ch), None)
        self._rings.discard((direction, ch))
        if work is not None:
            work.cancel()
            self._set_ch_status(direction, ch, CH_HALTED)

    async def _run(self, direction: str, ch: int, regs: dict[str, int]) -> None:
        sar = regs["sar_lo"] | regs["sar_hi"] << 32
        dar = regs["dar_lo"] | regs["dar_hi"] << 32
        size = regs["size"]
        local_copy = bool(regs["control2"] & CTRL2_LOCAL_COPY)
        ok = True
        try:
            # wr: EP -> RC, rd: RC -> EP, local copy: EP -> EP (SAR and DAR both local).
            src: BusMemory = self.space if direction == "wr" or local_copy else self._rc()
            dst: BusMemory = self.space if direction == "rd" or local_copy else self._rc()
            await move(dst, dar, src, sar, size)
        except (AddressError, RcBusError) as e:
            ok = False
            log.warning("eDMA %s channel %d aborted: %s", self.dirs[direction].name, ch, e)
        # A STOP meanwhile (or before the engine ran at all) halted the channel: no
        # completion, no interrupt, and nothing of a newer transfer's is touched.
        await trio.lowlevel.checkpoint_if_cancelled()
        self._engines.pop((direction, ch), None)
        self._set_ch_status(direction, ch, CH_STOPPED if ok else CH_HALTED)
        self._raise_done(direction, ch, ok)  # the engine's task ends here: handlers in place

    async def _run_list(self, direction: str, ch: int) -> None:
        """Linked-list mode: the list at the channel's LLP, element by element, LLP and CCS
        following in the channel's registers as they do on the hardware, so that a doorbell
        after a stop goes on from there (dw-edma's next chunk)."""
        base = self._ch_base(direction, ch)
        ok, hops = True, 0
        try:
            while True:
                llp, ctrl1 = self._get(base + LLP_LO, 8), self._get(base)
                ccs = bool(ctrl1 & CTRL1_CCS)
                control, size, sar, dar = LLI.unpack(await self.space.read(llp, LLI.size))
                if control & LL_LLP:
                    # A link: handed over when its cycle bit is the state after its toggle.
                    toggled = ccs != bool(control & LL_TCB)
                    if bool(control & LL_CB) != toggled:
                        break
                    hops += 1
                    if hops > MAX_LINK_HOPS:
                        raise AddressError(f"linked list at {llp:#x} loops through links")
                    self._put(base, ctrl1 ^ CTRL1_CCS if control & LL_TCB else ctrl1)
                    self._put(base + LLP_LO, sar, 8)
                    continue
                if bool(control & LL_CB) != ccs:  # not the producer's yet: stop here
                    if (direction, ch) not in self._rings:
                        break
                    self._rings.discard((direction, ch))
                    continue
                hops = 0
                local = self.space
                src: BusMemory = local if direction == "wr" else self._rc()
                dst: BusMemory = local if direction == "rd" else self._rc()
                await move(dst, dar, src, sar, size)
                self._put(base + LLP_LO, llp + LLI.size, 8)
                if control & LL_LIE:
                    self._raise_done(direction, ch, ok=True)
        except (AddressError, RcBusError) as e:
            ok = False
            log.warning("eDMA %s channel %d aborted: %s", self.dirs[direction].name, ch, e)
        await trio.lowlevel.checkpoint_if_cancelled()  # STOP meanwhile: halted already
        self._engines.pop((direction, ch), None)
        self._rings.discard((direction, ch))
        self._set_ch_status(direction, ch, CH_STOPPED if ok else CH_HALTED)
        if not ok:
            self._raise_done(direction, ch, ok=False)

    def _raise_done(self, direction: str, ch: int, ok: bool) -> None:
        """The channel's DONE (or ABORT) status bit, and the interrupt unless masked."""
        d = self.dirs[direction]
        bit = 1 << ch if ok else 1 << (ch + ABORT_SHIFT)
        d.int_status |= bit
        if not d.int_mask & bit:
            self.irqs.handle_now(self.virq)

    def _rc(self) -> RcMemory:
        dma = self.rc_dma()
        if dma is None:
            raise AddressError("eDMA: no RC attached (link down)")
        return dma


class DmaChannel:
    """A dmaengine channel on the eDMA: what pci-epf-test's DMA path drives.

    It programs the registers through the EP address space, exactly as the
    dw-edma driver would over its MMIO mapping, and sleeps until the eDMA
    interrupt reports this channel done or aborted.
    """

    def __init__(self, edma: DwEdma, regs_base: int, direction: str, ch: int) -> None:
        self.edma = edma
        self.base = regs_base
        self.direction = direction
        self.ch = ch
        self._done: trio.Event | None = None
        self._result = False
        self._lock = trio.Lock()
        edma.irqs.request_irq(edma.virq, self._interrupt, IRQF_SHARED, f"dma{direction}{ch}",
                              self)

    def release(self) -> None:
        """dmaengine_terminate_sync() + dma_release_channel(): a transfer still waiting
        returns as aborted (the engine's late completion finds no one)."""
        if self._done is not None:
            self._result = False
            self._done.set()
        # dw_edma_device_terminate_all(): the engine stops the channel's transfer
        self.edma.write(WR_DOORBELL if self.direction == "wr" else RD_DOORBELL, 4,
                        DOORBELL_STOP | self.ch)
        self.edma.irqs.free_irq(self.edma.virq, self)

    def _bits(self) -> int:
        """This channel's done and abort bits in its direction's interrupt status."""
        return 1 << self.ch | 1 << (self.ch + ABORT_SHIFT)

    def _interrupt(self, virq: int, dev_id: object) -> int:
        d = self.edma.dirs[self.direction]
        mine = d.int_status & self._bits()
        if not mine or self._done is None:
            return IRQ_NONE
        self._result = not mine & 1 << (self.ch + ABORT_SHIFT)
        self.edma.write(WR_INT_CLEAR if self.direction == "wr" else RD_INT_CLEAR, 4, mine)
        self._done.set()
        return IRQ_HANDLED

    async def transfer(self, src: int, dst: int, size: int, local_copy: bool = False) -> bool:
        """One transfer; True when the engine reports DONE, False on ABORT."""
        async with self._lock:
            space = self.edma.space
            base = self.base + self.edma._ch_base(self.direction, self.ch)
            glob = {"wr": (WR_ENGINE_EN, WR_DOORBELL, WR_INT_CLEAR),
                    "rd": (RD_ENGINE_EN, RD_DOORBELL, RD_INT_CLEAR)}
            engine_en, doorbell, int_clear = glob[self.direction]
            self._done = trio.Event()
            # No done/abort left from an earlier transfer may answer for this one.
            await space.write(self.base + int_clear, self._bits().to_bytes(4, "little"))
            for off, value in ((CH_CONTROL2, CTRL2_LOCAL_COPY if local_copy else 0),
                               (TRANSFER_SIZE, size),
                               (SAR_LO, src & 0xFFFFFFFF), (SAR_HI, src >> 32),
                               (DAR_LO, dst & 0xFFFFFFFF), (DAR_HI, dst >> 32)):
                await space.write(base + off, value.to_bytes(4, "little"))
            await space.write(self.base + engine_en, (1).to_bytes(4, "little"))
            await space.write(self.base + doorbell, self.ch.to_bytes(4, "little"))
            await self._done.wait()
            self._done = None
            return self._result
