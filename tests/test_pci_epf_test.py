"""pci-epf-test behind the vfio-user server, driven like the guest driver would.

Every test runs twice: with the C fast path and with the Python path, which
must behave the same.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from vfio_user_client import Client, ServerThread, wait_eventfd

from vfio_ep.composition import Composition
from vfio_ep.epc.irq import IRQ_HANDLED, IRQF_ONESHOT, IRQF_SHARED, IrqError
from vfio_ep.epf.functions import pci_epf_test as t
from vfio_ep.pci.capabilities import PCI_CAP_ID_MSIX
from vfio_ep.vfio_user import protocol as p

GUEST = 0x100000  # iova of our "guest RAM"
GUEST_SIZE = 4 << 20
REG = {name: off for name, (off, _) in t.REG_OFFSET.items()}


class Guest:
    """Plays the RC side of pci_endpoint_test over our client."""

    def __init__(self, client: Client, reg_bar: int = 0) -> None:
        self.c = client
        self.bar = reg_bar
        self.mem = client.guest_memory(GUEST, GUEST_SIZE)
        msix = PCI_CAP_ID_MSIX in client.capabilities()  # R-Car S4: MSI only, 2 vectors
        self.irq = client.enable_interrupts(2, msix)
        self.irq_type = t.IRQ_TYPE_MSIX if msix else t.IRQ_TYPE_MSI

    def w(self, name: str, value: int) -> None:
        size = t.REG_OFFSET[name][1]
        self.c.write(self.bar, REG[name], value.to_bytes(size, "little"))

    def r(self, name: str) -> int:
        return int.from_bytes(self.c.read(self.bar, REG[name], t.REG_OFFSET[name][1]), "little")

    def release(self) -> None:
        """Let go of our side: the guest memory mapping and the vectors' eventfds."""
        self.mem.close()
        for fd in self.irq:
            os.close(fd)

    def wait_irq(self, vector: int = 0, timeout: float = 5.0) -> bool:
        return wait_eventfd(self.irq[vector], timeout)

    def command(self, cmd: int, **regs: int) -> int:
        self.w("status", 0)
        self.w("irq_type", self.irq_type)
        self.w("irq_number", 1)
        for name, value in regs.items():
            self.w(name, value)
        self.w("command", cmd)
        assert self.wait_irq(), f"no completion interrupt for command {cmd:#x}"
        return self.r("status")


@contextmanager
def serve(tmp_path: Path, **attrs: object) -> Iterator[tuple[ServerThread, Guest]]:
    """pci-epf-test in the one-function composition (controller and function attributes
    in one namespace, as ``--set`` has them)."""
    comp = Composition.single("pci-epf-test", dict(attrs))
    comp.assign_sockets([str(tmp_path / "ep.sock")])
    ep = comp.build()[0]
    with ServerThread(ep.device, ep.socket) as srv:
        srv.epc = ep.epc
        srv.functions = ep.functions
        client = Client(srv.path)
        yield srv, Guest(client)
        client.close()


@pytest.fixture
def ep(tmp_path: Path, path: str) -> Iterator[tuple[ServerThread, Guest]]:
    with serve(tmp_path) as served:
        yield served


def test_caps_and_bars(ep: tuple[ServerThread, Guest]) -> None:
    _srv, g = ep
    caps = g.r("caps")
    assert caps == (t.CAP_UNALIGNED_ACCESS | t.CAP_MSI | t.CAP_MSIX | t.CAP_INTX
                    | t.CAP_SUBRANGE_MAPPING | t.CAP_DYNAMIC_INBOUND_MAPPING)
    sizes = [g.c.region_info(i)[0]["size"] for i in range(6)]
    assert sizes == [1024, 128 << 10, 128 << 10, 128 << 10, 128 << 10, 1 << 20]


@pytest.mark.parametrize("use_dma", [0, t.FLAG_USE_DMA])
def test_read_write_copy(ep: tuple[ServerThread, Guest], use_dma: int) -> None:
    _, g = ep
    data = os.urandom(100_001)
    g.mem[0x1003 : 0x1003 + len(data)] = data
    status = g.command(t.COMMAND_READ, src_addr=GUEST + 0x1003, size=len(data),
                       checksum=zlib.crc32(data) ^ 0xFFFFFFFF, flags=use_dma)
    assert status == t.STATUS_READ_SUCCESS | t.STATUS_IRQ_RAISED
    status = g.command(t.COMMAND_WRITE, dst_addr=GUEST + 0x80001, size=4097, flags=use_dma)
    assert status == t.STATUS_WRITE_SUCCESS | t.STATUS_IRQ_RAISED
    written = bytes(g.mem[0x80001 : 0x80001 + 4097])
    assert zlib.crc32(written) ^ 0xFFFFFFFF == g.r("checksum")
    status = g.command(t.COMMAND_COPY, src_addr=GUEST + 0x1003, dst_addr=GUEST + 0x200000,
                       size=len(data), flags=use_dma)
    assert status == t.STATUS_COPY_SUCCESS | t.STATUS_IRQ_RAISED
    assert bytes(g.mem[0x200000 : 0x200000 + len(data)]) == data


def test_commands_are_logged_decoded(ep: tuple[ServerThread, Guest],
                                     caplog: pytest.LogCaptureFixture) -> None:
    """-v (INFO) shows each command by name, what it moved, its STATUS bits and IRQ."""
    srv, g = ep
    caplog.set_level(logging.INFO)
    g.command(t.COMMAND_READ, src_addr=0x7000_0000, size=64, checksum=0)
    srv.wait_idle()  # the line follows the interrupt the command waited for
    assert re.search(r"READ of 0x40 bytes from 0x70000000 by memcpy: STATUS "
                     r"READ_FAIL\|IRQ_RAISED, MSI-X 1, \d+\.\d ms", caplog.text), caplog.text
    assert "DMA map" not in caplog.text  # those are -vv


def test_bad_addresses_fail_but_still_interrupt(ep: tuple[ServerThread, Guest],
                                                caplog: pytest.LogCaptureFixture) -> None:
    _, g = ep
    caplog.set_level(logging.WARNING)
    status = g.command(t.COMMAND_READ, src_addr=0x7000_0000, size=64, checksum=0)
    assert status == t.STATUS_READ_FAIL | t.STATUS_IRQ_RAISED
    status = g.command(t.COMMAND_WRITE, dst_addr=GUEST + GUEST_SIZE - 8, size=64)
    assert status & t.STATUS_WRITE_FAIL and status & t.STATUS_IRQ_RAISED
    status = g.command(t.COMMAND_COPY, src_addr=GUEST, dst_addr=0x7000_0000, size=64)
    assert status & t.STATUS_COPY_FAIL and status & t.STATUS_IRQ_RAISED
    assert "not mapped" in caplog.text


@pytest.mark.parametrize("use_dma", [0, t.FLAG_USE_DMA])
def test_sizes_beyond_any_buffer_fail_like_enomem(ep: tuple[ServerThread, Guest], use_dma: int,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    _, g = ep
    huge = 0xFFFF_FFF0
    for cmd, fail in ((t.COMMAND_READ, t.STATUS_READ_FAIL), (t.COMMAND_WRITE, t.STATUS_WRITE_FAIL),
                      (t.COMMAND_COPY, t.STATUS_COPY_FAIL)):
        status = g.command(cmd, src_addr=GUEST, dst_addr=GUEST, size=huge, flags=use_dma)
        assert status & fail and status & t.STATUS_IRQ_RAISED, hex(status)
    assert "EP RAM exhausted" in caplog.text or "cannot hold" in caplog.text


def test_irq_number_beyond_enabled_vectors_is_refused(ep: tuple[ServerThread, Guest],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    _, g = ep
    g.w("irq_type", t.IRQ_TYPE_MSIX)
    g.w("irq_number", 33)
    g.w("command", t.COMMAND_RAISE_MSIX_IRQ)
    assert not g.wait_irq(timeout=0.5)
    assert "Invalid MSI-X IRQ number 33 / 32" in caplog.text
    assert g.r("status") == t.STATUS_IRQ_RAISED  # set before the check, as in the kernel


def test_bar_subrange_swaps_halves_in_a_direct_bar(ep: tuple[ServerThread, Guest]) -> None:
    _srv, g = ep
    info, _, fds = g.c.region_info(2, argsz=64)
    assert info["flags"] & p.REGION_INFO_FLAG_MMAP  # BAR2 is mapped directly
    bar2 = mmap.mmap(fds[0], 128 << 10, offset=info["offset"])
    os.close(fds[0])
    assert g.command(t.COMMAND_BAR_SUBRANGE_SETUP, size=2) & \
        t.STATUS_BAR_SUBRANGE_SETUP_SUCCESS
    half = 64 << 10
    assert bar2[0] == 0x50 + 2 * 8 and bar2[half] == 0x50 + 2 * 8 + 1  # what the RC checks
    bar2[0:4] = b"\xa0" * 4
    assert g.command(t.COMMAND_BAR_SUBRANGE_CLEAR, size=2) & \
        t.STATUS_BAR_SUBRANGE_CLEAR_SUCCESS
    assert bar2[half : half + 4] == b"\xa0" * 4  # BAR offset 0 was EP memory's second half
    bar2.close()


@pytest.mark.parametrize(("backend", "areas"), [
    # the ITS translater (+0x10040 as BAR1 would show it): its page alone is trapped
    ("msi", [(0, 0x10000), (0x11000, 0xF000)]),
    ("auto", [(0, 0x10000), (0x11000, 0xF000)]),  # the kernel's order: MSI first
    ("embedded", [(0x1000, 0x1F000)]),  # the eDMA doorbell register, +0xa0
    ("poll", [(0, 0x20000)]),  # a word of EP RAM: all of BAR1 is memory
])
def test_doorbell_bar_is_direct_but_where_its_backend_rings(
        tmp_path: Path, path: str, backend: str, areas: list[tuple[int, int]]) -> None:
    """Only the page where this configuration's doorbell register can land stays trapped."""
    with serve(tmp_path, doorbell=backend, doorbell_poll_interval_us=200) as (_, g):
        info, caps, _ = g.c.region_info(1, argsz=128)
        assert [(a.offset, a.size) for a in p.SparseMmapCap.parse(caps).areas] == areas
        assert info["flags"] & p.REGION_INFO_FLAG_MMAP
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        assert g.r("doorbell_bar") == 1
        assert _ring(g)


def _ring(g: Guest, value: int | None = None, delta: int = 0, timeout: float = 5.0) -> bool:
    bar, offset = g.r("doorbell_bar"), g.r("doorbell_offset")
    data = g.r("doorbell_data") if value is None else value
    g.w("status", 0)
    g.c.write(bar, offset + delta, struct.pack("<I", data), posted=True)
    return g.wait_irq(timeout=timeout)


@pytest.mark.parametrize("backend", ["msi", "embedded", "poll"])
def test_doorbell_cycles(tmp_path: Path, path: str, backend: str,
                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serve(tmp_path, doorbell=backend, doorbell_poll_interval_us=200) as (_, g):
        for cycle in range(3):  # free/re-alloc cycles
            status = g.command(t.COMMAND_ENABLE_DOORBELL)
            assert status & t.STATUS_DOORBELL_ENABLE_SUCCESS, hex(status)
            assert _ring(g)
            assert g.r("status") & t.STATUS_DOORBELL_SUCCESS
            if cycle == 0:
                wrong = g.r("doorbell_data") ^ 0x5A
                assert not _ring(g, value=wrong, timeout=0.5)  # wrong value: ignored
                if backend != "poll":  # wrong offset: not the doorbell register
                    assert not _ring(g, delta=4, timeout=0.5)
                assert _ring(g)  # and the doorbell still works
            status = g.command(t.COMMAND_DISABLE_DOORBELL)
            assert status & t.STATUS_DOORBELL_DISABLE_SUCCESS
            assert g.r("doorbell_bar") == 0xFFFFFFFF
        expected = {"msi": "Using MSI doorbell", "embedded": "Using embedded (DMA) doorbell",
                    "poll": "Using poll-mode doorbell"}[backend]
        assert expected in caplog.text
        assert "ignored" in caplog.text


def test_poll_doorbell_follows_its_word_when_the_page_moves(tmp_path: Path, path: str) -> None:
    """The doorbell BAR maps straight onto the poll word's page, so the page moves into that
    BAR's mmap aperture: the poller (a C thread on the C path) must look at the new place."""
    with serve(tmp_path, doorbell="poll", doorbell_poll_interval_us=200) as (srv, g):
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        db = srv.functions[0].db_poll
        assert (db.words._poller is not None) == (path == "c")
        assert db.ram.phys(db.addr) != db.addr - db.ram.base  # the page moved
        for _ in range(3):
            assert _ring(g)


def test_mutable_msi_controller_is_refused(tmp_path: Path, path: str,
                                           caplog: pytest.LogCaptureFixture) -> None:
    with serve(tmp_path, doorbell="msi", msi_mutable=True) as (_, g):
        status = g.command(t.COMMAND_ENABLE_DOORBELL)
        assert status & t.STATUS_DOORBELL_ENABLE_FAIL
        assert "Mutable MSI controller not supported" in caplog.text


def test_auto_falls_back_in_kernel_order(tmp_path: Path, path: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with serve(tmp_path, doorbell="auto", controller="rcar-s4") as (_, g):
        # R-Car S4 has no platform MSI controller: the eDMA doorbell is next.
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        assert "Using embedded (DMA) doorbell fallback" in caplog.text
        assert _ring(g)


def test_rk3588_doorbell_is_pre_exposed_in_bar4(tmp_path: Path, path: str) -> None:
    with serve(tmp_path, doorbell="embedded", controller="rk3588") as (_, g):
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        assert (g.r("doorbell_bar"), g.r("doorbell_offset")) == (4, 0xA0)
        assert _ring(g)


def test_embedded_doorbell_irq_is_shared(tmp_path: Path, path: str) -> None:
    """IRQF_SHARED: another handler on the eDMA doorbell virq runs alongside pci-epf-test's."""
    with serve(tmp_path, doorbell="embedded") as (srv, g):
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        epc = srv.epc
        seen: list[int] = []

        def other(virq: int, dev_id: object) -> int:
            seen.append(virq)
            return IRQ_HANDLED

        virq = epc.ops.edma.emul_virq
        srv.call(epc.irqs.request_irq, virq, other, IRQF_SHARED | IRQF_ONESHOT, "other", seen)
        with pytest.raises(IrqError):  # not shared: refused
            srv.call(epc.irqs.request_irq, virq, lambda v, d: IRQ_HANDLED, IRQF_ONESHOT,
                     "exclusive", object())
        assert _ring(g)
        srv.wait_idle()  # the guest's interrupt may arrive before the next handler ran
        assert seen == [virq]
        assert g.r("status") & t.STATUS_DOORBELL_SUCCESS


def test_c_path_rings_the_doorbell_itself(tmp_path: Path, path: str) -> None:
    with serve(tmp_path, doorbell="msi") as (srv, g):
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        assert _ring(g)
        conn = srv.listener.active
        assert conn is not None
        rung_by_c = conn.fast.stats()["doorbells"] if conn.fast else 0
        assert rung_by_c == (1 if path == "c" else 0)


def test_reset_while_a_dma_transfer_waits_for_the_client(tmp_path: Path, path: str) -> None:
    """DEVICE_RESET while the eDMA waits on a DMA_READ the client never answers: the
    command is cancelled with the reset (cancel_work_sync, dmaengine_terminate_sync) and
    the next command after re-enabling works, without waiting out the DMA timeout."""
    fdless = 0x4000_0000
    with serve(tmp_path) as (_, g):
        c = g.c
        c.dma_map(fdless, 1 << 20)  # no fd: the server reaches it with DMA_READ messages
        for name, value in (("status", 0), ("irq_type", g.irq_type), ("irq_number", 1),
                            ("src_addr", fdless), ("size", 4096), ("checksum", 0),
                            ("flags", t.FLAG_USE_DMA), ("command", t.COMMAND_READ)):
            g.w(name, value)
        hdr, _, _ = c.recv()
        assert hdr["command"] == p.Command.DMA_READ  # left unanswered
        c.reset()
        g = Guest(c)
        data = os.urandom(4096)
        g.mem[:4096] = data
        status = g.command(t.COMMAND_READ, src_addr=GUEST, size=4096,
                           checksum=zlib.crc32(data) ^ 0xFFFFFFFF, flags=t.FLAG_USE_DMA)
        assert status == t.STATUS_READ_SUCCESS | t.STATUS_IRQ_RAISED


FDLESS = 0x4000_0000  # RC memory without a shared fd: reached with DMA_READ/DMA_WRITE
XFER = 4096  # the smallest max_data_xfer_size: a transfer is several DMA messages
TRANSFERS = [(cmd, dma) for cmd in (t.COMMAND_READ, t.COMMAND_WRITE, t.COMMAND_COPY)
             for dma in (0, t.FLAG_USE_DMA)]


def _start_transfer(g: Guest, cmd: int, flags: int, data: bytes) -> None:
    """Program ``cmd`` over the fd-less RC memory (source data at its start, destination
    half way) and write COMMAND, without waiting."""
    g.c.fdless[FDLESS][: len(data)] = data
    for name, value in (("status", 0), ("irq_type", g.irq_type), ("irq_number", 1),
                        ("src_addr", FDLESS), ("dst_addr", FDLESS + (1 << 19)),
                        ("size", len(data)), ("checksum", zlib.crc32(data) ^ 0xFFFFFFFF),
                        ("flags", flags), ("command", cmd)):
        g.w(name, value)


def _connect(srv: ServerThread) -> Guest:
    c = Client(srv.path, max_data_xfer_size=XFER)
    c.dma_map(FDLESS, 1 << 20)
    return Guest(c)


def _completes(g: Guest, cmd: int, flags: int, data: bytes) -> int:
    """Run the transfer to its end, answering every DMA message: the DMA messages it took."""
    _start_transfer(g, cmd, flags, data)
    served = 0
    while not g.wait_irq(timeout=0.01):
        g.c.pump()
        served += 1
    ok = {t.COMMAND_READ: t.STATUS_READ_SUCCESS, t.COMMAND_WRITE: t.STATUS_WRITE_SUCCESS,
          t.COMMAND_COPY: t.STATUS_COPY_SUCCESS}[cmd]
    assert g.r("status") == ok | t.STATUS_IRQ_RAISED
    if cmd == t.COMMAND_COPY:
        assert bytes(g.c.fdless[FDLESS][1 << 19 : (1 << 19) + len(data)]) == data
    return served


@pytest.mark.parametrize(("cmd", "flags"), TRANSFERS,
                         ids=[f"{t.COMMAND_NAMES[c]}-{'dma' if f else 'memcpy'}"
                              for c, f in TRANSFERS])
@pytest.mark.parametrize("fault", ["client-killed", "device-reset"])
def test_a_fault_at_every_point_of_a_transfer(tmp_path: Path, path: str, cmd: int, flags: int,
                                              fault: str) -> None:
    """For every DMA message a transfer makes: the client dies (or resets the device)
    instead of answering it.  The server keeps serving; the next client (or the reset
    device) runs the same transfer to completion, and no fd is left behind."""
    data = os.urandom(4 * XFER)
    with serve(tmp_path) as (srv, first):
        first.release()
        first.c.close()
        g = _connect(srv)
        points = _completes(g, cmd, flags, data)
        assert points >= 4  # a message per 4 KiB at least
        g.release()
        g.c.close()
        srv.wait_idle()
        fds = len(os.listdir("/proc/self/fd"))
        for point in range(1, points + 1):
            g = _connect(srv)
            _start_transfer(g, cmd, flags, data)
            for _ in range(point - 1):
                g.c.pump()
            g.c.recv()  # the message at this point: never answered
            g.release()
            if fault == "client-killed":
                g.c.close()
                g = _connect(srv)
            else:
                g.c.reset()
                g = Guest(g.c)
            assert _completes(g, cmd, flags, data) == points, f"after a fault at {point}"
            g.release()
            g.c.close()
            srv.wait_idle()
        assert len(os.listdir("/proc/self/fd")) <= fds


@pytest.mark.parametrize("backend", ["msi", "embedded", "poll"])
def test_a_client_killed_mid_doorbell_or_mid_set_irqs(tmp_path: Path, path: str,
                                                      backend: str) -> None:
    """A client that rings the doorbell and dies before its interrupt, and one that dies
    halfway through sending SET_IRQS: the next client, after the reset QEMU does at start,
    enables and rings the doorbell as if nothing happened."""
    with serve(tmp_path, doorbell=backend, doorbell_poll_interval_us=200) as (srv, g):
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        bar, offset, data = g.r("doorbell_bar"), g.r("doorbell_offset"), g.r("doorbell_data")
        g.c.write(bar, offset, struct.pack("<I", data), posted=True)
        g.release()
        g.c.close()  # the ring is in flight, its MSI-X has nowhere to go

        half = Client(srv.path)
        body = struct.pack("<IIIII", 20 + 4, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                           p.Irq.MSIX, 0, 1)
        half.send_raw(p.pack_header(1, p.Command.DEVICE_SET_IRQS, 16 + len(body), 0)
                      + body[:10])  # the header promises more than ever comes
        half.close()

        c = Client(srv.path)
        c.reset()
        g = Guest(c)
        assert g.command(t.COMMAND_ENABLE_DOORBELL) & t.STATUS_DOORBELL_ENABLE_SUCCESS
        assert _ring(g)
        g.release()
        c.close()
        assert srv.listener.connections == 3
