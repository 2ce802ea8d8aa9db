"""A minimal blocking vfio-user client: what the benchmarks need of QEMU's side.

Guest RAM is a memfd handed over with DMA_MAP, so the server reaches it directly and never
sends DMA_READ/DMA_WRITE requests (this client refuses them).  Interrupts arrive on eventfds
registered with SET_IRQS, as QEMU's would.
"""

from __future__ import annotations

import array
import json
import mmap
import os
import select
import socket
import struct
from pathlib import Path

from vfio_ep.bench.common import BenchError, connect
from vfio_ep.pci.capabilities import PCI_CAP_ID_MSIX, PCI_MSIX_FLAGS_ENABLE
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.protocol import Command, Irq, Region


class Client:
    def __init__(self, path: Path, *, negotiate: bool = True) -> None:
        self.sock = connect(path)
        self.msg_id = 0
        if negotiate:
            self.version()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- framing -------------------------------------------------------------
    def next_id(self) -> int:
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        return self.msg_id

    def send(self, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = (), flags: int = 0
             ) -> int:
        msg_id = self.next_id()
        data = p.HEADER.pack(msg_id, cmd, p.HEADER_SIZE + len(payload), flags, 0) + payload
        anc = ([(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
               if fds else [])
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])
        return msg_id

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:])
            if not k:
                raise BenchError("the server closed the connection")
            got += k
        return bytes(buf)

    def reply(self, msg_id: int, cmd: int) -> bytes:
        """The body of the reply to ``msg_id``; an error reply raises."""
        head = self._recv_exact(p.HEADER_SIZE)
        rid, rcmd, size, flags, err = p.HEADER.unpack_from(head)
        body = self._recv_exact(size - p.HEADER_SIZE)
        if flags & p.FLAG_TYPE_MASK != p.FLAG_REPLY:
            raise BenchError(f"server sent request {rcmd}: this client maps memory by fd only")
        if (rid, rcmd) != (msg_id, cmd):
            raise BenchError(f"reply {rid}/{rcmd} does not match request {msg_id}/{cmd}")
        if flags & p.FLAG_ERROR:
            raise BenchError(f"{Command(cmd).name} failed with errno {err}")
        return body

    def request(self, cmd: int, payload: bytes = b"", fds: tuple[int, ...] = ()) -> bytes:
        return self.reply(self.send(cmd, payload, fds), cmd)

    # -- commands --------------------------------------------------------------
    def version(self) -> None:
        caps = json.dumps({"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20}})
        self.request(Command.VERSION, struct.pack("<HH", 0, 0) + caps.encode() + b"\0")

    def dma_map(self, iova: int, size: int, fd: int) -> None:
        self.request(Command.DMA_MAP, p.DmaMap.build(
            {"argsz": 32, "flags": p.DMA_FLAG_READ | p.DMA_FLAG_WRITE, "offset": 0,
             "iova": iova, "size": size}), (fd,))

    def set_irq_eventfd(self, index: int, vector: int, fd: int) -> None:
        self.request(Command.DEVICE_SET_IRQS, struct.pack(
            "<5I", 20, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, index, vector, 1),
            (fd,))

    def read(self, region: int, offset: int, count: int) -> bytes:
        body = self.request(Command.REGION_READ, p.ACCESS.pack(offset, region, count))
        return body[p.ACCESS.size :]

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.request(Command.REGION_WRITE, p.ACCESS.pack(offset, region, len(data)) + data)

    def read32(self, region: int, offset: int) -> int:
        return int.from_bytes(self.read(region, offset, 4), "little")

    def write32(self, region: int, offset: int, value: int) -> None:
        self.write(region, offset, value.to_bytes(4, "little"))


class RcSide:
    """The root complex's view of one function: guest RAM (a memfd at ``iova``), Memory +
    Bus Master enabled, MSI-X on with vector 0 on an eventfd."""

    def __init__(self, client: Client, iova: int, size: int) -> None:
        self.c = client
        self.iova = iova
        fd = os.memfd_create("bench-guest-ram", os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            client.dma_map(iova, size, fd)
            self.mem = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        cfg = client.read(Region.CONFIG, 0, 256)
        client.write(Region.CONFIG, 0x04, (0x6).to_bytes(2, "little"))  # memory + bus master
        pos = cfg[0x34]
        while pos and cfg[pos] != PCI_CAP_ID_MSIX:
            pos = cfg[pos + 1]
        if not pos:
            raise BenchError("the function has no MSI-X capability")
        client.write(Region.CONFIG, pos + 2, PCI_MSIX_FLAGS_ENABLE.to_bytes(2, "little"))
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        client.set_irq_eventfd(Irq.MSIX, 0, self.irq)

    def wait_irq(self, timeout: float = 60.0) -> None:
        ready, _, _ = select.select([self.irq], [], [], timeout)
        if not ready:
            raise BenchError(f"no MSI-X within {timeout:.0f} s")
        os.eventfd_read(self.irq)

    def close(self) -> None:
        os.close(self.irq)
        self.mem.close()
