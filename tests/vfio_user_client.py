"""A small blocking vfio-user client for the unit tests (QEMU is the real client).

It speaks the same layouts as QEMU 10.1 (including the DMA_READ/WRITE quirk)
and serves the server's DMA requests from a bytearray standing for guest RAM
that has no fd.
"""

from __future__ import annotations

import array
import json
import mmap
import os
import select
import socket
import struct
import threading
import time
from contextlib import suppress
from pathlib import Path

import trio
import trio.testing

from vfio_ep.pci.capabilities import (
    PCI_CAP_ID_MSI,
    PCI_CAP_ID_MSIX,
    PCI_MSI_FLAGS_ENABLE,
    PCI_MSI_FLAGS_QSIZE,
    PCI_MSIX_FLAGS_ENABLE,
)
from vfio_ep.pci.config_space import (
    PCI_CAPABILITY_LIST,
    PCI_COMMAND,
    PCI_COMMAND_MASTER,
    PCI_COMMAND_MEMORY,
)
from vfio_ep.pci.device import PciDevice
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.protocol import Command
from vfio_ep.vfio_user.server import Listener


class ErrorReply(Exception):
    def __init__(self, errno: int) -> None:
        super().__init__(f"error reply errno {errno}")
        self.errno = errno


class Client:
    def __init__(self, path: Path, *, negotiate: bool = True,
                 max_data_xfer_size: int = 1 << 20) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(path))
        self.msg_id = 0
        self.fdless: dict[int, bytearray] = {}  # iova -> memory served via DMA messages
        self.max_data_xfer_size = max_data_xfer_size
        if negotiate:
            self.version()

    def close(self) -> None:
        self.sock.close()

    # -- framing -----------------------------------------------------------
    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds \
            else []
        sent = self.sock.sendmsg([data], anc)  # the fds go with the first bytes
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def send(self, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = 0
             ) -> int:
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        self.send_raw(p.pack_header(self.msg_id, cmd, 16 + len(payload), flags) + payload, fds)
        return self.msg_id

    def _recv_exact(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        return buf

    def recv(self) -> tuple[dict, bytes, list[int]]:
        data, anc, _, _ = self.sock.recvmsg(16, socket.CMSG_SPACE(16 * 4))
        if not data:
            raise EOFError("server closed the connection")
        data += self._recv_exact(16 - len(data))
        fds: list[int] = []
        for _, _, d in anc:
            a = array.array("i")
            a.frombytes(d)
            fds += a
        hdr = p.Header.parse(data)
        return hdr, self._recv_exact(hdr["size"] - 16), fds

    def request(self, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = ()
                ) -> tuple[dict, bytes, list[int]]:
        msg_id = self.send(cmd, payload, fds)
        while True:
            hdr, body, rfds = self.recv()
            if hdr["flags"] & p.FLAG_TYPE_MASK == p.FLAG_REQUEST:
                self._serve_dma(hdr, body)
                continue
            assert hdr["msg_id"] == msg_id, (hdr, msg_id)
            assert hdr["command"] == cmd
            if hdr["flags"] & p.FLAG_ERROR:
                assert hdr["size"] == 16
                raise ErrorReply(hdr["error"])
            return hdr, body, rfds

    def pump(self) -> None:
        """Serve one server-initiated DMA request."""
        hdr, body, _ = self.recv()
        self._serve_dma(hdr, body)

    def _serve_dma(self, hdr: dict, body: bytes) -> None:
        addr, count = struct.unpack_from("<QI", body)
        base = max(i for i in self.fdless if i <= addr)
        mem = self.fdless[base]
        off = addr - base
        if hdr["command"] == Command.DMA_READ:
            # QEMU 10.1: echo header/addr/count, data at byte 28, 4 bytes of padding.
            reply = struct.pack("<QI", addr, count) + bytes(mem[off : off + count]) + bytes(4)
        else:
            mem[off : off + count] = body[12 : 12 + count]
            reply = b""
        if not hdr["flags"] & p.FLAG_NO_REPLY:
            self.send_raw(p.pack_header(hdr["msg_id"], hdr["command"], 16 + len(reply),
                                        p.FLAG_REPLY) + reply)

    # -- commands ------------------------------------------------------------
    def version(self) -> dict:
        caps = json.dumps({"capabilities": {"max_msg_fds": 16,
                                            "max_data_xfer_size": self.max_data_xfer_size}})
        _, body, _ = self.request(Command.VERSION, struct.pack("<HH", 0, 0) + caps.encode()
                                  + b"\0")
        major, minor = struct.unpack_from("<HH", body)
        assert (major, minor) == (0, 0)
        assert body[-1] == 0
        return json.loads(body[4:-1])

    def dma_map(self, iova: int, size: int, fd: int | None = None, offset: int = 0) -> None:
        payload = p.DmaMap.build({"argsz": 32, "flags": 3, "offset": offset, "iova": iova,
                                  "size": size})
        self.request(Command.DMA_MAP, payload, (fd,) if fd is not None else ())
        if fd is None:
            self.fdless[iova] = bytearray(size)

    def dma_unmap(self, iova: int, size: int, flags: int = 0) -> None:
        self.request(Command.DMA_UNMAP, p.DmaUnmap.build({"argsz": 24, "flags": flags,
                                                          "iova": iova, "size": size}))

    def device_info(self) -> dict:
        _, body, _ = self.request(Command.DEVICE_GET_INFO, p.DeviceInfo.build(
            {"argsz": 16, "flags": 0, "num_regions": 0, "num_irqs": 0}))
        return dict(p.DeviceInfo.parse(body))

    def region_info(self, index: int, argsz: int = 32) -> tuple[dict, bytes, list[int]]:
        _, body, fds = self.request(Command.DEVICE_GET_REGION_INFO, p.RegionInfo.build(
            {"argsz": argsz, "flags": 0, "index": index, "cap_offset": 0, "size": 0,
             "offset": 0}))
        return dict(p.RegionInfo.parse(body[:32])), body[32:], fds

    def irq_info(self, index: int) -> dict:
        _, body, _ = self.request(Command.DEVICE_GET_IRQ_INFO, p.IrqInfo.build(
            {"argsz": 16, "flags": 0, "index": index, "count": 0}))
        return dict(p.IrqInfo.parse(body))

    def set_irqs(self, index: int, flags: int, start: int, count: int,
                 fds: tuple[int, ...] = ()) -> None:
        self.request(Command.DEVICE_SET_IRQS, struct.pack("<5I", 20, flags, index, start, count),
                     fds)

    def read(self, region: int, offset: int, count: int) -> bytes:
        _, body, _ = self.request(Command.REGION_READ, struct.pack("<QII", offset, region, count))
        off, reg, cnt = struct.unpack_from("<QII", body)
        assert (off, reg, cnt) == (offset, region, count)
        return body[16:]

    def write(self, region: int, offset: int, data: bytes, posted: bool = False) -> None:
        payload = struct.pack("<QII", offset, region, len(data)) + data
        if posted:
            self.send(Command.REGION_WRITE, payload, flags=p.FLAG_NO_REPLY)
        else:
            self.request(Command.REGION_WRITE, payload)

    def write_multi(self, writes: list[tuple[int, int, bytes]]) -> None:
        entries = b"".join(struct.pack("<QII", off, reg, len(d)) + d.ljust(8, b"\0")
                           for reg, off, d in writes)
        self.send(Command.REGION_WRITE_MULTI, struct.pack("<Q", len(writes)) + entries,
                  flags=p.FLAG_NO_REPLY)

    def reset(self) -> None:
        self.request(Command.DEVICE_RESET)

    def cfg_read32(self, offset: int) -> int:
        return int.from_bytes(self.read(p.Region.CONFIG, offset, 4), "little")

    def cfg_write(self, offset: int, value: int, size: int = 4) -> None:
        self.write(p.Region.CONFIG, offset, value.to_bytes(size, "little"))

    def capabilities(self) -> dict[int, int]:
        """Capability ID -> offset, walking the list like the guest does."""
        cfg = self.read(p.Region.CONFIG, 0, 256)
        found, pos = {}, cfg[PCI_CAPABILITY_LIST]
        while pos:
            found[cfg[pos]] = pos
            pos = cfg[pos + 1]
        return found

    def guest_memory(self, iova: int, size: int) -> mmap.mmap:
        """RC memory the device may DMA to: a memfd mapped at ``iova``, and our view of it."""
        fd = os.memfd_create("guest-ram", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            self.dma_map(iova, size, fd)
            return mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def enable_interrupts(self, vectors: int, msix: bool) -> list[int]:
        """What the RC's driver does before using the device: memory and bus master on,
        MSI-X (or MSI with ``vectors``, a power of 2) enabled, an eventfd per vector."""
        self.cfg_write(PCI_COMMAND, PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER, size=2)
        caps = self.capabilities()
        flags = 2  # the flags word of MSI and MSI-X
        if msix:
            self.cfg_write(caps[PCI_CAP_ID_MSIX] + flags, PCI_MSIX_FLAGS_ENABLE, size=2)
        else:
            qsize = (vectors.bit_length() - 1) * (PCI_MSI_FLAGS_QSIZE & -PCI_MSI_FLAGS_QSIZE)
            self.cfg_write(caps[PCI_CAP_ID_MSI] + flags, PCI_MSI_FLAGS_ENABLE | qsize, size=2)
        fds = [eventfd() for _ in range(vectors)]
        self.set_irqs(p.Irq.MSIX if msix else p.Irq.MSI,
                      p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, 0, vectors, tuple(fds))
        return fds


class ServerThread:
    """A Listener for ``device`` running its own trio loop in a thread."""

    def __init__(self, device: PciDevice, path: Path,
                 more: tuple[tuple[PciDevice, Path], ...] = (),
                 allow_uids: frozenset[int] = frozenset()) -> None:
        """``more`` serves further devices in the same loop (controllers of one SoC)."""
        self.device = device
        self.path = path
        self.listener = Listener(path, device, allow_uids)
        self.listeners = [self.listener, *(Listener(p, d) for d, p in more)]
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                for listener in self.listeners:
                    await nursery.start(listener.serve)
                self._ready.set()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        assert self._ready.wait(10), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        with suppress(trio.RunFinishedError):
            trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
        self._thread.join(10)

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        """Run ``fn`` on the server's loop (device state is the loop's)."""
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def wait_idle(self) -> None:
        """Let the server handle everything already sent: its tasks blocked, and the C I/O
        threads of its connections waiting for more."""
        while True:
            trio.from_thread.run(trio.testing.wait_all_tasks_blocked, trio_token=self._token)
            if self.call(lambda: all(lst.active is None or lst.active.idle()
                                     for lst in self.listeners)):
                return
            time.sleep(0.001)


def wait_eventfd(fd: int, timeout: float = 5.0) -> bool:
    """Whether ``fd`` fired within ``timeout`` (and consume it).  poll(), not select(): a
    test process that built many devices has fds past select()'s 1024."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    ready = poller.poll(timeout * 1000)
    if ready:
        os.eventfd_read(fd)
    return bool(ready)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0
