"""pci-epf-test, as drivers/pci/endpoint/functions/pci-epf-test.c in Linux 7.3.4.

Register map, COMMAND/STATUS/CAPS bits, CRC32 semantics, BAR sizes and the
order of operations follow the kernel function line by line, so the guest's
unmodified ``pci_endpoint_test`` driver and the kselftest see the same device
as on an SoC.  One deliberate difference: the kernel polls COMMAND every
1 ms from a workqueue; here a write watch on COMMAND starts the handler the
moment the RC's write lands.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

from construct import Int32ul, Int64ul, Struct

from vfio_ep.bulk import crc32_views, fill_random
from vfio_ep.config import U32
from vfio_ep.epc.address_space import AddressError, Watch
from vfio_ep.epc.bar import PciEpfBar, PciEpfBarSubmap
from vfio_ep.epc.core import EpcError, IrqType, PciEpcMap
from vfio_ep.epc.edma import DmaChannel
from vfio_ep.epc.features import NO_BAR, BarType, get_first_free_bar, get_next_free_bar
from vfio_ep.epc.irq import IRQ_HANDLED, IRQF_ONESHOT, IrqError
from vfio_ep.epf.command import TrappedCommand
from vfio_ep.epf.core import PciEpf
from vfio_ep.epf.doorbell import CHOICES as DOORBELL_CHOICES
from vfio_ep.epf.doorbell import (
    DoorbellError,
    pci_epf_alloc_doorbell,
    pci_epf_doorbell_addresses,
    pci_epf_doorbell_backend,
    pci_epf_free_doorbell,
)
from vfio_ep.epf.regs import RegisterBlock, field_offsets
from vfio_ep.pci.bar import NUM_BARS
from vfio_ep.pci.device import FunctionAttributes, PciHeader
from vfio_ep.pci.host import RcBusError

IRQ_TYPE_INTX, IRQ_TYPE_MSI, IRQ_TYPE_MSIX = 0, 1, 2

COMMAND_RAISE_INTX_IRQ = 1 << 0
COMMAND_RAISE_MSI_IRQ = 1 << 1
COMMAND_RAISE_MSIX_IRQ = 1 << 2
COMMAND_READ = 1 << 3
COMMAND_WRITE = 1 << 4
COMMAND_COPY = 1 << 5
COMMAND_ENABLE_DOORBELL = 1 << 6
COMMAND_DISABLE_DOORBELL = 1 << 7
COMMAND_BAR_SUBRANGE_SETUP = 1 << 8
COMMAND_BAR_SUBRANGE_CLEAR = 1 << 9

STATUS_READ_SUCCESS = 1 << 0
STATUS_READ_FAIL = 1 << 1
STATUS_WRITE_SUCCESS = 1 << 2
STATUS_WRITE_FAIL = 1 << 3
STATUS_COPY_SUCCESS = 1 << 4
STATUS_COPY_FAIL = 1 << 5
STATUS_IRQ_RAISED = 1 << 6
STATUS_SRC_ADDR_INVALID = 1 << 7
STATUS_DST_ADDR_INVALID = 1 << 8
STATUS_DOORBELL_SUCCESS = 1 << 9
STATUS_DOORBELL_ENABLE_SUCCESS = 1 << 10
STATUS_DOORBELL_ENABLE_FAIL = 1 << 11
STATUS_DOORBELL_DISABLE_SUCCESS = 1 << 12
STATUS_DOORBELL_DISABLE_FAIL = 1 << 13
STATUS_BAR_SUBRANGE_SETUP_SUCCESS = 1 << 14
STATUS_BAR_SUBRANGE_SETUP_FAIL = 1 << 15
STATUS_BAR_SUBRANGE_CLEAR_SUCCESS = 1 << 16
STATUS_BAR_SUBRANGE_CLEAR_FAIL = 1 << 17
STATUS_NO_RESOURCE = 1 << 18

FLAG_USE_DMA = 1 << 0


def _bit_names(prefix: str) -> dict[int, str]:
    """The bits this module names ``PREFIX<NAME>``, by value (for logs)."""
    return {v: k.removeprefix(prefix) for k, v in globals().items()
            if k.startswith(prefix) and isinstance(v, int)}


COMMAND_NAMES = _bit_names("COMMAND_")
STATUS_NAMES = _bit_names("STATUS_")
IRQ_TYPE_NAMES = {IRQ_TYPE_INTX: "INTx", IRQ_TYPE_MSI: "MSI", IRQ_TYPE_MSIX: "MSI-X"}


def decode_bits(value: int, names: dict[int, str]) -> str:
    """``READ_SUCCESS|IRQ_RAISED``: the named bits of ``value``, any other bits in hex."""
    parts = [name for bit, name in names.items() if value & bit]
    rest = value & ~sum(names)
    return "|".join(parts + ([f"{rest:#x}"] if rest else [])) or "0"

CAP_UNALIGNED_ACCESS = 1 << 0
CAP_MSI = 1 << 1
CAP_MSIX = 1 << 2
CAP_INTX = 1 << 3
CAP_SUBRANGE_MAPPING = 1 << 4
CAP_DYNAMIC_INBOUND_MAPPING = 1 << 5
CAP_BAR0_RESERVED = 1 << 6

BAR_SUBRANGE_NSUB = 2
DEFAULT_BAR_SIZE = (131072, 131072, 131072, 131072, 131072, 1048576)

# struct pci_epf_test_reg (__packed)
TestReg = Struct(
    "magic" / Int32ul, "command" / Int32ul, "status" / Int32ul,
    "src_addr" / Int64ul, "dst_addr" / Int64ul, "size" / Int32ul, "checksum" / Int32ul,
    "irq_type" / Int32ul, "irq_number" / Int32ul, "flags" / Int32ul, "caps" / Int32ul,
    "doorbell_bar" / Int32ul, "doorbell_offset" / Int32ul, "doorbell_data" / Int32ul,
)
REG_OFFSET = field_offsets(TestReg)
TEST_REG_SIZE = (TestReg.sizeof() + 127) // 128 * 128  # ALIGN(sizeof(reg), 128)


async def crc32_le(views: list[memoryview]) -> int:
    """The kernel's crc32_le(~0, data, len): zlib's CRC32 without the final inversion."""
    return await crc32_views(views) ^ 0xFFFFFFFF


@dataclass(frozen=True)
class PciEpfTestAttributes(FunctionAttributes):
    """configfs: the function's header/interrupts (baseclass ff = PCI_CLASS_OTHERS),
    pci_epf_test.N/barN_size, and the doorbell backend the function asks the core for."""

    # kstrtouint, then is_power_of_2 (below)
    bar0_size: U32 = DEFAULT_BAR_SIZE[0]
    bar1_size: U32 = DEFAULT_BAR_SIZE[1]
    bar2_size: U32 = DEFAULT_BAR_SIZE[2]
    bar3_size: U32 = DEFAULT_BAR_SIZE[3]
    bar4_size: U32 = DEFAULT_BAR_SIZE[4]
    bar5_size: U32 = DEFAULT_BAR_SIZE[5]
    # The doorbell backend (vfio_ep.epf.doorbell): msi | embedded | poll | auto.
    doorbell: str = "auto"

    def __post_init__(self) -> None:
        if self.doorbell not in DOORBELL_CHOICES:
            raise ValueError(f"doorbell must be one of {', '.join(DOORBELL_CHOICES)}")
        for bar in range(NUM_BARS):
            size = getattr(self, f"bar{bar}_size")
            if size <= 0 or size & (size - 1):
                raise ValueError(f"bar{bar}_size {size} is not a power of two")


class PciEpfTest(PciEpf):
    name = "pci_epf_test"

    def __init__(self, header: PciHeader, msi_interrupts: int, msix_interrupts: int,
                 bar_size: tuple[int, ...], doorbell: str = "auto") -> None:
        super().__init__(header, msi_interrupts, msix_interrupts, doorbell)
        self.db_bar: PciEpfBar | None = None
        self.db_bar_programmed = False
        self.bar_size = list(bar_size)
        self.test_reg_bar = 0
        self.msix_table_offset = 0
        self.reg_space: dict[int, PciEpfBar] = {}
        self.dma_supported = False
        self.dma_chan_tx: DmaChannel | None = None
        self.dma_chan_rx: DmaChannel | None = None
        self._watch: Watch | None = None
        self.command = TrappedCommand(self.spawn, self._handle_one, "pci-epf-test-cmd")

    @property
    def regs(self) -> RegisterBlock:
        """struct pci_epf_test_reg in the EP RAM behind test_reg_bar."""
        return RegisterBlock(TestReg, self.controller.ram,
                             self.reg_space[self.test_reg_bar].phys_addr)

    def facts(self) -> dict[str, object]:
        """Its driver, and the doorbell backend DOORBELL_TEST's enable will get."""
        return super().facts() | {"doorbell": pci_epf_doorbell_backend(self)}

    # -- bind / space ------------------------------------------------------------
    def bind(self) -> None:
        features = self.features
        bar = get_first_free_bar(features)
        if bar < 0:
            raise EpcError(errno.EINVAL, "no free BAR for the test registers")
        self.test_reg_bar = bar
        self._alloc_space()

    def _alloc_space(self) -> None:
        features = self.features
        msix_table_size = pba_size = 0
        if features.msix_capable:
            msix_table_size = 16 * self.msix_interrupts
            self.msix_table_offset = TEST_REG_SIZE
            pba_size = (-(-self.msix_interrupts // 8) + 7) // 8 * 8
        b = self.alloc_space(TEST_REG_SIZE + msix_table_size + pba_size, self.test_reg_bar,
                             features)
        if b is None:
            raise EpcError(errno.ENOMEM, "failed to allocate register space")
        self.reg_space[self.test_reg_bar] = b
        # ENABLE_DOORBELL maps the next free BAR onto the doorbell target.
        doorbell_bar = get_next_free_bar(features, self.test_reg_bar + 1)
        bar = 0
        while bar < NUM_BARS:
            bar = get_next_free_bar(features, bar)
            if bar == NO_BAR:
                break
            if bar != self.test_reg_bar:
                size = (features.bar[bar].fixed_size if features.bar[bar].type == BarType.FIXED
                        else self.bar_size[bar])
                if size > self.controller.ram.size:
                    # The kernel would log and go on without the BAR, and the kselftest would
                    # quietly skip it: a size this SoC can never hold is the user's to fix.
                    raise EpcError(errno.ENOMEM, f"bar{bar}_size {size:#x} is larger than the "
                                   f"controller's EP RAM ({self.controller.ram.size:#x}): "
                                   f"lower it, or raise the controller's ram_size")
                b = self.alloc_space(size, bar, features)
                if b is None:
                    self.log.error("Failed to allocate space for BAR%d", bar)
                else:
                    if bar == doorbell_bar:
                        b.doorbell_addrs = pci_epf_doorbell_addresses(self)
                    self.reg_space[bar] = b
            bar += 1

    # -- controller events ---------------------------------------------------
    def epc_init(self) -> None:
        epc = self.controller
        features = self.features
        self.dma_chan_rx = epc.dma_channel("rd")
        self.dma_chan_tx = epc.dma_channel("wr")
        self.dma_supported = self.dma_chan_rx is not None and self.dma_chan_tx is not None
        epc.write_header(self.func_no, self.vfunc_no, self.header)
        self._set_capabilities()
        for bar in sorted(self.reg_space):
            try:
                epc.set_bar(self.func_no, self.vfunc_no, self.reg_space[bar])
            except EpcError as e:
                self.log.error("Failed to set BAR%d: %s", bar, e)
                if bar == self.test_reg_bar:
                    raise
                self.free_space(bar)
                del self.reg_space[bar]
        if features.msi_capable:
            epc.set_msi(self.func_no, self.vfunc_no, self.msi_interrupts)
        if features.msix_capable:
            epc.set_msix(self.func_no, self.vfunc_no, self.msix_interrupts, self.test_reg_bar,
                         self.msix_table_offset)
        b = self.reg_space[self.test_reg_bar]
        off, size = REG_OFFSET["command"]
        self._watch = epc.space.watch(b.phys_addr + off, size, self.command.written)

    def epc_deinit(self) -> None:
        epc = self.controller
        self.command.reset()
        if self.db_msg:  # a reset while the doorbell is on: drop it like DISABLE would
            epc.irqs.free_irq(self.db_msg[0].virq, self)
            self._doorbell_cleanup()
            self.db_bar_programmed = False
        if self._watch is not None:
            epc.space.unwatch(self._watch)
            self._watch = None
        for chan in (self.dma_chan_rx, self.dma_chan_tx):
            if chan is not None:
                chan.release()
        self.dma_chan_rx = self.dma_chan_tx = None
        for b in self.reg_space.values():
            epc.clear_bar(self.func_no, self.vfunc_no, b)

    def _set_capabilities(self) -> None:
        f = self.features
        caps = CAP_UNALIGNED_ACCESS  # our controller implements align_addr
        caps |= CAP_MSI if f.msi_capable else 0
        caps |= CAP_MSIX if f.msix_capable else 0
        caps |= CAP_INTX if f.intx_capable else 0
        caps |= CAP_DYNAMIC_INBOUND_MAPPING if f.dynamic_inbound_mapping else 0
        caps |= CAP_SUBRANGE_MAPPING if f.dynamic_inbound_mapping and f.subrange_mapping else 0
        for bar in range(NUM_BARS):
            if f.bar[bar].type == BarType.RESERVED:
                caps |= CAP_BAR0_RESERVED << bar
        self.regs["caps"] = caps

    # -- the command handler -------------------------------------------------
    async def _handle_one(self) -> None:
        """pci_epf_test_cmd_handler(): the command in COMMAND, its result in STATUS."""
        reg = self.regs
        irq_type = reg["irq_type"]
        command = reg["command"]
        if not command:
            return
        reg["command"] = 0
        reg["status"] = 0
        started = time.monotonic()
        try:
            await self._run_command(command, irq_type)
        finally:
            self.log.info("%s: STATUS %s, %s %d, %.1f ms", self._describe(command),
                          decode_bits(reg["status"], STATUS_NAMES),
                          IRQ_TYPE_NAMES.get(irq_type, f"irq_type {irq_type}"),
                          reg["irq_number"], (time.monotonic() - started) * 1e3)

    def _describe(self, command: int) -> str:
        """The command as the log shows it: its name and, for data, what it moves."""
        reg = self.regs
        what = decode_bits(command, COMMAND_NAMES)
        if command & (COMMAND_READ | COMMAND_WRITE | COMMAND_COPY):
            what += f" of {reg['size']:#x} bytes"
            if command & (COMMAND_READ | COMMAND_COPY):
                what += f" from {reg['src_addr']:#x}"
            if command & (COMMAND_WRITE | COMMAND_COPY):
                what += f" to {reg['dst_addr']:#x}"
            what += " by DMA" if reg["flags"] & FLAG_USE_DMA else " by memcpy"
        return what

    async def _run_command(self, command: int, irq_type: int) -> None:
        reg = self.regs
        if reg["flags"] & FLAG_USE_DMA and not self.dma_supported:
            self.log.error("Cannot transfer data using DMA")
            return
        if irq_type > IRQ_TYPE_MSIX:
            self.log.error("Failed to detect IRQ type")
            return
        handlers = {
            COMMAND_WRITE: self._write,
            COMMAND_READ: self._read,
            COMMAND_COPY: self._copy,
            COMMAND_ENABLE_DOORBELL: self._enable_doorbell,
            COMMAND_DISABLE_DOORBELL: self._disable_doorbell,
            COMMAND_BAR_SUBRANGE_SETUP: self._bar_subrange_setup,
            COMMAND_BAR_SUBRANGE_CLEAR: self._bar_subrange_clear,
        }
        if command in (COMMAND_RAISE_INTX_IRQ, COMMAND_RAISE_MSI_IRQ, COMMAND_RAISE_MSIX_IRQ):
            self._raise_irq()
        elif command in handlers:
            await handlers[command](reg)
            self._raise_irq()
        else:
            self.log.error("Invalid command 0x%x", command)

    def _raise_irq(self) -> None:
        reg = self.regs
        reg["status"] = reg["status"] | STATUS_IRQ_RAISED
        irq_type, irq_number = reg["irq_type"], reg["irq_number"]
        epc = self.controller
        try:
            if irq_type == IRQ_TYPE_INTX:
                epc.raise_irq(self.func_no, self.vfunc_no, IrqType.INTX, 0)
            elif irq_type == IRQ_TYPE_MSI:
                count = epc.get_msi(self.func_no, self.vfunc_no)
                if irq_number > count or count <= 0:
                    self.log.error("Invalid MSI IRQ number %d / %d", irq_number, count)
                    return
                epc.raise_irq(self.func_no, self.vfunc_no, IrqType.MSI, irq_number)
            elif irq_type == IRQ_TYPE_MSIX:
                count = epc.get_msix(self.func_no, self.vfunc_no)
                if irq_number > count or count <= 0:
                    self.log.error("Invalid MSI-X IRQ number %d / %d", irq_number, count)
                    return
                epc.raise_irq(self.func_no, self.vfunc_no, IrqType.MSIX, irq_number)
            else:
                self.log.error("Failed to raise IRQ, unknown type")
        except EpcError as e:
            self.log.error("raise_irq: %s", e)

    # -- data transfer -------------------------------------------------------
    async def _dma(self, chan: DmaChannel | None, src: int, dst: int, size: int,
                   local_copy: bool = False) -> None:
        if chan is None or not await chan.transfer(src, dst, size, local_copy):
            raise EpcError(errno.EIO, "DMA transfer failed")

    @contextmanager
    def _transfer_buffer(self, size: int) -> Iterator[int]:
        """The kernel's kzalloc'd transfer buffer, in EP RAM; MemoryError when it cannot be
        had (a size the guest made up), which fails the command like -ENOMEM does.  Not
        zeroed: every command fills all of it before reading any, and nothing else sees it
        (a failed fill fails the command before the buffer is read)."""
        ram = self.controller.ram
        addr = ram.alloc(max(size, 1), zeroed=False)
        try:
            yield addr
        finally:
            ram.free(addr, max(size, 1))

    async def _over_maps(self, pci_addr: int, size: int,
                         step: Callable[[PciEpcMap, int], Awaitable[None]]) -> bool:
        """Map RC memory window by window (pci_epc_mem_map) and run ``step(map, offset)`` on
        each; False when a window cannot be mapped."""
        epc = self.controller
        pos = 0
        while pos < size:
            try:
                m = epc.mem_map(self.func_no, self.vfunc_no, pci_addr + pos, size - pos)
            except EpcError as e:
                self.log.error("Failed to map address: %s", e)
                return False
            try:
                await step(m, pos)
            finally:
                epc.mem_unmap(self.func_no, self.vfunc_no, m)
            pos += m.pci_size
        return True

    async def _transfer(self, reg: RegisterBlock, what: str, fail: int,
                        body: Callable[[], Awaitable[int]]) -> None:
        """Run a data command's ``body`` (which returns its STATUS bits); an allocation the
        guest's size made impossible (-ENOMEM) or a bus error sets the command's FAIL bit."""
        try:
            status = await body()
        except MemoryError as e:
            self.log.error("%s of %d bytes: %s", what, reg["size"], e)
            status = fail
        except (AddressError, RcBusError, EpcError) as e:
            self.log.error("%s failed: %s", what, e)
            status = fail
        reg["status"] = status

    async def _read(self, reg: RegisterBlock) -> None:
        """COMMAND_READ: the EP reads RC memory at SRC_ADDR and checks its CRC."""
        epc = self.controller
        src_addr, size = reg["src_addr"], reg["size"]
        use_dma = reg["flags"] & FLAG_USE_DMA

        async def body() -> int:
            with self._transfer_buffer(size) as buf:

                async def step(m: PciEpcMap, pos: int) -> None:
                    if use_dma:
                        await self._dma(self.dma_chan_rx, src_addr + pos, buf + pos, m.pci_size)
                    else:
                        await epc.space.copy(buf + pos, m.phys_addr, m.pci_size)

                if not await self._over_maps(src_addr, size, step):
                    return STATUS_SRC_ADDR_INVALID | STATUS_READ_FAIL
                if await crc32_le(epc.ram.views(buf, size)) != reg["checksum"]:
                    self.log.warning("READ: CRC mismatch over %d bytes", size)
                    return STATUS_READ_FAIL
                return STATUS_READ_SUCCESS

        await self._transfer(reg, "READ", STATUS_READ_FAIL, body)

    async def _write(self, reg: RegisterBlock) -> None:
        """COMMAND_WRITE: random data to RC memory at DST_ADDR, its CRC in CHECKSUM."""
        epc = self.controller
        dst_addr, size = reg["dst_addr"], reg["size"]
        use_dma = reg["flags"] & FLAG_USE_DMA

        async def body() -> int:
            with self._transfer_buffer(size) as buf:
                await fill_random(epc.ram.views(buf, size))
                reg["checksum"] = await crc32_le(epc.ram.views(buf, size))

                async def step(m: PciEpcMap, pos: int) -> None:
                    if use_dma:
                        await self._dma(self.dma_chan_tx, buf + pos, dst_addr + pos, m.pci_size)
                    else:
                        await epc.space.copy(m.phys_addr, buf + pos, m.pci_size)

                if not await self._over_maps(dst_addr, size, step):
                    return STATUS_DST_ADDR_INVALID | STATUS_WRITE_FAIL
                # No usleep_range(1000, 2000) here: the kernel waits for its posted writes
                # to reach the host (an L3 error on DRA7xx otherwise); these are in the
                # RC's memory when the copy returns, before the interrupt is raised.
                return STATUS_WRITE_SUCCESS

        await self._transfer(reg, "WRITE", STATUS_WRITE_FAIL, body)

    async def _copy(self, reg: RegisterBlock) -> None:
        """COMMAND_COPY: RC memory SRC_ADDR -> DST_ADDR through two outbound maps."""
        epc = self.controller
        src_addr, dst_addr, size = reg["src_addr"], reg["dst_addr"], reg["size"]
        use_dma = reg["flags"] & FLAG_USE_DMA

        async def body() -> int:
            nonlocal src_addr, dst_addr, size
            # The memcpy variant stages through a kzalloc'd buffer, the DMA one does not.
            with nullcontext(0) if use_dma else self._transfer_buffer(size) as buf:
                while size:
                    try:
                        src = epc.mem_map(self.func_no, self.vfunc_no, src_addr, size)
                    except EpcError as e:
                        self.log.error("Failed to map source address: %s", e)
                        return STATUS_SRC_ADDR_INVALID | STATUS_COPY_FAIL
                    try:
                        dst = epc.mem_map(self.func_no, self.vfunc_no, dst_addr, size)
                    except EpcError as e:
                        self.log.error("Failed to map destination address: %s", e)
                        epc.mem_unmap(self.func_no, self.vfunc_no, src)
                        return STATUS_DST_ADDR_INVALID | STATUS_COPY_FAIL
                    try:
                        n = min(src.pci_size, dst.pci_size)
                        if use_dma:
                            await self._dma(self.dma_chan_tx, src.phys_addr, dst.phys_addr, n,
                                            local_copy=True)
                        else:
                            await epc.space.copy(buf, src.phys_addr, n)
                            await epc.space.copy(dst.phys_addr, buf, n)
                    finally:
                        epc.mem_unmap(self.func_no, self.vfunc_no, dst)
                        epc.mem_unmap(self.func_no, self.vfunc_no, src)
                    size -= n
                    src_addr += n
                    dst_addr += n
            return STATUS_COPY_SUCCESS

        await self._transfer(reg, "COPY", STATUS_COPY_FAIL, body)

    # -- doorbell ------------------------------------------------------------
    def _doorbell_handler(self, virq: int, dev_id: object) -> int:
        reg = self.regs
        reg["status"] = reg["status"] | STATUS_DOORBELL_SUCCESS
        self._raise_irq()
        return IRQ_HANDLED

    def _doorbell_cleanup(self) -> None:
        self.regs["doorbell_bar"] = NO_BAR
        pci_epf_free_doorbell(self)

    async def _enable_doorbell(self, reg: RegisterBlock) -> None:
        epc = self.controller
        status = reg["status"]
        try:
            pci_epf_alloc_doorbell(self, 1)
        except DoorbellError:
            reg["status"] = status | STATUS_DOORBELL_ENABLE_FAIL
            return
        db = self.db_msg[0]
        self.db_bar_programmed = False
        if db.bar != NO_BAR:  # already exposed through a platform-owned fixed BAR
            bar, offset = db.bar, db.offset
        else:
            bar = get_next_free_bar(self.features, self.test_reg_bar + 1)
            if bar < 0:
                self._doorbell_cleanup()
                reg["status"] = status | STATUS_DOORBELL_ENABLE_FAIL
                return
        try:
            epc.irqs.request_irq(db.virq, self._doorbell_handler, db.irq_flags | IRQF_ONESHOT,
                                 "pci-ep-test-doorbell", self)
        except IrqError as e:
            self.log.error("Failed to request doorbell IRQ %d: %s", db.virq, e)
            self._doorbell_cleanup()
            reg["status"] = status | STATUS_DOORBELL_ENABLE_FAIL
            return
        reg["doorbell_data"] = db.msg.data
        reg["doorbell_bar"] = bar
        if db.bar == NO_BAR:
            phys, offset = self.align_inbound_addr(bar, db.msg.address)
        reg["doorbell_offset"] = offset
        if db.bar == NO_BAR:
            own = self.bar[bar]
            assert own is not None
            self.db_bar = PciEpfBar(bar, phys, own.size, flags=own.flags)
            try:
                epc.set_bar(self.func_no, self.vfunc_no, self.db_bar)
            except EpcError as e:
                self.log.error("Failed to map the doorbell into BAR%d: %s", bar, e)
                epc.irqs.free_irq(db.virq, self)
                self._doorbell_cleanup()
                reg["status"] = status | STATUS_DOORBELL_ENABLE_FAIL
                return
            self.db_bar_programmed = True
        reg["status"] = status | STATUS_DOORBELL_ENABLE_SUCCESS

    async def _disable_doorbell(self, reg: RegisterBlock) -> None:
        epc = self.controller
        bar = reg["doorbell_bar"]
        status = reg["status"]
        if bar >= NUM_BARS or not self.db_msg:
            reg["status"] = status | STATUS_DOORBELL_DISABLE_FAIL
            return
        epc.irqs.free_irq(self.db_msg[0].virq, self)
        self._doorbell_cleanup()
        if self.db_bar_programmed:
            # Restore the BAR's own inbound translation (set_bar again, never clear_bar,
            # which would drop the BAR address the host assigned).
            own = self.bar[bar]
            try:
                assert own is not None
                epc.set_bar(self.func_no, self.vfunc_no, own)
            except EpcError as e:
                self.log.error("Failed to restore BAR%d: %s", bar, e)
                reg["status"] = status | STATUS_DOORBELL_DISABLE_FAIL
                return
            self.db_bar_programmed = False
        reg["status"] = status | STATUS_DOORBELL_DISABLE_SUCCESS

    # -- BAR subrange mapping ------------------------------------------------
    async def _bar_subrange_setup(self, reg: RegisterBlock) -> None:
        barno = reg["size"]  # SIZE carries the BAR number for BAR_SUBRANGE_*
        status = reg["status"]
        features = self.features
        bar = self.reg_space.get(barno) if barno < NUM_BARS else None
        if barno >= NUM_BARS or barno == self.test_reg_bar or bar is None:
            self.log.error("Invalid barno for subrange test: %d", barno)
        elif not (features.dynamic_inbound_mapping and features.subrange_mapping):
            self.log.error("epc driver does not support subrange mapping")
        elif bar.size % BAR_SUBRANGE_NSUB:
            self.log.error("BAR size %d is not divisible by %d", bar.size, BAR_SUBRANGE_NSUB)
        else:
            sub = bar.size // BAR_SUBRANGE_NSUB
            old = bar.submap
            # Swap the two halves so the RC can verify the ordering.
            bar.submap = [PciEpfBarSubmap(bar.phys_addr + (i ^ 1) * sub, sub)
                          for i in range(BAR_SUBRANGE_NSUB)]
            try:
                self.controller.set_bar(self.func_no, self.vfunc_no, bar)
            except EpcError as e:
                self.log.error("pci_epc_set_bar() failed: %s", e)
                if e.errno == 28:  # ENOSPC
                    status |= STATUS_NO_RESOURCE
                bar.submap = old
                self.controller.set_bar(self.func_no, self.vfunc_no, bar)
            else:
                ram = self.controller.ram
                for i in range(BAR_SUBRANGE_NSUB):
                    sig = 0x50 + barno * 8 + i
                    ram.write(bar.phys_addr + (i ^ 1) * sub, bytes([sig]) * sub)
                reg["status"] = status | STATUS_BAR_SUBRANGE_SETUP_SUCCESS
                return
        reg["status"] = status | STATUS_BAR_SUBRANGE_SETUP_FAIL

    async def _bar_subrange_clear(self, reg: RegisterBlock) -> None:
        barno = reg["size"]
        status = reg["status"]
        bar = self.reg_space.get(barno) if barno < NUM_BARS else None
        if bar is None or not bar.submap:
            reg["status"] = status | STATUS_BAR_SUBRANGE_CLEAR_FAIL
            return
        old = bar.submap
        bar.submap = []
        try:
            self.controller.set_bar(self.func_no, self.vfunc_no, bar)
        except EpcError as e:
            bar.submap = old
            self.log.error("pci_epc_set_bar() failed: %s", e)
            reg["status"] = status | STATUS_BAR_SUBRANGE_CLEAR_FAIL
            return
        reg["status"] = status | STATUS_BAR_SUBRANGE_CLEAR_SUCCESS


def probe(a: PciEpfTestAttributes) -> PciEpfTest:
    """pci_epf_test_probe(): the function, configured, not yet bound to a controller."""
    return PciEpfTest(a.header(), a.msi_interrupts, a.msix_interrupts,
                      tuple(getattr(a, f"bar{i}_size") for i in range(NUM_BARS)), a.doorbell)
