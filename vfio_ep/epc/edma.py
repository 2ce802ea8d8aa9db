"""A DesignWare eDMA (v0, unrolled register map) and the dmaengine view of it.

The register block sits at an EP address like on the SoC.  Write channels
move EP memory to RC (PCI) addresses, read channels RC to EP; a channel is
programmed with SAR/DAR/transfer size in non-linked-list mode and started by
writing its number to the direction's doorbell register; completion sets the
DONE (or ABORT) status bit and raises the eDMA interrupt unless masked.

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

DOORBELL_CH_MASK = 0x7
DOORBELL_STOP = 1 << 31
DONE_INT = 0xFF
ABORT_SHIFT = 16
CH_STATUS_SHIFT = 5  # CH_CONTROL1 bits 6:5
CH_RUNNING, CH_HALTED, CH_STOPPED = 1, 2, 3
CTRL2_LOCAL_COPY = 1 << 0

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
        self.dirs = {"wr": Direction("write"), "rd": Direction("read")}
        self.irqs = irqs
        self.virq = irqs.alloc("dw-edma")
        # dw_edma_emul_irqchip: handle_level_irq, acked by a zero write to INT_CLEAR.
        self.emul_virq = irqs.alloc("dw-edma-emul", ack=lambda: self.write(RD_INT_CLEAR, 4, 0))
        self._engines: dict[tuple[str, int], Cancellable] = {}  # (direction, ch) running

    # -- MmioHandler -------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        status = {WR_INT_STATUS: self.dirs["wr"].int_status,
                  RD_INT_STATUS: self.dirs["rd"].int_status}.get(offset)
        if status is not None and size == 4:
            return status
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
            case _:
                self.regs[offset : offset + 4] = value.to_bytes(4, "little")

    # -- engine --------------------------------------------------------------
    def _ch_base(self, direction: str, ch: int) -> int:
        return CH_BASE + ch * CH_STRIDE + (RD_OFFSET if direction == "rd" else 0)

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
        d = self.dirs[direction]
        self._set_ch_status(direction, ch, CH_STOPPED if ok else CH_HALTED)
        bit = 1 << ch if ok else 1 << (ch + ABORT_SHIFT)
        d.int_status |= bit
        if not d.int_mask & bit:  # the engine's task ends here: its handlers run in place
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
