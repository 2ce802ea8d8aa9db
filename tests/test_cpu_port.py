"""The controller's CPU side (vfio_ep.epc.cpu_port) driven as the EP guest's EPC driver does,
with the project's client in both QEMUs' places: the EP guest's (its RAM, the registers)
and the RC's (the device the EP guest starts).  The real thing, Linux's pci-epf-test on the
module, is tests/test_ep_guest.py."""

from __future__ import annotations

import errno
import logging
import mmap
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from vfio_user_client import Client, ServerThread, wait_eventfd

from vfio_ep.composition import EP_GUEST_CONTROLLER, Composition, Endpoint
from vfio_ep.epc import cpu_port as v
from vfio_ep.epc.edma import (
    CH_BASE,
    CTRL,
    DAR_HI,
    DAR_LO,
    EMUL_DOORBELL_OFFSET,
    RD_DOORBELL,
    RD_ENGINE_EN,
    RD_INT_STATUS,
    RD_OFFSET,
    SAR_HI,
    SAR_LO,
    TRANSFER_SIZE,
)
from vfio_ep.pci.config_space import PCI_DEVICE_ID, PCI_VENDOR_ID

EP_RAM = 0x100000  # the EP guest's RAM, at its guest physical address
EP_RAM_SIZE = 1 << 20
RC_RAM = 0x200000  # the RC guest's
RC_RAM_SIZE = 1 << 20
PCI_IRQ_MSIX = 4


class EpDriver:
    """What qemu/kernel/epc/vfio-ep-epc.c does over BAR0, in Python."""

    def __init__(self, client: Client) -> None:
        self.c = client
        self.ram = client.guest_memory(EP_RAM, EP_RAM_SIZE)
        self.irq = client.enable_interrupts(v.NR_VECTORS, msix=True)

    def r32(self, off: int) -> int:
        return int.from_bytes(self.c.read(v.REGS_BAR, off, 4), "little")

    def w32(self, off: int, value: int) -> None:
        self.c.write(v.REGS_BAR, off, value.to_bytes(4, "little"))

    def w64(self, off: int, value: int) -> None:
        self.c.write(v.REGS_BAR, off, value.to_bytes(8, "little"))

    def cmd(self, op: str, *args: int) -> tuple[int, int]:
        """(status, result) of one command."""
        self.w32(v.CMD_FUNC, 0)
        for i, a in enumerate(args):
            self.w64(v.CMD_ARG + 8 * i, a)
        self.w32(v.CMD, {n: k for k, n in v.OPS.items()}[op])
        status = struct.unpack("<i", self.c.read(v.REGS_BAR, v.CMD_STATUS, 4))[0]
        return status, int.from_bytes(self.c.read(v.REGS_BAR, v.CMD_RESULT, 8), "little")

    def events(self) -> list[int]:
        out = []
        while (event := self.r32(v.EVENT)) != v.EV_NONE:
            out.append(event)
        return out

    def edma_read(self, ep_addr: int, rc_addr: int, size: int) -> None:
        """A transfer on read channel 0 (RC -> EP), programmed as vepc_dma_start_seg()
        does; returns once the eDMA's interrupt came."""
        edma = v.EDMA_OFFSET
        ch = edma + CH_BASE + RD_OFFSET
        for off, value in ((TRANSFER_SIZE, size), (SAR_LO, rc_addr & 0xFFFFFFFF),
                           (SAR_HI, rc_addr >> 32), (DAR_LO, ep_addr & 0xFFFFFFFF),
                           (DAR_HI, ep_addr >> 32)):
            self.w32(ch + off, value)
        self.w32(edma + RD_ENGINE_EN, 1)
        self.w32(edma + RD_DOORBELL, 0)
        assert wait_eventfd(self.irq[v.VEC_EDMA])

    def start_pci_epf_test_like(self) -> None:
        """A function's epc_init and the configfs start: header, BAR0 in our RAM, MSI-X."""
        assert self.cmd("WRITE_HEADER", 0x16C3 | 0xEDDA << 16 | 0xFF << 56, 1 << 40)[0] == 0
        assert self.cmd("SET_BAR", 0, 0, 0x10000, EP_RAM, 0)[0] == 0
        assert self.cmd("SET_MSIX", 4, 0, 0x1000)[0] == 0
        assert self.cmd("START")[0] == 0


@contextmanager
def serving(tmp_path: Path, profile: str = "generic", **values: str
            ) -> Iterator[tuple[ServerThread, Endpoint, Endpoint]]:
    """A controller an EP guest drives (more of its attributes in ``values``), its RC side
    and its CPU side served."""
    comp = Composition.ep_guest({"profile": profile, **values})
    comp.assign_sockets([str(tmp_path / "rc.sock")])
    comp.assign_sockets([str(tmp_path / "ep.sock")], "ep_socket")
    rc, ep = comp.build()
    with ServerThread(ep.device, ep.socket, ((rc.device, rc.socket),)) as srv:  # type: ignore[arg-type]
        yield srv, rc, ep


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[ServerThread, Endpoint, Endpoint]]:
    with serving(tmp_path) as served:
        yield served


@dataclass
class Started:
    """The EP guest's driver started the controller; an RC with memory is attached."""

    srv: ServerThread
    ep: EpDriver
    host: Client
    rc_mem: mmap.mmap


@pytest.fixture
def started(pair: tuple[ServerThread, Endpoint, Endpoint]) -> Started:
    srv, rc, ep = pair
    d = EpDriver(Client(ep.socket))
    d.start_pci_epf_test_like()
    host = Client(rc.socket)
    return Started(srv, d, host, host.guest_memory(RC_RAM, RC_RAM_SIZE))


def test_identity_and_features_come_from_the_profile(tmp_path: Path) -> None:
    with serving(tmp_path, "rk3588") as (_, _, ep):
        c = Client(ep.socket)
        d = EpDriver(c)
        assert d.r32(v.MAGIC) == v.MAGIC_VALUE and d.r32(v.VERSION) == v.VERSION_VALUE
        name = b"".join(c.read(v.REGS_BAR, v.NAME + i, 4) for i in range(0, v.NAME_SIZE, 4))
        name = name.rstrip(b"\0").decode()
        assert name == EP_GUEST_CONTROLLER
        assert not d.r32(v.FEATURES) & v._H["VEPC_F_INTX_CAPABLE"]  # RK3588 has no INTx
        assert d.r32(v.BAR_DESC + 4 * v.BAR_DESC_STRIDE + v.BAR_TYPE) == 3  # BAR_RESERVED
        assert d.r32(v.EDMA_BAR) == 4 and d.r32(v.EDMA_CHANNELS) == 2
        c.close()


def test_the_rc_side_exists_once_the_ep_guest_starts_it(pair: tuple[ServerThread, Endpoint,
                                                                    Endpoint]) -> None:
    srv, rc, ep = pair
    d = EpDriver(Client(ep.socket))
    with pytest.raises((ConnectionError, OSError)):  # refused: not started yet
        Client(rc.socket).device_info()
    d.start_pci_epf_test_like()
    d.ram[:4] = b"\x34\x12\x0b\xf0"
    host = Client(rc.socket)
    assert host.cfg_read32(PCI_VENDOR_ID) & 0xFFFF == 0x16C3
    assert host.cfg_read32(PCI_DEVICE_ID) & 0xFFFF == 0xEDDA
    assert host.read(0, 0, 4) == b"\x34\x12\x0b\xf0"  # BAR0 shows the EP guest's RAM
    host.write(0, 4, b"\xaa\xbb\xcc\xdd")
    assert d.ram[4:8] == b"\xaa\xbb\xcc\xdd"
    assert wait_eventfd(d.irq[v.VEC_EVENT]) and d.events() == [v.EV_LINK_UP]
    host.reset()  # PERST#: the functions deinit, then init
    srv.wait_idle()
    assert d.events() == [v.EV_DEINIT, v.EV_INIT]
    host.close()
    srv.wait_idle()
    assert d.events() == [v.EV_LINK_DOWN]


def test_bad_commands_are_errnos_and_the_server_goes_on(
        pair: tuple[ServerThread, Endpoint, Endpoint]) -> None:
    _, _, ep = pair
    d = EpDriver(Client(ep.socket))
    assert d.cmd("SET_BAR", 9, 0, 0x1000, EP_RAM, 0)[0] == -errno.EINVAL
    assert d.cmd("SET_BAR", 1, 0, 0x1000, EP_RAM, 99)[0] == -errno.EINVAL  # pieces
    assert d.cmd("SET_MSI", 64)[0] == -errno.EINVAL
    assert d.cmd("RAISE_IRQ", 3, 1)[0] == -errno.EINVAL  # no such IRQ type
    assert d.cmd("RAISE_IRQ", PCI_IRQ_MSIX, 1)[0] == -errno.EINVAL  # not started
    assert d.cmd("WRITE_HEADER", 0, 9 << 40)[0] == -errno.EINVAL  # interrupt pin 9
    d.w32(v.CMD, 77)
    assert d.r32(v.CMD_STATUS) == -errno.EOPNOTSUPP & 0xFFFFFFFF
    d.w32(v.MAGIC, 0)  # read-only: logged, kept
    assert d.r32(v.MAGIC) == v.MAGIC_VALUE
    d.start_pci_epf_test_like()


def test_the_edma_copies_rc_memory_into_ep_guest_ram_and_interrupts_it(
        started: Started) -> None:
    d, rc_mem = started.ep, started.rc_mem
    started.host.enable_interrupts(4, msix=True)
    rc_mem[:8] = b"from-rc!"
    d.edma_read(EP_RAM + 0x800, RC_RAM, 8)
    assert d.ram[0x800:0x808] == b"from-rc!"
    assert d.r32(v.EDMA_OFFSET + RD_INT_STATUS) & 1  # done, channel 0


def test_the_edmas_status_is_read_without_the_event_loop(tmp_path: Path, path: str) -> None:
    """A driver reads INT_STATUS on every transfer's interrupt (twice a transfer, the EPC
    driver; dw-edma too): on the C path the EP socket's I/O thread answers it (the eDMA's
    reads are read_in_io_thread), with what the engine left there."""
    with serving(tmp_path) as (srv, rc, ep):
        d = EpDriver(Client(ep.socket))
        d.start_pci_epf_test_like()
        host = Client(rc.socket)
        host.guest_memory(RC_RAM, RC_RAM_SIZE)
        edma = v.EDMA_OFFSET

        def stats() -> dict[str, int]:
            fast = srv.listener.active.fast
            return fast.stats() if fast else {"register_reads": 0, "to_python": 0}

        d.edma_read(EP_RAM + 0x800, RC_RAM, 8)
        before = srv.call(stats)
        assert d.r32(edma + RD_INT_STATUS) == 1 and d.r32(edma + CTRL) == 2 | 2 << 16
        after = srv.call(stats)
        host.close()
    assert after["register_reads"] - before["register_reads"] == (2 if path == "c" else 0)
    assert after["to_python"] == before["to_python"]


def test_the_embedded_doorbell_reaches_the_ep_guest(
        pair: tuple[ServerThread, Endpoint, Endpoint]) -> None:
    """pci-epf-test's DOORBELL: BAR1 pointed at the eDMA's interrupt-emulation register
    (aligned down to the BAR's size, as pci_epf_align_inbound_addr() does); the RC writes
    0 there and the EP guest gets VEC_DOORBELL."""
    _, rc, ep = pair
    d = EpDriver(Client(ep.socket))
    assert d.cmd("SET_BAR", 1, 0, 0x10000, EP_RAM + 0x10000, 0)[0] == 0
    d.start_pci_epf_test_like()
    db = d.r32(v.EDMA_BUS_ADDR) + EMUL_DOORBELL_OFFSET
    assert d.cmd("SET_BAR", 1, 0, 0x10000, db & ~0xFFFF, 0)[0] == 0
    host = Client(rc.socket)
    host.write(1, db & 0xFFFF, b"\0\0\0\0")
    assert wait_eventfd(d.irq[v.VEC_DOORBELL])


def test_under_dw_edma_the_doorbell_is_the_edmas_own_interrupt(tmp_path: Path) -> None:
    """dma_channels=dw-edma: the driver is told to hand the eDMA to Linux's dw-edma, which
    reads the channel counts from CTRL, and the emulation doorbell asserts the eDMA's own
    interrupt (VEC_EDMA), which dw-edma's handler passes to its doorbell IRQ, as on a SoC."""
    with serving(tmp_path, dma_channels="dw-edma") as (_, rc, ep):
        d = EpDriver(Client(ep.socket))
        assert d.r32(v.DMA_CHANNELS) == v.DMA_KINDS["dw-edma"]
        assert d.r32(v.EDMA_OFFSET + CTRL) == 2 | 2 << 16
        assert d.cmd("SET_BAR", 1, 0, 0x10000, EP_RAM + 0x10000, 0)[0] == 0
        d.start_pci_epf_test_like()
        db = d.r32(v.EDMA_BUS_ADDR) + EMUL_DOORBELL_OFFSET
        assert d.cmd("SET_BAR", 1, 0, 0x10000, db & ~0xFFFF, 0)[0] == 0
        Client(rc.socket).write(1, db & 0xFFFF, b"\0\0\0\0")
        assert wait_eventfd(d.irq[v.VEC_EDMA])
        assert not wait_eventfd(d.irq[v.VEC_DOORBELL], timeout=0.2)


def test_the_aperture_reaches_rc_memory_through_the_outbound_atu(started: Started) -> None:
    d, rc_mem = started.ep, started.rc_mem
    rc_mem[0x100:0x104] = b"RCRC"
    ob = int.from_bytes(d.c.read(v.REGS_BAR, v.OB_BUS_ADDR, 8), "little")
    assert d.cmd("MAP_ADDR", ob + 0x3000, RC_RAM, 0x1000)[0] == 0
    assert d.c.read(v.OB_BAR, 0x3100, 4) == b"RCRC"
    d.c.write(v.OB_BAR, 0x3104, b"EPEP")
    started.srv.wait_idle()  # a posted write: acknowledged first, applied in order
    assert rc_mem[0x104:0x108] == b"EPEP"
    assert d.cmd("UNMAP_ADDR", ob + 0x3000)[0] == 0


def test_the_aperture_with_no_rc_reads_all_ones_and_drops_writes(
        pair: tuple[ServerThread, Endpoint, Endpoint], caplog: pytest.LogCaptureFixture) -> None:
    """The RC guest gone (or never there), the EP guest's function still writes through
    its mapping, as ntb_transport does until it hears link down: a dead link, not a server
    error; the reason logged once, the server serving on."""
    srv, _, ep = pair
    d = EpDriver(Client(ep.socket))
    d.start_pci_epf_test_like()
    ob = int.from_bytes(d.c.read(v.REGS_BAR, v.OB_BUS_ADDR, 8), "little")
    assert d.cmd("MAP_ADDR", ob, RC_RAM, 0x1000)[0] == 0
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            d.c.write(v.OB_BAR, 0x10, b"lost")
        assert d.c.read(v.OB_BAR, 0x10, 4) == b"\xff" * 4
        srv.wait_idle()
    refused = [r.getMessage() for r in caplog.records if "no RC attached" in r.getMessage()]
    # the writes' reason once, how often it came again, then the read's
    assert len(refused) == 3 and "2 more times" in refused[1], refused
    assert "writes are dropped" in refused[0] and "all ones" in refused[2], refused
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert d.r32(v.EVENT) is not None  # still serving


def test_an_ep_guest_gone_reads_as_a_dead_link_and_the_next_one_takes_over(
        pair: tuple[ServerThread, Endpoint, Endpoint]) -> None:
    """The EP guest's QEMU goes: the RC's BAR reads return all ones (its writes go nowhere),
    the outbound iATU is reset; the next EP guest's RAM stays out of the RC's reach until it
    starts the same controller again."""
    srv, rc, ep = pair
    first = EpDriver(Client(ep.socket))
    first.start_pci_epf_test_like()
    ob = int.from_bytes(first.c.read(v.REGS_BAR, v.OB_BUS_ADDR, 8), "little")
    assert first.cmd("MAP_ADDR", ob, RC_RAM, 0x1000)[0] == 0
    host = Client(rc.socket)
    first.ram[:4] = b"live"
    assert host.read(0, 0, 4) == b"live"
    first.c.close()
    srv.wait_idle()
    assert host.read(0, 0, 4) == b"\xff" * 4
    host.write(0, 0, b"lost")
    assert not srv.call(lambda: ep.epc.ops.outbound.regions)  # type: ignore[union-attr]
    second = EpDriver(Client(ep.socket))
    second.ram[:4] = b"back"
    srv.wait_idle()
    # booting, its controller not started: its RAM is not the RC's to read yet
    assert host.read(0, 0, 4) == b"\xff" * 4
    second.start_pci_epf_test_like()  # the same header and BARs: START finds it started
    assert second.events() == [v.EV_LINK_UP]  # the RC was there all along
    assert host.read(0, 0, 4) == b"back"


def test_one_ep_guests_two_controllers_share_its_soc(tmp_path: Path) -> None:
    """pci-epf-ntb in one EP guest (pci-ntb-howto.rst's two controllers): each has its
    name and its own aperture on one SoC bus, and a BAR of the first translated to the
    second's aperture reaches what the second maps there, the second RC's memory."""
    names = ("2900000.pcie-ep", "2910000.pcie-ep")
    comp = Composition.ep_guest({}, names)
    comp.assign_sockets([f"{n}={tmp_path / n}.rc" for n in names])
    comp.assign_sockets([f"{n}={tmp_path / n}.ep" for n in names], "ep_socket")
    rc1, ep1, rc2, ep2 = comp.build()
    assert ep1.epc is not None and ep2.epc is not None and ep1.epc.soc is ep2.epc.soc
    with ServerThread(ep1.device, ep1.socket,  # type: ignore[arg-type]
                      ((ep2.device, ep2.socket), (rc1.device, rc1.socket),  # type: ignore[arg-type]
                       (rc2.device, rc2.socket))):  # type: ignore[arg-type]
        first, second = EpDriver(Client(ep1.socket)), EpDriver(Client(ep2.socket))
        for d, name in ((first, names[0]), (second, names[1])):
            raw = b"".join(d.c.read(v.REGS_BAR, v.NAME + i, 4) for i in range(0, v.NAME_SIZE, 4))
            assert raw.rstrip(b"\0").decode() == name
        ob1, ob2 = (int.from_bytes(d.c.read(v.REGS_BAR, v.OB_BUS_ADDR, 8), "little")
                    for d in (first, second))
        assert ob1 != ob2
        assert first.cmd("SET_BAR", 2, 0, 0x10000, ob2, 0)[0] == 0
        first.start_pci_epf_test_like()
        second.start_pci_epf_test_like()
        host2 = Client(rc2.socket)
        rc2_mem = host2.guest_memory(RC_RAM, RC_RAM_SIZE)
        rc2_mem[:8] = b"host two"
        assert second.cmd("MAP_ADDR", ob2, RC_RAM, 0x10000)[0] == 0
        host1 = Client(rc1.socket)
        assert host1.read(2, 0, 8) == b"host two"
        host1.write(2, 8, b"from one")
        assert host1.read(2, 8, 8) == b"from one"  # in order after the posted write
        assert rc2_mem[8:16] == b"from one"
