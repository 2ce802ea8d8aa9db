"""The endpoint controller's parts on their own: EP RAM remapping, iATU, outbound, eDMA, IRQs."""

from __future__ import annotations

import errno
import os

import pytest
import trio
import trio.testing

from vfio_ep.epc.address_space import PAGE, AddressError, EpAddressSpace, EpRam, MmioBlock
from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.core import EpcError, PciEpc, PciEpcAttributes
from vfio_ep.epc.edma import (
    CH_BASE,
    CH_CONTROL1,
    CH_HALTED,
    CH_STATUS_SHIFT,
    CH_STOPPED,
    CTRL,
    CTRL1_CCS,
    CTRL1_LLE,
    DAR_HI,
    DAR_LO,
    DOORBELL_STOP,
    EDMA_REGS_SIZE,
    LL_CB,
    LL_LIE,
    LL_LLP,
    LL_TCB,
    LLI,
    LLP_HI,
    LLP_LO,
    SAR_HI,
    SAR_LO,
    TRANSFER_SIZE,
    WR_DOORBELL,
    WR_ENGINE_EN,
    DmaChannel,
    DwEdma,
)
from vfio_ep.epc.features import PROFILES
from vfio_ep.epc.iatu import InboundAtu, NoInboundWindow
from vfio_ep.epc.irq import IRQ_HANDLED, IRQ_NONE, IRQF_ONESHOT, IRQF_SHARED, IrqDomain, IrqError
from vfio_ep.epc.outbound import RC_MSI_ADDR, OutboundAtu, PciEpcMem
from vfio_ep.epc.soc import DelayedWork, EpSoc
from vfio_ep.epf.core import required_bar_size
from vfio_ep.pci.bar import PCI_BASE_ADDRESS_MEM_TYPE_64, WindowKind
from vfio_ep.pci.device import PciHeader
from vfio_ep.vfio_user.dma import DmaTable

BASE = 0x8000_0000


def rc_memory(at: int = 0, size: int = 0x10000) -> DmaTable:
    """The RC's memory as the server sees it: ``size`` bytes of a memfd at RC address
    ``at``."""
    table = DmaTable()
    fd = os.memfd_create("rc", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    table.map(at, size, 3, fd, 0)
    os.close(fd)
    return table


def test_ep_ram_allocator_aligns_and_reuses() -> None:
    ram = EpRam(BASE, 1 << 20)
    a = ram.alloc(100)
    b = ram.alloc(0x10000, align=0x10000)
    assert a == BASE and b % 0x10000 == 0
    ram.free(a, 100)
    assert ram.alloc(PAGE) == BASE
    with pytest.raises(MemoryError):
        ram.alloc(2 << 20)


def test_place_moves_pages_with_their_contents() -> None:
    ram = EpRam(BASE, 1 << 20)
    ram.write(BASE, b"A" * PAGE + b"B" * PAGE)
    ram.place(BASE + PAGE, PAGE, 0)  # EP page 1 now lives at memfd offset 0
    assert ram.read(BASE, 2) == b"AA" and ram.read(BASE + PAGE, 2) == b"BB"
    assert bytes(ram.mem.view[0:2]) == b"BB" and bytes(ram.mem.view[PAGE : PAGE + 2]) == b"AA"
    assert ram.extents(BASE, 2 * PAGE) == [(BASE, PAGE, PAGE), (BASE + PAGE, 0, PAGE)]
    with pytest.raises(AddressError, match="in pieces"):
        ram.view(BASE, 2 * PAGE)
    ram.place(BASE, 2 * PAGE, 0)  # back to identity
    assert ram.extents(BASE, 2 * PAGE) == [(BASE, 0, 2 * PAGE)]
    assert ram.read(BASE + PAGE - 1, 2) == b"AB"


def test_evict_swaps_in_scratch_and_place_brings_ram_back() -> None:
    ram = EpRam(BASE, 1 << 20)
    ram.write(BASE, b"keep")
    ram.evict(0, PAGE)  # memfd page 0 must not hold EP RAM any more
    ram.mem.view[0:4] = b"junk"  # what a guest would scribble through a BAR
    assert ram.read(BASE, 4) == b"keep"
    ram.place(BASE, PAGE, 0)
    assert bytes(ram.mem.view[0:4]) == b"keep" and ram.read(BASE, 4) == b"keep"


def _space() -> EpAddressSpace:
    space = EpAddressSpace(EpRam(BASE, 1 << 20))
    space.add_block(MmioBlock("regs", 0xF000_0000, 0x1000, _Regs()))
    return space


class _Regs:
    def __init__(self) -> None:
        self.writes: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> int:
        return 0x1234

    def write(self, offset: int, size: int, value: int) -> None:
        self.writes.append((offset, value))


def test_iatu_subrange_split_and_kinds() -> None:
    space = _space()
    atu = InboundAtu(space, num_windows=3)
    atu.program(1, [(BASE + 0x2000, 0x1000), (0xF000_0000, 0x1000)])
    rows = atu.windows(1, mmap=False)
    assert [(w.start, w.end, w.kind) for w in rows] == [
        (0, 0x1000, WindowKind.RAM), (0x1000, 0x2000, WindowKind.MMIO)]
    assert rows[0].target_offset == 0x2000
    seen: list[int] = []
    space.watch(BASE + 0x2004, 4, lambda addr, size: seen.append(addr))
    rows = atu.windows(1, mmap=False)
    assert [w.kind for w in rows] == [WindowKind.RAM, WindowKind.MMIO, WindowKind.RAM,
                                      WindowKind.MMIO]
    rows[1].target.write(rows[1].target_offset, 4, 7)
    assert seen == [BASE + 0x2004]
    with pytest.raises(NoInboundWindow):
        atu.program(2, [(BASE, 0x1000), (BASE + 0x1000, 0x1000)])


def test_outbound_translation_and_errors() -> None:
    table = rc_memory(at=0x40000)
    mem = PciEpcMem(0x1_0000_0000, 0x100000, PAGE)
    ob = OutboundAtu(0x1_0000_0000, 0x100000, 2, lambda: table)
    phys = mem.alloc_addr(0x2000)
    assert phys == 0x1_0000_0000
    ob.map_addr(phys, 0x40000, 0x2000)
    ob.map_addr(phys, 0x40000, 0x2000)  # mapping the same address again reprograms it
    assert len(ob.regions) == 1

    async def go() -> None:
        await ob.write(0x10, b"hi")
        assert await ob.read(0x10, 2) == b"hi"
        with pytest.raises(AddressError, match="not mapped"):
            await ob.read(0x2000, 4)

    trio.run(go)
    assert bytes(table.view(0x40010, 2)) == b"hi"


def test_outbound_write_to_the_rc_msi_window_is_an_interrupt() -> None:
    """pci-epf-ntb maps the MSI-X table's address itself: a write there reaches the RC's
    interrupt controller (the vector its data names), never RC memory."""
    table = DmaTable()
    ob = OutboundAtu(0x1_0000_0000, 0x100000, 4, lambda: table)
    ob.map_addr(0x1_0000_0000, RC_MSI_ADDR, 0x100)
    ob.map_addr(0x1_0000_0100, RC_MSI_ADDR, 0x100)
    with pytest.raises(AddressError):  # no interrupt controller modelled: RC memory
        ob.write_sync(0x100, (3).to_bytes(4, "little"))
    rung: list[tuple[int, int]] = []
    ob.msi = lambda offset, value: rung.append((offset, value))
    ob.write_sync(0x100, (3).to_bytes(4, "little"))
    trio.run(ob.write, 0, (1).to_bytes(4, "little"))
    assert rung == [(0, 3), (0, 1)]
    assert ob.views(0, 4) is None and ob.read_sync(0, 4) == bytes(4)
    assert [m for _, _, m in ob.shared_extents(0, 0x200)] == [None, None]


def test_irq_sharing_and_oneshot_rules() -> None:
    calls: list[str] = []
    gate = trio.Event()

    async def slow(virq: int, dev: object) -> int:
        calls.append("a")
        await gate.wait()
        return IRQ_HANDLED

    async def go() -> None:
        async with trio.open_nursery() as n:
            irqs = IrqDomain(lambda fn, name: n.start_soon(fn))
            virq = irqs.alloc("test")
            irqs.request_irq(virq, slow, IRQF_SHARED | IRQF_ONESHOT, "a", "a")
            with pytest.raises(IrqError) as e:
                irqs.request_irq(virq, lambda v, d: IRQ_HANDLED, 0, "b", "b")
            assert e.value.errno == errno.EBUSY
            with pytest.raises(IrqError, match="ONESHOT mismatch"):
                irqs.request_irq(virq, lambda v, d: IRQ_HANDLED, IRQF_SHARED, "c", "c")
            irqs.request_irq(virq, lambda v, d: calls.append("d") or IRQ_NONE,
                             IRQF_SHARED | IRQF_ONESHOT, "d", "d")
            irqs.handle(virq)
            await trio.testing.wait_all_tasks_blocked()
            irqs.handle(virq)  # while the handlers run: not nested,
            irqs.handle(virq)  # but replayed once afterwards
            await trio.testing.wait_all_tasks_blocked()
            assert calls == ["a"]
            gate.set()
            await trio.testing.wait_all_tasks_blocked()
            assert calls == ["a", "d", "a", "d"]
            irqs.free_irq(virq, "a")
            irqs.handle(virq)
            await trio.testing.wait_all_tasks_blocked()
            assert irqs.descs[virq].spurious == 1  # only "d", which returned IRQ_NONE
            assert irqs.descs[virq].count == 4
            n.cancel_scope.cancel()

    trio.run(go)


def test_handle_now_runs_plain_handlers_in_place() -> None:
    """A doorbell's waiter raises with handle_now: plain handlers have run when it returns (a
    failing one is logged, not raised into the waiter); a coroutine handler gets a task."""
    calls: list[str] = []

    def boom(virq: int, dev: object) -> int:
        calls.append("boom")
        raise RuntimeError("a bug in a handler")

    async def threaded(virq: int, dev: object) -> int:
        calls.append("threaded")
        return IRQ_HANDLED

    async def go() -> None:
        async with trio.open_nursery() as n:
            irqs = IrqDomain(lambda fn, name: n.start_soon(fn))
            plain, failing, slow = (irqs.alloc(c) for c in ("plain", "failing", "slow"))
            irqs.request_irq(plain, lambda v, d: calls.append("plain") or IRQ_HANDLED, 0,
                             "p", None)
            irqs.request_irq(failing, boom, 0, "f", None)
            irqs.request_irq(slow, threaded, 0, "t", None)
            irqs.handle_now(plain)
            assert calls == ["plain"]  # already
            irqs.handle_now(failing)
            assert calls == ["plain", "boom"] and not irqs.descs[failing].running
            irqs.handle_now(slow)
            assert calls == ["plain", "boom"]  # its task has not run yet
            await trio.testing.wait_all_tasks_blocked()
            assert calls == ["plain", "boom", "threaded"]
            assert [irqs.descs[v].count for v in (plain, failing, slow)] == [1, 1, 1]
            n.cancel_scope.cancel()

    trio.run(go)


def test_edma_moves_data_both_ways_and_aborts_cleanly() -> None:
    table = rc_memory()
    space = EpAddressSpace(EpRam(BASE, 1 << 20))

    async def go() -> None:
        async with trio.open_nursery() as n:
            def spawn(fn, name):
                n.start_soon(fn)

            irqs = IrqDomain(spawn)
            edma = DwEdma(space, irqs, spawn, 2, lambda: table)
            space.add_block(MmioBlock("edma", 0xF000_0000, EDMA_REGS_SIZE, edma))
            rd = DmaChannel(edma, 0xF000_0000, "rd", 0)
            wr = DmaChannel(edma, 0xF000_0000, "wr", 1)
            table.view(0x100, 4)[:] = b"RC->"
            assert await rd.transfer(0x100, BASE + 0x10, 4)
            assert space.ram.read(BASE + 0x10, 4) == b"RC->"
            space.ram.write(BASE + 0x20, b"<-EP")
            assert await wr.transfer(BASE + 0x20, 0x200, 4)
            assert bytes(table.view(0x200, 4)) == b"<-EP"
            assert not await wr.transfer(BASE + 0x20, 0x20000, 4)  # RC address unmapped
            n.cancel_scope.cancel()

    trio.run(go)


def test_delayed_work_runs_once_after_its_last_schedule_and_not_after_cancel() -> None:
    """mod_delayed_work(): scheduling again replaces the pending run; cancel drops it; the
    work may schedule itself again (ntb_transport's handshake retries)."""
    soc = EpSoc("t", PROFILES["generic"], 1 << 20, 0.001)
    runs: list[float] = []

    def fn() -> None:
        runs.append(trio.current_time())
        if len(runs) == 1:
            work.schedule(1.0)

    work = DelayedWork(soc.spawn, fn, "t")

    async def go() -> None:
        async with trio.open_nursery() as n:
            await n.start(soc.run)
            work.schedule(5.0)
            work.schedule(2.0)  # replaces the run at 5 s
            await trio.sleep(3.5)  # ran at 2 s, and again at 3 s (its own schedule)
            assert runs == [2.0, 3.0]
            work.schedule(1.0)
            work.cancel()
            await trio.sleep(10)
            assert runs == [2.0, 3.0]
            n.cancel_scope.cancel()

    trio.run(go, clock=trio.testing.MockClock(autojump_threshold=0))


def test_edma_stop_before_the_engine_runs_halts_without_an_interrupt() -> None:
    """STOP written right after the doorbell, before the engine's task ran (the guest can do
    it through rk3588's eDMA BAR): the channel is halted, nothing moves, no interrupt, as
    the STOP promises; nor does a cancelled piece of EP work start at all."""
    table = rc_memory()
    soc = EpSoc("t", PROFILES["generic"], 1 << 20, 0.001)

    async def go() -> None:
        async with trio.open_nursery() as n:
            await n.start(soc.run)
            edma = DwEdma(soc.space, soc.irqs, soc.spawn, 1, lambda: table)
            raised: list[int] = []
            soc.irqs.request_irq(edma.virq, lambda v, d: raised.append(v) or IRQ_HANDLED,
                                 IRQF_SHARED, "t", "me")
            soc.space.ram.write(BASE, b"EP->")
            ch = CH_BASE  # write channel 0
            for off, value in ((TRANSFER_SIZE, 4), (SAR_LO, BASE & 0xFFFFFFFF),
                               (SAR_HI, BASE >> 32), (DAR_LO, 0x100), (DAR_HI, 0)):
                edma.write(ch + off, 4, value)
            edma.write(WR_ENGINE_EN, 4, 1)
            edma.write(WR_DOORBELL, 4, 0)
            edma.write(WR_DOORBELL, 4, DOORBELL_STOP | 0)
            await trio.testing.wait_all_tasks_blocked()
            assert edma.read(ch + CH_CONTROL1, 4) >> CH_STATUS_SHIFT & 3 == CH_HALTED
            assert edma.dirs["wr"].int_status == 0 and not raised
            assert bytes(table.view(0x100, 4)) == bytes(4)
            n.cancel_scope.cancel()

    trio.run(go)


# -- pci_epc_set_bar() refusals, as pci-epc-core.c and dw_pcie_ep_set_bar() refuse -----------
def _epc(profile: str = "generic") -> PciEpc:
    epc = PciEpc.create("ep0", PciEpcAttributes(profile=profile, ram_size=8 << 20))
    epc.write_header(0, 0, PciHeader())
    return epc


def _refused(epc: PciEpc, bar: PciEpfBar, err: int, reason: str) -> None:
    with pytest.raises(EpcError, match=reason) as e:
        epc.set_bar(0, 0, bar)
    assert e.value.errno == err


@pytest.mark.parametrize(("profile", "bar", "err", "reason"), [
    ("rk3588", PciEpfBar(0, 0x8000_0000, 64 << 10), errno.EINVAL, "resizable BAR0"),
    ("rcar-s4", PciEpfBar(4, 0x8000_0000, 4096), errno.EINVAL, "fixed at 0x100"),
    ("generic", PciEpfBar(1, 0x8000_0000, 3 << 12), errno.EINVAL, "not a power of two"),
    ("generic", PciEpfBar(5, 0x8000_0000, 4096, flags=PCI_BASE_ADDRESS_MEM_TYPE_64),
     errno.EINVAL, "BAR5 flags"),
    ("generic", PciEpfBar(2, 0x8000_0000, 8 << 30), errno.EINVAL, "flags 0x0 for size"),
    ("rk3588", PciEpfBar(4, 0x8000_0000, 1 << 20), errno.EINVAL, "BAR4 is reserved"),
])
def test_set_bar_refuses_what_the_kernel_refuses(profile: str, bar: PciEpfBar, err: int,
                                                 reason: str) -> None:
    _refused(_epc(profile), bar, err, reason)


def test_set_bar_after_start_cannot_change_size_and_a_direct_bar_stays_page_aligned() -> None:
    epc = _epc()
    ram = epc.ram.base
    epc.set_bar(0, 0, PciEpfBar(0, ram, 4096))
    epc.set_bar(0, 0, PciEpfBar(1, ram + (1 << 20), 1 << 20))  # 1 MiB: exported for mmap
    epc.start()
    _refused(epc, PciEpfBar(0, ram, 8192), errno.EBUSY, "cannot change after start")
    epc.set_bar(0, 0, PciEpfBar(1, ram + (2 << 20), 1 << 20))  # retargeting is fine
    _refused(epc, PciEpfBar(1, ram + (2 << 20) + 16, 1 << 20), errno.EBUSY, "page")


@pytest.mark.parametrize(("size", "profile", "want"), [
    (1, "generic", (128, 128)),  # at least 128 bytes
    (5000, "generic", (8192, 8192)),  # a power of two
    (5000, "rk3588", (1 << 20, 1 << 20)),  # resizable: at least 1 MiB; align 64 KiB
    (100, "rcar-s4", None),  # BAR4 fixed at 256: fits, no larger
])
def test_required_bar_size(size: int, profile: str, want: tuple[int, int] | None) -> None:
    features = PROFILES[profile].features
    if want is not None:
        assert required_bar_size(size, 0, features) == want
    else:
        assert required_bar_size(size, 4, features) == (256, 4096)  # memory 4 KiB-aligned
        with pytest.raises(ValueError, match="larger than fixed size"):
            required_bar_size(257, 4, features)


def test_the_msix_table_the_ep_reads_holds_messages_to_the_rc_msi_window() -> None:
    """The RC's table stays in its VMM: what the EP reads at the table in its BAR is the
    controller's message per vector (RC_MSI_ADDR, data i, unmasked), as pci-epf-ntb reads
    it to map its doorbells."""
    epc = _epc("j721e")
    ram = epc.ram.base
    epc.set_bar(0, 0, PciEpfBar(0, ram, 8192))
    epc.set_msix(0, 0, 4, 0, 0x1000)
    epc.start()
    table = epc.ram.read(ram + 0x1000, 4 * 16)
    assert [int.from_bytes(table[i:i + 4], "little") for i in range(0, 64, 4)] == [
        v for i in range(4) for v in (RC_MSI_ADDR, 0, i, 0)]


def _dw_edma_chunk(space: EpAddressSpace, ll: int, bursts: list[tuple[int, int, int]],
                   cb: bool) -> None:
    """What dw-edma's dw_edma_core_start() writes for one chunk: a data element per burst
    (cycle bit ``cb``, LIE on the last), then a link back to the list's start whose cycle
    bit is the state after its toggle."""
    for i, (size, sar, dar) in enumerate(bursts):
        control = (LL_CB if cb else 0) | (LL_LIE if i == len(bursts) - 1 else 0)
        space.ram.write(ll + i * LLI.size, LLI.pack(control, size, sar, dar))
    space.ram.write(ll + len(bursts) * LLI.size,
                    LLI.pack(LL_LLP | LL_TCB | (0 if cb else LL_CB), 0, ll, 0))


def test_edma_linked_list_mode_runs_dw_edma_chunks() -> None:
    """Linux's dw-edma drives the eDMA in linked-list mode: CTRL reports the channels;
    the first chunk enables the channel (CCS | LLE, LLP at the list), every chunk rings the
    doorbell after writing its elements with the cycle bit toggled from the last one's.
    Each chunk moves its bursts, raises DONE once (its last element's LIE) and stops at the
    elements the producer has not handed over; a list that only loops through links
    aborts."""
    table = rc_memory()
    soc = EpSoc("t", PROFILES["generic"], 1 << 20, 0.001)
    ll = BASE + 0x8000

    async def go() -> None:
        async with trio.open_nursery() as n:
            await n.start(soc.run)
            edma = DwEdma(soc.space, soc.irqs, soc.spawn, 2, lambda: table)
            assert edma.read(CTRL, 4) == 2 | 2 << 16
            edma.write(CTRL, 4, 0)
            assert edma.read(CTRL, 4) == 2 | 2 << 16  # read-only
            raised: list[int] = []
            soc.irqs.request_irq(edma.virq, lambda v, d: raised.append(v) or IRQ_HANDLED,
                                 IRQF_SHARED, "t", "me")
            ch = CH_BASE  # write channel 0: EP -> RC
            soc.space.ram.write(BASE, bytes(range(256)) * 16)
            edma.write(WR_ENGINE_EN, 4, 1)
            edma.write(ch + CH_CONTROL1, 4, CTRL1_CCS | CTRL1_LLE)
            edma.write(ch + LLP_LO, 4, ll & 0xFFFFFFFF)
            edma.write(ch + LLP_HI, 4, ll >> 32)
            chunks = [[(16, BASE, 0x100), (16, BASE + 16, 0x110)],
                      [(32, BASE + 32, 0x200)],
                      [(8, BASE + 64, 0x300), (8, BASE + 72, 0x308), (8, BASE + 80, 0x310)]]
            for k, bursts in enumerate(chunks):
                _dw_edma_chunk(soc.space, ll, bursts, cb=k % 2 == 0)
                edma.write(WR_DOORBELL, 4, 0)
                await trio.testing.wait_all_tasks_blocked()
                assert len(raised) == k + 1
                assert edma.dirs["wr"].int_status == 1
                edma.write(0x58, 4, 1)  # WR_INT_CLEAR
                assert edma.read(ch + CH_CONTROL1, 4) >> CH_STATUS_SHIFT & 3 == CH_STOPPED
            assert bytes(table.view(0x100, 32)) == bytes(range(32))
            assert bytes(table.view(0x200, 32)) == bytes(range(32, 64))
            assert bytes(table.view(0x300, 24)) == bytes(range(64, 88))
            # A doorbell with nothing handed over moves nothing and raises nothing.
            edma.write(WR_DOORBELL, 4, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(raised) == 3 and edma.dirs["wr"].int_status == 0
            # A link to itself that is always handed over: aborted, not spun on forever.
            ccs = bool(edma.read(ch + CH_CONTROL1, 4) & CTRL1_CCS)
            here = edma.read(ch + LLP_LO, 4) | edma.read(ch + LLP_HI, 4) << 32
            soc.space.ram.write(here, LLI.pack(LL_LLP | (LL_CB if ccs else 0), 0, here, 0))
            edma.write(WR_DOORBELL, 4, 0)
            await trio.testing.wait_all_tasks_blocked()
            assert edma.dirs["wr"].int_status == 1 << 16  # ABORT, channel 0
            assert edma.read(ch + CH_CONTROL1, 4) >> CH_STATUS_SHIFT & 3 == CH_HALTED
            n.cancel_scope.cancel()

    trio.run(go)
