"""The vfio-user server driven by the project's own client: every command, hostile input."""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from vfio_user_client import Client, ErrorReply, ServerThread, eventfd, eventfd_count

from vfio_ep.pci import testdev
from vfio_ep.pci.bar import Window, WindowKind
from vfio_ep.pci.capabilities import PCI_CAP_ID_EXP, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAP_ID_PM
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.dma import DmaError
from vfio_ep.vfio_user.protocol import Command, Irq, Region
from vfio_ep.vfio_user.server import Listener, SocketPathError

MSIX_CTRL_ENABLE = 0x8000


@pytest.fixture
def server(tmp_path: Path, path: str) -> Iterator[ServerThread]:
    """testdev served on the C fast path and on the Python path (the ``path`` fixture)."""
    with ServerThread(testdev.build({}), tmp_path / "run" / "ep.sock") as srv:
        yield srv


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    c = Client(server.path)
    yield c
    c.close()


def wait_disconnected(server: ServerThread) -> None:
    for _ in range(100):
        if server.listener.active is None:
            return
        threading.Event().wait(0.05)
    raise AssertionError("the server still serves the old client")


def serves_again(server: ServerThread) -> None:
    """After whatever happened, a fresh client negotiates and reads config space."""
    wait_disconnected(server)
    c = Client(server.path)
    assert c.cfg_read32(0) == 0xEDDA16C3
    c.close()


def test_socket_is_private_and_parent_created(server: ServerThread) -> None:
    mode = server.path.stat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ep.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))  # a crashed server's: bound, nobody listening
    stale.close()
    with ServerThread(testdev.build({}), path):
        c = Client(path)
        assert c.cfg_read32(0) == 0xEDDA16C3
        c.close()


def test_on_exit_only_our_own_socket_is_unlinked(tmp_path: Path) -> None:
    """A successor that replaced our socket file keeps it when we stop."""
    path = tmp_path / "ep.sock"
    with ServerThread(testdev.build({}), path):
        path.unlink()
        successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        successor.bind(str(path))
    assert path.is_socket()
    successor.close()


def test_a_live_socket_is_not_taken_over(server: ServerThread) -> None:
    with pytest.raises(SocketPathError, match="another server is listening") as e:
        Listener(server.path, testdev.build({})).bind()
    assert e.value.errno == errno.EADDRINUSE
    for _ in range(100):  # the probe was a (brief) client of the live server
        if server.listener.connections:
            break
        threading.Event().wait(0.05)
    serves_again(server)


def test_version_and_device_info(client: Client) -> None:
    caps = client.version()["capabilities"]
    assert caps["max_msg_fds"] == 16
    assert caps["max_data_xfer_size"] == 1 << 20
    assert caps["write_multiple"] is True
    assert len(p.version_capabilities()) + 16 + 4 + 1 < 214  # QEMU's reply buffer
    info = client.device_info()
    assert info["flags"] == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET
    assert (info["num_regions"], info["num_irqs"]) == (9, 5)


def test_region_info_sizes_and_sparse_mmap(client: Client, server: ServerThread) -> None:
    sizes = {i: client.region_info(i)[0]["size"] for i in range(9)}
    assert sizes == {0: 16 << 10, 1: 64 << 10, 2: 1 << 20, 3: 0, 4: 0, 5: 0, 6: 0, 7: 4096, 8: 0}
    short, caps, fds = client.region_info(Region.BAR2)
    assert short["argsz"] > 32 and not short["flags"] & p.REGION_INFO_FLAG_CAPS
    assert not caps and not fds
    info, caps, fds = client.region_info(Region.BAR2, argsz=short["argsz"])
    assert info["flags"] & p.REGION_INFO_FLAG_MMAP and info["cap_offset"] == 32
    assert len(fds) == 1
    cap = p.SparseMmapCap.parse(caps)
    assert cap.id == p.REGION_INFO_CAP_SPARSE_MMAP
    assert [(a.offset, a.size) for a in cap.areas] == [(0, 1 << 20)]
    # The guest's mapping and the server's see the same bytes.
    m = mmap.mmap(fds[0], 1 << 20, offset=info["offset"])
    os.close(fds[0])
    m[0x100:0x104] = b"ABCD"
    assert client.read(Region.BAR2, 0x100, 4) == b"ABCD"
    client.write(Region.BAR2, 0x200, b"wxyz")
    assert m[0x200:0x204] == b"wxyz"
    m.close()
    # Register BARs are trapped: no MMAP, no fd.
    info, _, fds = client.region_info(Region.BAR0, argsz=256)
    assert not info["flags"] & p.REGION_INFO_FLAG_MMAP and not fds


def test_config_space_write_semantics(client: Client) -> None:
    assert client.cfg_read32(0x00) == 0xEDDA16C3
    assert client.cfg_read32(0x08) >> 8 == 0xFF0000
    # BAR sizing: the writable bits are the address bits.
    client.cfg_write(0x10, 0xFFFFFFFF)
    assert client.cfg_read32(0x10) == ~((16 << 10) - 1) & 0xFFFFFFFF
    assert client.cfg_read32(0x18) & 0xF == 0xC  # BAR2: 64-bit prefetchable
    client.cfg_write(0x18, 0xFFFFFFFF)
    client.cfg_write(0x1C, 0xFFFFFFFF)
    assert client.cfg_read32(0x18) == (~((1 << 20) - 1) & 0xFFFFFFF0) | 0xC
    assert client.cfg_read32(0x1C) == 0xFFFFFFFF
    client.cfg_write(0x20, 0xFFFFFFFF)  # absent BAR4
    assert client.cfg_read32(0x20) == 0
    client.cfg_write(0x30, 0xFFFFF800)  # no ROM
    assert client.cfg_read32(0x30) == 0
    # COMMAND keeps only its defined RW bits; vendor ID is read-only.
    client.cfg_write(0x04, 0xFFFF, size=2)
    assert client.cfg_read32(0x04) & 0xFFFF == 0x0547
    client.cfg_write(0x00, 0x12345678)
    assert client.cfg_read32(0x00) == 0xEDDA16C3
    # Unaligned, odd-sized writes are accepted (QEMU does this for MSI-X flags).
    client.write(Region.CONFIG, 0x3D, b"\x07\x07")
    assert client.read(Region.CONFIG, 0x3D, 1) == b"\x01"  # INT_PIN is read-only


def test_capability_list(client: Client) -> None:
    cfg = client.read(Region.CONFIG, 0, 256)
    assert cfg[0x06] & 0x10
    found = []
    pos = cfg[0x34]
    while pos:
        found.append(cfg[pos])
        pos = cfg[pos + 1]
    assert found == [PCI_CAP_ID_PM, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAP_ID_EXP]
    msix = cfg.index(bytes([PCI_CAP_ID_MSIX]), 0x40)
    ctrl, table, pba = struct.unpack_from("<HII", cfg, msix + 2)
    assert ctrl & 0x7FF == 31 and table == 0x1000 and pba == 0x2000
    assert client.read(Region.BAR0, 0x2000, 8) == bytes(8)  # PBA reads are forwarded
    assert len(client.read(Region.CONFIG, 0, 4096)) == 4096


def test_posted_writes_are_ordered_and_unanswered(client: Client) -> None:
    for i in range(100):
        client.write(Region.BAR0, 0x40, struct.pack("<I", i), posted=True)
    client.write(Region.BAR0, 0x48, b"\x01\x02", posted=True)
    # The next reply is the read's: nothing was answered for the posted writes.
    assert client.read(Region.BAR0, 0x40, 4) == struct.pack("<I", 99)
    assert client.read(Region.BAR0, 0x48, 2) == b"\x01\x02"


class _Registers:
    """A register block whose reads are a function of the offset; one register refuses."""

    read_in_io_thread = True

    def read(self, offset: int, size: int) -> int:
        if offset == 8:
            raise ValueError("register 8 is not readable")
        return 0x100 + offset

    def write(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("not written here")


def test_register_reads_are_answered_by_the_io_thread(tmp_path: Path, path: str) -> None:
    """A register block whose handler allows it (read_in_io_thread): on the C path the I/O
    thread answers its reads by calling the handler, without handing them to the event
    loop, and behind the writes queued before them (testdev's scratch registers); a read
    the handler raises on goes to Python after all, which refuses it as it always did."""
    device = testdev.build({"bar4_size": 4096})
    device.windows.replace_bar(4, [Window(4, 0, 4096, WindowKind.MMIO, _Registers())])
    with ServerThread(device, tmp_path / "ep.sock") as server:
        client = Client(server.path)

        def stats() -> dict[str, int]:
            fast = server.listener.active.fast
            return fast.stats() if fast else {"register_reads": 0, "to_python": 0}

        before = server.call(stats)
        assert client.read(Region.BAR4, 4, 4) == (0x104).to_bytes(4, "little")
        assert client.read(Region.BAR4, 0x10, 2) == (0x110).to_bytes(2, "little")
        client.write(Region.BAR0, 0x40, struct.pack("<I", 7), posted=True)
        assert client.read(Region.BAR0, 0x40, 4) == struct.pack("<I", 7)
        after = server.call(stats)
        with pytest.raises(ErrorReply):
            client.read(Region.BAR4, 8, 4)
        with pytest.raises(ErrorReply):  # misaligned: Python's to refuse
            client.read(Region.BAR4, 2, 4)
        refused = server.call(stats)
        client.close()
    answered = 3 if path == "c" else 0
    assert after["register_reads"] - before["register_reads"] == answered
    assert after["to_python"] == before["to_python"]  # the write was queued, not handed over
    assert refused["register_reads"] == after["register_reads"]
    assert refused["to_python"] - after["to_python"] == (2 if path == "c" else 0)


def test_write_multi(client: Client) -> None:
    client.write_multi([(Region.BAR0, 0x50, b"\x11\x22\x33\x44"), (Region.BAR0, 0x54, b"\x55"),
                        (Region.BAR1, 0x10, b"12345678")])
    assert client.read(Region.BAR0, 0x50, 8) == b"\x11\x22\x33\x44\x55\0\0\0"
    assert client.read(Region.BAR1, 0x10, 8) == b"12345678"


def _enable_msix(client: Client) -> int:
    cfg = client.read(Region.CONFIG, 0, 256)
    pos = cfg.index(bytes([PCI_CAP_ID_MSIX]), 0x40)
    client.cfg_write(pos + 2, MSIX_CTRL_ENABLE, size=2)
    return pos


def _raise(client: Client, irq_type: int, number: int) -> None:
    client.write(Region.BAR0, testdev.REG_IRQ_TYPE, struct.pack("<I", irq_type), posted=True)
    client.write(Region.BAR0, testdev.REG_IRQ_NUMBER, struct.pack("<I", number), posted=True)
    client.write(Region.BAR0, testdev.REG_COMMAND,
                 struct.pack("<I", 1 << irq_type), posted=True)


def test_a_register_write_is_posted_and_its_effect_comes_before_what_follows(
        server: ServerThread, client: Client, path: str) -> None:
    """A non-posted BAR write to a register Python handles (testdev's COMMAND): on the C path
    it is acknowledged before Python applies it, as PCIe posts memory writes, and the next
    message is served only after its effect (the IRQ raised, STATUS set)."""
    (fd,) = client.enable_interrupts(1, msix=True)
    client.write(Region.BAR0, testdev.REG_IRQ_TYPE, struct.pack("<I", 2))
    client.write(Region.BAR0, testdev.REG_IRQ_NUMBER, struct.pack("<I", 1))  # vector 0
    client.write(Region.BAR0, testdev.REG_COMMAND, struct.pack("<I", 1 << 2))  # a reply
    assert client.read(Region.BAR0, testdev.REG_STATUS, 4) == struct.pack("<I", 1 << 6)
    assert eventfd_count(fd) == 1
    acked = server.call(lambda: server.listener.active.fast.stats()["early_acks"]
                        if server.listener.active.fast else 0)
    assert acked == (3 if path == "c" else 0)
    with pytest.raises(ErrorReply):  # a misaligned one is refused, with an error reply
        client.write(Region.BAR0, testdev.REG_COMMAND + 1, struct.pack("<I", 1))
    client.close()
    server.wait_idle()
    early = Client(server.path, negotiate=False)  # the next client, before its VERSION
    with pytest.raises(ErrorReply):  # refused, not acknowledged
        early.write(Region.BAR0, testdev.REG_COMMAND, struct.pack("<I", 0))


def test_a_burst_of_register_writes_is_queued_and_applied_in_order(
        server: ServerThread, client: Client, path: str) -> None:
    """Register writes sent back to back without waiting (more than the C queue holds):
    each is answered, in order, and Python applies them all in order; on the C path they
    are queued (acknowledged without waiting for Python one by one)."""
    n = 3 * 64 + 5  # VFU_POSTED_MAX is 64: the stream waits for room twice, then some
    ids = [client.send(Command.REGION_WRITE, struct.pack("<QII", 0x40 + 4 * (i % 8),
                                                           Region.BAR0, 4) +
                       struct.pack("<I", i)) for i in range(n)]
    replies = [client.recv()[0] for _ in range(n)]
    assert [h["msg_id"] for h in replies] == ids
    assert not any(h["flags"] & p.FLAG_ERROR for h in replies)
    assert [client.read(Region.BAR0, 0x40 + 4 * k, 4) for k in range(8)] == [
        struct.pack("<I", max(i for i in range(n) if i % 8 == k)) for k in range(8)]
    queued = server.call(lambda: server.listener.active.fast.stats()["posted"]
                         if server.listener.active.fast else 0)
    assert queued == (n if path == "c" else 0)


def test_nothing_c_serves_passes_a_queued_register_write(client: Client) -> None:
    """A read C answers itself (BAR1 RAM) right after a register write Python applies
    (COMMAND, raising MSI-X): the read's reply comes only after the interrupt."""
    (fd,) = client.enable_interrupts(1, msix=True)
    client.write(Region.BAR0, testdev.REG_IRQ_TYPE, struct.pack("<I", 2))
    client.write(Region.BAR0, testdev.REG_IRQ_NUMBER, struct.pack("<I", 1))
    for _ in range(20):
        client.write(Region.BAR0, testdev.REG_COMMAND, struct.pack("<I", 1 << 2))
        client.read(Region.BAR1, 0, 4)
        assert eventfd_count(fd) == 1


def test_idle_covers_a_message_waiting_behind_queued_writes(server: ServerThread,
                                                             client: Client) -> None:
    """A RAM write C serves, read off the socket while a register write was queued, waits in
    the thread: the server is not idle until it is in memory (wait_idle, which tests and
    the soak rely on, must not look past it)."""
    for i in range(2000):
        client.write(Region.BAR0, 0x40, struct.pack("<I", i), posted=True)
        client.write(Region.BAR1, 0, struct.pack("<I", i), posted=True)
        server.wait_idle()
        got = server.call(lambda: server.listener.active.device.region_read(1, 0, 4))
        assert got == struct.pack("<I", i)


def test_an_acknowledged_write_survives_the_servers_stop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A register write C acknowledged while the event loop was busy, then the server
    stopped before the loop took it: it is applied all the same (the client was told OK).
    The C path only: on the Python path nothing answers while the loop is busy."""
    monkeypatch.setenv("VFIO_EP_FASTPATH", "1")
    dev = testdev.build({})
    with ServerThread(dev, tmp_path / "ep.sock") as srv:
        c = Client(srv.path)

        def busy_then_stop() -> None:
            time.sleep(0.5)  # a long device handler, say
            srv._scope.cancel()

        busy = threading.Thread(target=srv.call, args=(busy_then_stop,))
        busy.start()
        time.sleep(0.05)
        c.write(Region.BAR0, 0x40, struct.pack("<I", 0xABCD))  # answered by C alone
    busy.join()
    c.close()
    assert dev.region_read(0, 0x40, 4) == struct.pack("<I", 0xABCD)


def test_msix_vectors_added_one_by_one(client: Client) -> None:
    info = client.irq_info(Irq.MSIX)
    assert info["count"] == 32 and not info["flags"] & 0x8  # no NORESIZE
    assert client.irq_info(Irq.ERR)["count"] == 0
    _enable_msix(client)
    client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 1)
    fds = [eventfd() for _ in range(3)]
    for v, fd in enumerate(fds):
        client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, v, 1, (fd,))
    _raise(client, 2, 2)
    assert client.read(Region.BAR0, testdev.REG_STATUS, 4) == struct.pack("<I", 1 << 6)
    assert [eventfd_count(fd) for fd in fds] == [0, 1, 0]
    # De-assigning (a chunk of -1s, sent without fds) stops signalling.
    client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 1, 1)
    _raise(client, 2, 2)
    client.read(Region.BAR0, 0, 4)
    assert eventfd_count(fds[1]) == 0
    client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER, 0, 0)
    for fd in fds:
        os.close(fd)


def test_msi_respects_enabled_vector_count(client: Client) -> None:
    cfg = client.read(Region.CONFIG, 0, 256)
    pos = cfg.index(bytes([PCI_CAP_ID_MSI]), 0x40)
    client.cfg_write(pos + 2, 0x1 | (1 << 4), size=2)  # enable, 2 vectors
    fds = [eventfd(), eventfd()]
    client.set_irqs(Irq.MSI, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 2, tuple(fds))
    _raise(client, 1, 2)
    _raise(client, 1, 3)  # beyond what the host enabled: not raised
    client.read(Region.BAR0, 0, 4)
    assert [eventfd_count(fd) for fd in fds] == [0, 1]
    with pytest.raises(ErrorReply) as e:  # more vectors than the capability has
        client.set_irqs(Irq.MSI, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 31, 2,
                        (eventfd(), eventfd()))
    assert e.value.errno == errno.EINVAL
    for fd in fds:
        os.close(fd)


def test_intx_is_level_and_automasked(client: Client) -> None:
    fd = eventfd()
    client.set_irqs(Irq.INTX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 1, (fd,))
    _raise(client, 0, 0)
    _raise(client, 0, 0)  # masked until the host unmasks: no second edge
    client.read(Region.BAR0, 0, 4)
    assert eventfd_count(fd) == 1
    client.set_irqs(Irq.INTX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
    _raise(client, 0, 0)
    client.read(Region.BAR0, 0, 4)
    assert eventfd_count(fd) == 1
    # COMMAND.INTX_DISABLE holds the line back.
    client.set_irqs(Irq.INTX, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK, 0, 1)
    client.cfg_write(0x04, 0x400, size=2)
    _raise(client, 0, 0)
    client.read(Region.BAR0, 0, 4)
    assert eventfd_count(fd) == 0
    os.close(fd)


def test_dma_through_shared_memfd(client: Client, server: ServerThread) -> None:
    size = 1 << 20
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 2 * size)
    client.dma_map(0x100000, size, fd, offset=size)
    guest = mmap.mmap(fd, 2 * size)
    os.close(fd)
    conn = server.listener.active
    assert conn is not None
    trio.from_thread.run(conn.dma.write, 0x100010, b"hello", trio_token=server._token)
    assert guest[size + 0x10 : size + 0x15] == b"hello"
    guest[size + 0x20 : size + 0x23] = b"abc"
    assert trio.from_thread.run(conn.dma.read, 0x100020, 3, trio_token=server._token) == b"abc"
    with pytest.raises(Exception, match="not mapped"):
        trio.from_thread.run(conn.dma.read, 0x1FFFFE, 4, trio_token=server._token)
    client.dma_unmap(0x100000, size)
    assert len(conn.dma) == 0
    guest.close()


def test_dma_without_fd_uses_messages(client: Client, server: ServerThread) -> None:
    client.dma_map(0x4000, 0x2000)
    client.fdless[0x4000][0x10:0x14] = b"RAM!"
    conn = server.listener.active
    assert conn is not None
    result: list[bytes] = []

    def device_side() -> None:
        result.append(trio.from_thread.run(conn.dma.read, 0x4010, 4, trio_token=server._token))
        trio.from_thread.run(conn.dma.write, 0x5000, b"back", trio_token=server._token)

    t = threading.Thread(target=device_side)
    t.start()
    client.pump()
    client.pump()
    t.join(10)
    assert result == [b"RAM!"]
    assert client.fdless[0x4000][0x1000:0x1004] == b"back"


def test_reset_keeps_dma_and_clears_registers(client: Client, server: ServerThread) -> None:
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10000)
    client.dma_map(0, 0x10000, fd)
    os.close(fd)
    client.write(Region.BAR0, 0x40, b"\xaa\xbb\xcc\xdd")
    client.cfg_write(0x04, 0x6, size=2)
    client.reset()
    assert client.read(Region.BAR0, 0x40, 4) == bytes(4)
    assert client.cfg_read32(0x04) & 0xFFFF == 0
    assert server.listener.active is not None and len(server.listener.active.dma) == 1


def test_reconnect_keeps_device_state_and_releases_mappings(server: ServerThread) -> None:
    c = Client(server.path)
    fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 0x10000)
    c.dma_map(0, 0x10000, fd)
    os.close(fd)
    c.write(Region.BAR0, 0x60, b"keep")
    conn = server.listener.active
    c.close()
    serves_again(server)
    assert conn is not None and len(conn.dma) == 0
    wait_disconnected(server)
    c = Client(server.path)
    assert c.read(Region.BAR0, 0x60, 4) == b"keep"
    assert server.listener.connections == 3
    c.close()


def test_second_client_is_refused(client: Client, server: ServerThread) -> None:
    other = Client(server.path, negotiate=False)
    other.sock.settimeout(5)
    assert other.sock.recv(16) == b""  # closed without a word
    other.close()
    assert client.cfg_read32(0) == 0xEDDA16C3


def test_commands_before_version_are_refused(server: ServerThread) -> None:
    c = Client(server.path, negotiate=False)
    with pytest.raises(ErrorReply) as e:
        c.device_info()
    assert e.value.errno == errno.EINVAL
    c.version()
    assert c.device_info()["num_regions"] == 9
    c.close()


@pytest.mark.parametrize(
    ("cmd", "payload", "err"),
    [
        (99, b"", errno.ENOSYS),  # unknown command
        (Command.DEVICE_GET_REGION_IO_FDS, b"\0" * 16, errno.ENOSYS),
        (Command.REGION_READ, b"\0" * 8, errno.EINVAL),  # truncated payload
        (Command.REGION_READ, struct.pack("<QII", 0, 42, 4), errno.EINVAL),  # bad region
        (Command.REGION_READ, struct.pack("<QII", 0x3FFE, 0, 4), errno.EINVAL),  # past BAR0
        (Command.REGION_READ, struct.pack("<QII", 0, 7, 1 << 30), errno.EINVAL),  # huge count
        (Command.REGION_WRITE, struct.pack("<QII", 0x40, 0, 8) + b"abcd", errno.EINVAL),
        (Command.REGION_WRITE, struct.pack("<QII", 0x41, 0, 4) + b"abcd", errno.EINVAL),
        (Command.REGION_WRITE, struct.pack("<QII", 0x40, 3, 4) + b"abcd", errno.EINVAL),
        (Command.DEVICE_GET_REGION_INFO, p.RegionInfo.build(
            {"argsz": 32, "flags": 0, "index": 9, "cap_offset": 0, "size": 0, "offset": 0}),
         errno.EINVAL),
        (Command.DEVICE_GET_IRQ_INFO, struct.pack("<4I", 16, 0, 7, 0), errno.EINVAL),
        (Command.DEVICE_SET_IRQS, struct.pack("<5I", 20, 0x24, 9, 0, 1), errno.EINVAL),
        (Command.DMA_MAP, b"\0" * 4, errno.EINVAL),
    ],
)
def test_bad_requests_get_error_replies(client: Client, server: ServerThread, cmd: int,
                                        payload: bytes, err: int) -> None:
    with pytest.raises(ErrorReply) as e:
        client.request(cmd, payload)
    assert e.value.errno == err
    assert client.cfg_read32(0) == 0xEDDA16C3  # the same connection goes on
    client.close()
    serves_again(server)


U64_WRAP = 0xFFFFFFFFFFFFFFF0  # offset + count wraps past 2^64 for count >= 16


@pytest.mark.parametrize("region", [Region.BAR1, Region.BAR2])  # RAM windows: C serves them
@pytest.mark.parametrize("count", [32, 512 << 10])
def test_accesses_wrapping_past_2_64_are_refused(client: Client, server: ServerThread,
                                                 region: int, count: int) -> None:
    """offset + count past 2^64 must not wrap into a window (it read and wrote server memory)."""
    client.write(region, 0, b"\xa5" * 16)
    with pytest.raises(ErrorReply) as e:
        client.read(region, U64_WRAP, count)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ErrorReply) as e:
        client.write(region, U64_WRAP, b"\x5a" * 32)
    assert e.value.errno == errno.EINVAL
    entry = struct.pack("<QII", U64_WRAP, region, 8) + b"\x5a" * 8
    client.send(Command.REGION_WRITE_MULTI, struct.pack("<Q", 1) + entry, flags=p.FLAG_NO_REPLY)
    assert client.read(region, 0, 16) == b"\xa5" * 16  # nothing before or in the window moved
    assert client.cfg_read32(0) == 0xEDDA16C3


def _open_fds() -> int:
    """This process's open fds: the server thread's share them, so a dup it keeps shows."""
    return len(os.listdir("/proc/self/fd"))


def test_fds_on_a_request_that_takes_none_are_closed(client: Client) -> None:
    client.cfg_read32(0)
    before = _open_fds()
    fds = [eventfd() for _ in range(4)]
    client.request(Command.DEVICE_GET_INFO, p.DeviceInfo.build(
        {"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0}), tuple(fds))
    for fd in fds:
        os.close(fd)
    assert _open_fds() == before  # the server's copies are gone too


@pytest.mark.parametrize(
    "raw",
    [
        b"\x01\x00\x09",  # short header, then gone
        p.pack_header(1, Command.REGION_READ, 8, 0),  # size < 16
        p.pack_header(1, Command.REGION_WRITE, p.MAX_DRAIN_SIZE + 1, 0),  # too big to drain
        p.pack_header(1, Command.REGION_WRITE, 64, 0) + b"\0" * 10,  # vanishes mid-payload
        p.pack_header(1, Command.REGION_READ, 32, 0x7),  # neither request nor reply
    ],
)
def test_untrustworthy_streams_are_closed(client: Client, server: ServerThread, raw: bytes
                                          ) -> None:
    client.send_raw(raw)
    client.sock.shutdown(socket.SHUT_WR)
    client.sock.settimeout(5)
    assert client.sock.recv(64) == b""
    client.close()
    serves_again(server)


EVENTFD_MAX = 0xFFFFFFFFFFFFFFFE


def test_an_irq_fd_that_is_not_an_eventfd_is_refused(client: Client,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    _enable_msix(client)
    r, w = os.pipe()
    with pytest.raises(ErrorReply) as e:
        client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 1, (w,))
    assert e.value.errno == errno.EINVAL
    assert "is not an eventfd" in caplog.text
    _raise(client, 2, 1)  # vector 0: nothing assigned: counted as lost, no traceback
    assert client.cfg_read32(0) == 0xEDDA16C3
    assert not [rec for rec in caplog.records if rec.exc_info]
    os.close(r)
    os.close(w)


def test_a_full_eventfd_does_not_block_the_server(client: Client) -> None:
    """An eventfd whose counter the client left at its maximum: the write that raises the
    interrupt would block; the server coalesces it and keeps answering."""
    _enable_msix(client)
    fd = eventfd()
    os.eventfd_write(fd, EVENTFD_MAX)
    client.set_irqs(Irq.MSIX, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, 1, (fd,))
    _raise(client, 2, 1)  # MSI-X vector 0
    client.sock.settimeout(5)
    assert client.cfg_read32(0) == 0xEDDA16C3  # answered, not stuck in a write
    assert os.eventfd_read(fd) == EVENTFD_MAX  # still signalled
    _raise(client, 2, 1)  # MSI-X vector 0
    client.read(Region.BAR0, 0, 4)
    assert eventfd_count(fd) == 1  # and the next interrupt is delivered
    os.close(fd)


@pytest.mark.parametrize("caps", [
    b'{"capabilities": null}', b'{"capabilities": [1, 2]}', b'[]', b'"caps"', b'{nope',
    b'{"capabilities": {"max_data_xfer_size": 1e400}}',
    b'{"capabilities": {"max_data_xfer_size": 0}}',
    b'{"capabilities": {"max_data_xfer_size": -1}}',
    b'{"capabilities": {"max_data_xfer_size": 512}}',
    b'{"capabilities": {"max_data_xfer_size": "1M"}}',
    b'{"capabilities": {"max_data_xfer_size": true}}',
    b'{"capabilities": {"max_msg_fds": -3}}',
])
def test_hostile_version_capabilities_are_refused(server: ServerThread, caps: bytes,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    c = Client(server.path, negotiate=False)
    with pytest.raises(ErrorReply) as e:
        c.request(Command.VERSION, struct.pack("<HH", 0, 0) + caps + b"\0")
    assert e.value.errno == errno.EINVAL
    assert "refused VERSION" in caplog.text
    assert not [rec for rec in caplog.records if rec.exc_info]
    c.version()  # a sound VERSION on the same connection is accepted
    assert c.cfg_read32(0) == 0xEDDA16C3
    c.close()


def test_a_small_max_data_xfer_size_splits_dma_messages(server: ServerThread) -> None:
    """Chunks of the client's max_data_xfer_size: nothing is lost, nothing is oversized."""
    c = Client(server.path, negotiate=False)
    c.request(Command.VERSION, struct.pack("<HH", 0, 0)
              + b'{"capabilities": {"max_data_xfer_size": 4096}}\0')
    c.dma_map(0x4000, 0x4000)
    conn = server.listener.active
    assert conn is not None
    data = os.urandom(10000)
    t = threading.Thread(target=lambda: trio.from_thread.run(
        conn.dma.write, 0x4001, data, trio_token=server._token))
    t.start()
    for _ in range(3):  # 4096 + 4096 + 1808
        c.pump()
    t.join(10)
    assert bytes(c.fdless[0x4000][1:10001]) == data
    c.close()


def test_dma_map_wrapping_past_2_64_is_refused(client: Client) -> None:
    with pytest.raises(ErrorReply) as e:
        client.dma_map(0xFFFF_FFFF_FFFF_F000, 0x2000)
    assert e.value.errno == errno.EINVAL
    assert client.cfg_read32(0) == 0xEDDA16C3


def test_a_memfd_shrunk_after_dma_map_does_not_crash_the_server(
        client: Client, server: ServerThread) -> None:
    """Guest RAM that the client could truncate is sealed against shrinking, or, when it
    cannot be sealed, reached with DMA messages: never a SIGBUS in the server."""
    size = 1 << 20
    sealable = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
    plain = os.memfd_create("guest-ram")  # without MFD_ALLOW_SEALING: cannot be sealed
    for fd, iova in ((sealable, 0x100000), (plain, 0x400000)):
        os.ftruncate(fd, size)
        client.dma_map(iova, size, fd)
    with pytest.raises(PermissionError):
        os.ftruncate(sealable, 4096)  # sealed by the server
    os.ftruncate(plain, 4096)  # allowed, but the server does not touch it directly
    conn = server.listener.active
    assert conn is not None
    assert trio.from_thread.run(conn.dma.read, 0x100000 + size - 4, 4,
                                trio_token=server._token) == bytes(4)
    refused: list[Exception] = []

    def device_side() -> None:
        try:
            trio.from_thread.run(conn.dma.write, 0x400000 + size - 4, b"late",
                                 trio_token=server._token)
        except DmaError as e:
            refused.append(e)

    t = threading.Thread(target=device_side)
    t.start()
    hdr, _, _ = client.recv()  # a DMA_WRITE message, which the client may refuse
    assert hdr["command"] == Command.DMA_WRITE
    client.send_raw(p.pack_header(hdr["msg_id"], hdr["command"], 16,
                                  p.FLAG_REPLY | p.FLAG_ERROR, errno.EFAULT))
    t.join(10)
    assert "client error" in str(refused[0])
    assert client.cfg_read32(0) == 0xEDDA16C3
    os.close(sealable)
    os.close(plain)


def test_a_write_beyond_max_data_xfer_size_gets_an_error_like_a_read(client: Client) -> None:
    """The stream is still sound (its size is known): read past it and refuse, as for a READ
    of the same count, and the connection goes on."""
    count = p.MAX_DATA_XFER_SIZE + 4096
    with pytest.raises(ErrorReply) as e:
        client.read(Region.BAR1, 0, count)
    assert e.value.errno == errno.EINVAL
    with pytest.raises(ErrorReply) as e:
        client.write(Region.BAR1, 0, bytes(count))
    assert e.value.errno == errno.EINVAL
    fd = eventfd()  # fds on an oversized message are closed, not leaked
    client.send(Command.REGION_WRITE, struct.pack("<QII", 0, Region.BAR1, count) + bytes(count),
                (fd,), flags=p.FLAG_NO_REPLY)
    os.close(fd)
    assert client.cfg_read32(0) == 0xEDDA16C3


VERSION = p.pack_header(1, Command.VERSION, 16 + 5, 0) + b"\0\0\0\0\0"  # 0.0, no JSON
CONNECT_AS = """
import os, socket, sys
os.setgid({uid}); os.setuid({uid})
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.settimeout(5)
try:
    s.sendall(bytes.fromhex(sys.argv[2]))
    print("answered" if s.recv(16) else "closed")
except (BrokenPipeError, ConnectionResetError):
    print("closed")
"""


def test_only_allowed_uids_are_served(path: str, caplog: pytest.LogCaptureFixture) -> None:
    if os.getuid() != 0:  # a skip would prove nothing: say what the test needs
        pytest.fail("connecting as other users needs root: run the suite as root (CI does)")
    top = Path(tempfile.mkdtemp(prefix="vfio-ep-uid-"))
    os.chmod(top, 0o711)
    sock = top / "run" / "ep.sock"
    try:
        with ServerThread(testdev.build({}), sock, allow_uids=frozenset({65534})) as srv:
            assert stat.S_IMODE(sock.stat().st_mode) == 0o666
            for uid, want in ((65534, "answered"), (65533, "closed")):
                out = subprocess.run([sys.executable, "-c", CONNECT_AS.format(uid=uid),
                                      str(sock), VERSION.hex()],
                                     capture_output=True, text=True, timeout=30)
                assert out.stdout.strip() == want, out.stderr
                wait_disconnected(srv)
        assert "uid 65533: uid not allowed" in caplog.text
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_client_that_stops_reading_stalls_only_itself(tmp_path: Path) -> None:
    """Client A floods reads of a RAM BAR and never reads the replies, so the server's
    replies to it wait for room in its socket: meanwhile A's device changes its window table
    (the C copy is swapped), and client B of another device in the same server is served as
    usual.  When A goes, its connection is torn down and B carries on."""
    a_dev, b_dev = testdev.build({}), testdev.build({})
    with ServerThread(a_dev, tmp_path / "a.sock", more=((b_dev, tmp_path / "b.sock"),)) as srv:
        a = Client(srv.path)
        b = Client(tmp_path / "b.sock")
        request = struct.pack("<QII", 0, Region.BAR1, 60 << 10)
        for _ in range(64):  # ~4 MiB of replies, far beyond the socket buffers
            a.send(Command.REGION_READ, request)
        time.sleep(0.5)
        rows = [w for w in a_dev.windows.windows if w.bar == 1]
        swap = threading.Thread(target=srv.call, args=(a_dev.windows.replace_bar, 1, rows))
        swap.start()
        swap.join(5)
        assert not swap.is_alive(), "the event loop waits for A's stalled reply"
        ids = int.from_bytes(b_dev.config.data[:4], "little")
        for i in range(20):
            b.write(Region.BAR1, 8 * i, struct.pack("<Q", i))  # the C thread's
            assert b.read(Region.BAR1, 8 * i, 8) == struct.pack("<Q", i)
            assert b.cfg_read32(0) == ids  # Python's
        a.close()
        for i in range(20):
            assert b.read(Region.BAR1, 8 * i, 8) == struct.pack("<Q", i)
        b.close()


def test_a_client_that_stalls_mid_oversized_message_stalls_only_itself(
        tmp_path: Path) -> None:
    """Client A sends the head of a message beyond max_data_xfer_size and stops: the server
    drains it in the event loop (its C I/O thread parked, the socket it keeps blocking made
    non-blocking meanwhile), so client B of another device in the same server is served as
    usual; when A goes, its connection ends and B carries on."""
    a_dev, b_dev = testdev.build({}), testdev.build({})
    with ServerThread(a_dev, tmp_path / "a.sock", more=((b_dev, tmp_path / "b.sock"),)):
        a = Client(tmp_path / "a.sock")
        b = Client(tmp_path / "b.sock")
        count = p.MAX_DATA_XFER_SIZE + 4096
        a.sock.sendall(p.pack_header(7, Command.REGION_WRITE, p.HEADER_SIZE + 16 + count, 0)
                       + struct.pack("<QII", 0, Region.BAR1, count) + bytes(4096))
        time.sleep(0.5)
        ids = int.from_bytes(b_dev.config.data[:4], "little")
        for i in range(10):
            b.write(Region.BAR1, 8 * i, struct.pack("<Q", i))
            assert b.read(Region.BAR1, 8 * i, 8) == struct.pack("<Q", i)
            assert b.cfg_read32(0) == ids
        a.close()
        assert b.cfg_read32(0) == ids
        b.close()


def test_moving_memory_holds_the_c_reader_still(server: ServerThread, client: Client,
                                                path: str) -> None:
    """While memory the window table points into moves (WindowTable.changing), the C I/O
    thread serves nothing; the read waiting meanwhile is served right after."""
    got: list[bytes] = []
    change = server.device.windows.changing()
    server.call(change.__enter__)
    reader = threading.Thread(target=lambda: got.append(client.read(Region.BAR1, 0, 4)))
    reader.start()
    reader.join(0.5)
    held = reader.is_alive()
    server.call(change.__exit__, None, None, None)
    reader.join(5)
    assert got == [bytes(4)]
    assert held == (path == "c")  # the Python path's reader is the event loop itself
