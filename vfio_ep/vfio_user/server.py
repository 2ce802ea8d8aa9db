"""The vfio-user server: a UNIX socket listener and one client connection at a time.

Requests are handled strictly in the order they arrive, by the connection's reader (the C
I/O thread, which hands Python what it cannot serve, or a Python task), and never wait on
the client: DMA_READ/DMA_WRITE requests that the device sends are awaited only from device
tasks, while the reader keeps answering QEMU (whose vCPU thread may hold the BQL that QEMU's
DMA handling needs; the C reader pauses only while a message of Python's is half sent).  Bad
input is answered with an error reply when the stream can still be trusted, and with a
logged close when it cannot; either way the listener goes on to serve the next client with
the same device.
"""

from __future__ import annotations

import array
import contextlib
import errno
import json
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import trio
from construct import ConstructError

from vfio_ep import native
from vfio_ep.errors import ErrnoError
from vfio_ep.pci.device import PciDevice
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.dma import DmaError, DmaTable
from vfio_ep.vfio_user.irq import IrqSet
from vfio_ep.vfio_user.protocol import Command, ProtocolError, StreamError

if TYPE_CHECKING:
    from vfio_ep.vfio_user.fastpath import FastPath

log = logging.getLogger(__name__)

_ANC_SIZE = socket.CMSG_SPACE(p.MAX_MSG_FDS * array.array("i").itemsize)
_DMA_REPLY_TIMEOUT = 10.0
# What a handler raises on a malformed request (a payload its layout does not parse, values
# out of range, an fd that is not what it should be): the request is refused with EINVAL.
MALFORMED = (ConstructError, struct.error, DmaError, ValueError, OSError)
# The longest socket path: sizeof(sockaddr_un.sun_path) is 108, with room kept for the NUL
# that C clients (QEMU's among them) copy along.
SUN_PATH_MAX = 107
TEARDOWN_GRACE = 5.0  # seconds a dead client's teardown may take before its successor is served

_R = TypeVar("_R")
_P = ParamSpec("_P")
Handler = Callable[["Connection", int, bytes, list[int]], tuple[bytes, int | None] | None]


def _fast_path(sock_fd: int, device: PciDevice) -> FastPath:
    """The connection's C I/O thread, not started; its module is imported here, as it needs
    the extension (a server without one serves on the Python path)."""
    from vfio_ep.vfio_user.fastpath import FastPath

    return FastPath(sock_fd, device.windows)


class ClientGone(Exception):
    """EOF at a message boundary: the client closed the connection."""


class Connection:
    """One client: its DMA table, its IRQ eventfds, and the request loop.  It is the host
    the device is attached to (a :class:`~vfio_ep.pci.host.Host`, checked where
    :meth:`serve` attaches it; not a subclass, as the Protocol's read-only properties would
    shadow the attributes)."""

    def __init__(self, sock: trio.socket.SocketType, device: PciDevice, peer: str) -> None:
        self.sock = sock
        self.device = device
        self.peer = peer
        self.dma = DmaTable()
        self.irqs = IrqSet(device.irq_counts())
        self.dma_layout = p.DmaLayout.QEMU
        self.client_max_xfer = p.MAX_DATA_XFER_SIZE
        self.negotiated = False
        self._send_lock = trio.Lock()
        self._next_id = 0
        self._replies: dict[int, tuple[trio.Event, list[tuple[p.Fields, bytes]]]] = {}
        self._nursery: trio.Nursery | None = None
        self._resample_scope: trio.CancelScope | None = None
        self.dma.message_read = self._dma_read_message
        self.dma.message_write = self._dma_write_message
        self.fast = _fast_path(sock.fileno(), device) if native.available()[0] else None

    # -- main loop ----------------------------------------------------------
    async def serve(self) -> None:
        log.info("client %s connected", self.peer)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                self.device.attach(self)
                if self.fast is not None:
                    self._start_fast_path(self.fast)
                await self._request_loop_until_gone()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self.fast is not None:  # first: its windows point into what goes next
                self.fast.stop()
                if self._apply_posted(self.fast):  # acknowledged: not to be lost
                    log.info("client %s: applied the writes still queued at its end",
                             self.peer)
                log.info("client %s: C fast path served %s", self.peer, ", ".join(
                    f"{n} {what.replace('_', ' ')}" for what, n in self.fast.stats().items()))
            self.device.detach()
            self._fail_pending_dma()
            log.info("client %s: released %d DMA mappings and its IRQ eventfds",
                     self.peer, len(self.dma))
            self.dma.clear()
            self.irqs.close()
            self.sock.close()

    def _start_fast_path(self, fast: FastPath) -> None:
        """The connection's C I/O thread; without one (the system refused a thread), this
        client is served on the Python path."""
        try:
            fast.start()
        except OSError as e:
            log.warning("client %s: %s; serving it on the Python path", self.peer, e)
            fast.stop()
            self.fast = None

    def idle(self) -> bool:
        """Whether the C I/O thread (if any) has handled everything the client sent: the
        event loop's own idleness does not cover a thread it is not running."""
        return self.fast is None or self.fast.idle()

    async def _request_loop_until_gone(self) -> None:
        try:
            await self._request_loop()
        except ClientGone:
            log.info("client %s disconnected", self.peer)
        except StreamError as e:
            log.warning("client %s: closing connection: %s", self.peer, e)
        except OSError as e:
            log.warning("client %s: connection lost: %s", self.peer, e)

    async def _request_loop(self) -> None:
        while True:
            hdr, body, fds = await self._recv_message()
            mtype = hdr["flags"] & p.FLAG_TYPE_MASK
            if mtype == p.FLAG_REPLY:
                _close_fds(fds)
                if hdr.get("oversized"):  # no DMA reply is that big: fail the request
                    log.warning("client %s: a reply of %d bytes to id %d", self.peer,
                                hdr["size"], hdr["msg_id"])
                    hdr = {**hdr, "flags": hdr["flags"] | p.FLAG_ERROR, "error": errno.EMSGSIZE}
                self._deliver_reply(hdr, body)
            elif mtype != p.FLAG_REQUEST:
                _close_fds(fds)
                raise StreamError(f"message type {mtype} is neither request nor reply")
            else:
                await self._handle_request(hdr, body, fds)
            if self.fast is not None:  # its effects are in place: C may read on
                self.fast.resume()

    async def _recv_message(self) -> tuple[p.Fields, bytes, list[int]]:
        if self.fast is not None:
            return await self._recv_message_fast(self.fast)
        head = bytearray()
        fds: list[int] = []
        while len(head) < p.HEADER_SIZE:
            data, anc, flags, _ = await self.sock.recvmsg(
                p.HEADER_SIZE - len(head), _ANC_SIZE, socket.MSG_CMSG_CLOEXEC)
            fds += _fds_from(anc)
            if flags & socket.MSG_CTRUNC:
                _close_fds(fds)
                raise StreamError("file descriptors truncated (more than max_msg_fds)")
            if not data:
                _close_fds(fds)
                if head:
                    raise StreamError(f"EOF after {len(head)} bytes of a message header")
                raise ClientGone
            head += data
        hdr = p.HEADER.parse(head)
        size = hdr["size"]
        if size < p.HEADER_SIZE:
            _close_fds(fds)
            raise StreamError(f"message size {size} < {p.HEADER_SIZE} "
                              f"(command {hdr['command']}, id {hdr['msg_id']})")
        if size > p.MAX_MESSAGE_SIZE:
            return await self._oversized(hdr, fds)
        body = await self._recv_exact(size - p.HEADER_SIZE, fds)
        return hdr, body, fds

    async def _oversized(self, hdr: p.Fields, fds: list[int]) -> tuple[p.Fields, bytes, list[int]]:
        """A message beyond max_data_xfer_size: read past it (up to MAX_DRAIN_SIZE) and
        refuse it like a READ of that size, or close a stream that big."""
        _close_fds(fds)
        size = hdr["size"]
        if size > p.MAX_DRAIN_SIZE:
            raise StreamError(f"message size {size} > {p.MAX_DRAIN_SIZE} (command "
                              f"{hdr['command']}, id {hdr['msg_id']})")
        left = size - p.HEADER_SIZE
        while left:
            k = len(await self.sock.recv(min(left, 1 << 20)))
            if not k:
                raise StreamError(f"EOF {left} bytes before the end of an oversized message")
            left -= k
        return {**hdr, "oversized": True}, b"", []

    async def _recv_message_fast(self, fast: FastPath
                                 ) -> tuple[p.Fields, bytes, list[int]]:
        """C's I/O thread serves the hot messages; the first one that needs Python (or the
        stream's end) is handed over here, and C waits for :meth:`FastPath.resume`."""
        while True:
            r = fast.handed()
            if r is None:
                await trio.lowlevel.wait_readable(fast.notify_fd)
                continue
            if r == fast.POSTED:
                self._apply_posted(fast)
                continue
            if r == fast.MESSAGE:
                data, fds, truncated = fast.take()
                if truncated:
                    _close_fds(fds)
                    raise StreamError("file descriptors truncated (more than max_msg_fds)")
                return p.HEADER.parse(data), data[p.HEADER_SIZE :], fds
            if r == fast.OVERSIZED:
                data, fds, _ = fast.take()
                # The thread is parked, its socket maybe blocking (native/vfu_io.c): trio's
                # reads must not block the event loop on a client that stalls mid-message.
                blocking = os.get_blocking(self.sock.fileno())
                os.set_blocking(self.sock.fileno(), False)
                try:
                    return await self._oversized(p.HEADER.parse(data), fds)
                finally:
                    os.set_blocking(self.sock.fileno(), blocking)
            fast.drop()
            if r == fast.EOF:
                raise ClientGone
            if r == fast.BROKEN:
                raise StreamError("malformed message framing (bad size or EOF mid-message)")
            err = fast.errno()
            raise OSError(err, f"socket error in the fast path: {os.strerror(err)}")

    async def _recv_exact(self, n: int, fds: list[int]) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = await self.sock.recv_into(view[got:])
            if not k:
                _close_fds(fds)
                raise StreamError(f"EOF after {got} of {n} payload bytes")
            got += k
        return bytes(buf)

    async def _handle_request(self, hdr: p.Fields, body: bytes, fds: list[int]) -> None:
        cmd, msg_id = hdr["command"], hdr["msg_id"]
        posted = bool(hdr["flags"] & p.FLAG_NO_REPLY)
        handler = _HANDLERS.get(cmd)
        if cmd not in _TAKES_FDS:
            _close_fds(fds)
            fds = []

        def call() -> tuple[bytes, int | None] | None:
            if hdr.get("oversized"):
                raise ProtocolError(errno.EINVAL, f"message of {hdr['size']} bytes, beyond "
                                    f"max_data_xfer_size {p.MAX_DATA_XFER_SIZE}")
            if handler is None:
                raise ProtocolError(errno.ENOSYS, f"unknown command {cmd}")
            if not self.negotiated and cmd != Command.VERSION:
                _close_fds(fds)
                raise ProtocolError(errno.EINVAL, f"{_name(cmd)} before VERSION")
            return handler(self, msg_id, body, fds)  # owns fds from here, even on error

        result, err = self._guarded(cmd, msg_id, call)
        if posted:
            return
        if err:
            await self._send(p.pack_header(msg_id, cmd, p.HEADER_SIZE,
                                           p.FLAG_REPLY | p.FLAG_ERROR, err))
            return
        payload, fd = result if result else (b"", None)
        await self._send(p.pack_header(msg_id, cmd, p.HEADER_SIZE + len(payload), p.FLAG_REPLY)
                         + payload, fd)

    def _guarded(self, cmd: int, msg_id: int, call: Callable[_P, _R], *args: _P.args,
                 **kwargs: _P.kwargs) -> tuple[_R | None, int]:
        """A request's handling, ``call(*args, **kwargs)`` (no partial to build for each of
        a stream of posted writes): (its result, 0), or (None, the errno to answer) with the
        reason logged, for a refusal (ErrnoError: ProtocolError, or the device's own), a
        malformed message, or a device-model bug (which must not take the server down)."""
        try:
            return call(*args, **kwargs), 0
        except ErrnoError as e:
            log.warning("client %s: refused %s (id %d): %s", self.peer, _name(cmd), msg_id,
                        e.reason)
            return None, e.errno
        except MALFORMED as e:
            log.warning("client %s: refused %s (id %d): %s", self.peer, _name(cmd), msg_id, e)
            return None, errno.EINVAL
        except Exception:
            log.exception("client %s: internal error handling %s (id %d)", self.peer,
                          _name(cmd), msg_id)
            return None, errno.EIO

    def _apply_posted(self, fast: FastPath) -> int:
        """The BAR writes C acknowledged (or the client posted) and queued, in order; a
        refusal is logged like any posted write's, never answered.  How many."""
        applied = 0
        write = self.device.region_write
        try:
            for region, offset, data, msg_id in fast.posted():
                self._guarded(Command.REGION_WRITE, msg_id, write, region, offset, data)
                applied += 1
        finally:
            fast.posted_done(applied)
        return applied

    async def _send(self, data: bytes, fd: int | None = None) -> None:
        async with self._send_lock:
            if self.fast is not None:  # between the I/O thread's replies, under its lock
                await self.fast.send(data, fd)
                return
            anc = [] if fd is None else [
                (socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            sent = await self.sock.sendmsg([data], anc)
            while sent < len(data):
                sent += await self.sock.send(data[sent:])

    # -- server -> client DMA ------------------------------------------------
    async def _dma_request(self, cmd: Command, payload: bytes) -> bytes:
        self._next_id = (self._next_id + 1) & 0xFFFF
        msg_id = self._next_id
        event = trio.Event()
        box: list[tuple[p.Fields, bytes]] = []
        self._replies[msg_id] = (event, box)
        try:
            await self._send(p.pack_header(msg_id, cmd, p.HEADER_SIZE + len(payload),
                                           p.FLAG_REQUEST) + payload)
            with trio.move_on_after(_DMA_REPLY_TIMEOUT):
                await event.wait()
        finally:
            self._replies.pop(msg_id, None)
        if not box:
            raise DmaError(f"{cmd.name} id {msg_id}: no reply from the client")
        hdr, body = box[0]
        if hdr["flags"] & p.FLAG_ERROR:
            raise DmaError(f"{cmd.name} id {msg_id}: client error {hdr['error']}")
        return body

    async def _dma_read_message(self, iova: int, size: int) -> bytes:
        out = bytearray()
        for off in range(0, size, self.client_max_xfer):
            n = min(self.client_max_xfer, size - off)
            body = await self._dma_request(Command.DMA_READ,
                                           p.pack_dma_request(self.dma_layout, iova + off, n))
            out += p.unpack_dma_read_reply(self.dma_layout, body, n)
        return bytes(out)

    async def _dma_write_message(self, iova: int, data: bytes) -> None:
        for off in range(0, len(data), self.client_max_xfer):
            chunk = data[off : off + self.client_max_xfer]
            await self._dma_request(Command.DMA_WRITE,
                                    p.pack_dma_request(self.dma_layout, iova + off, len(chunk),
                                                       chunk))

    def _deliver_reply(self, hdr: p.Fields, body: bytes) -> None:
        waiter = self._replies.get(hdr["msg_id"])
        if waiter is None:
            log.warning("client %s: reply id %d matches no request of ours", self.peer,
                        hdr["msg_id"])
            return
        event, box = waiter
        box.append((hdr, body))
        event.set()

    def _fail_pending_dma(self) -> None:
        for event, _ in self._replies.values():
            event.set()

    # -- INTx resample eventfd ----------------------------------------------
    def _watch_resample_fd(self) -> None:
        if self._resample_scope is not None:
            self._resample_scope.cancel()
            self._resample_scope = None
        fd = self.irqs.intx.resample_fd
        if fd is not None and self._nursery is not None:
            scope = trio.CancelScope()
            self._resample_scope = scope
            self._nursery.start_soon(self._resample_loop, fd, scope)

    async def _resample_loop(self, fd: int, scope: trio.CancelScope) -> None:
        with scope:
            while True:
                await trio.lowlevel.wait_readable(fd)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    continue
                except OSError:
                    return
                self.irqs.unmask_intx()


# -- request handlers: (connection, msg_id, payload, fds) -> (reply, fd) -----
def _version(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> tuple[bytes, None]:
    v = p.Version.parse(body)
    if v.major != 0:
        raise ProtocolError(errno.EINVAL, f"unsupported protocol version {v.major}.{v.minor}")
    client = _client_capabilities(v.json)
    c.client_max_xfer = min(client.get("max_data_xfer_size", p.MAX_DATA_XFER_SIZE),
                            p.MAX_DATA_XFER_SIZE)
    c.negotiated = True
    if c.fast is not None:
        c.fast.allow_early_ack()
    log.info("client %s: vfio-user %d.%d, capabilities %s", c.peer, v.major, v.minor, client)
    return struct.pack("<HH", 0, 0) + p.version_capabilities() + b"\0", None


def _client_capabilities(text: str | None) -> dict[str, Any]:
    """The client's VERSION capabilities, checked: a JSON object whose ``capabilities`` is
    an object, its sizes integers in range (the DMA path splits transfers by
    ``max_data_xfer_size``: 0 or -1 there would stall or silently drop them)."""
    try:
        doc = json.loads(text or "{}")
    except (json.JSONDecodeError, RecursionError) as e:
        raise ProtocolError(errno.EINVAL, f"VERSION capabilities are not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise ProtocolError(errno.EINVAL, f"VERSION JSON is a {type(doc).__name__}, not an "
                            "object")
    caps = doc.get("capabilities", {})
    if not isinstance(caps, dict):
        raise ProtocolError(errno.EINVAL, f"VERSION capabilities is a {type(caps).__name__}, "
                            "not an object")
    for key, low in (("max_data_xfer_size", p.MIN_DATA_XFER_SIZE), ("max_msg_fds", 0)):
        if key in caps and (type(caps[key]) is not int or caps[key] < low):
            raise ProtocolError(errno.EINVAL, f"VERSION {key} {caps[key]!r}: want an integer "
                                f">= {low}")
    return caps


def _dma_map(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    try:
        m = p.DmaMap.parse(body)
        if len(fds) > 1:
            raise ProtocolError(errno.EINVAL, f"DMA_MAP with {len(fds)} fds")
        fd = fds[0] if fds else None
        c.dma.map(m["iova"], m["size"], m["flags"], fd, m["offset"])
    finally:
        _close_fds(fds)
    log.debug("client %s: DMA map [%#x, %#x) %s", c.peer, m["iova"], m["iova"] + m["size"],
             f"fd offset {m['offset']:#x}" if fd is not None else "without fd (DMA messages)")
    return None


def _dma_unmap(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    m = p.DmaUnmap.parse(body)
    if m["flags"] & p.DMA_UNMAP_FLAG_ALL:
        c.dma.clear()
        log.debug("client %s: DMA unmap all", c.peer)
    else:
        n = c.dma.unmap(m["iova"], m["size"])
        log.debug("client %s: DMA unmap [%#x, %#x) (%d mappings)", c.peer, m["iova"],
                 m["iova"] + m["size"], n)
    return None


def _device_get_info(c: Connection, msg_id: int, body: bytes, fds: list[int]
                     ) -> tuple[bytes, None]:
    return p.DeviceInfo.build({"argsz": 16, "flags": p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET,
                               "num_regions": p.NUM_REGIONS, "num_irqs": p.NUM_IRQS}), None


def _get_region_info(c: Connection, msg_id: int, body: bytes, fds: list[int]
                     ) -> tuple[bytes, int | None]:
    req = p.RegionInfo.parse(body)
    info = c.device.region_info(req["index"])
    caps = b""
    flags = info.flags
    if info.fd is not None:
        caps = p.SparseMmapCap.build({"id": p.REGION_INFO_CAP_SPARSE_MMAP, "version": 1,
                                      "next": 0, "nr_areas": len(info.areas), "reserved": 0,
                                      "areas": [{"offset": o, "size": s} for o, s in info.areas]})
        flags |= p.REGION_INFO_FLAG_CAPS
    need = p.REGION_INFO_SIZE + len(caps)
    fits = req["argsz"] >= need
    reply = p.RegionInfo.build({
        "argsz": need, "flags": flags if fits else flags & ~p.REGION_INFO_FLAG_CAPS,
        "index": req["index"], "cap_offset": p.REGION_INFO_SIZE if caps and fits else 0,
        "size": info.size, "offset": info.offset})
    return (reply + caps, info.fd) if fits else (reply, None)


def _get_irq_info(c: Connection, msg_id: int, body: bytes, fds: list[int]
                  ) -> tuple[bytes, None]:
    req = p.IrqInfo.parse(body)
    flags, count = c.irqs.info(req["index"])
    return p.IrqInfo.build({"argsz": 16, "flags": flags, "index": req["index"],
                            "count": count}), None


def _set_irqs(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    try:
        s = p.IrqSet.parse(body)
        if s["argsz"] < 20:
            raise ProtocolError(errno.EINVAL, f"SET_IRQS argsz {s['argsz']} < 20")
    except (ProtocolError, ConstructError, struct.error):
        _close_fds(fds)
        raise
    log.debug("client %s: SET_IRQS flags %#x index %d start %d count %d fds %d", c.peer,
              s["flags"], s["index"], s["start"], s["count"], len(fds))
    c.irqs.set_irqs(s["flags"], s["index"], s["start"], s["count"], fds)
    if s["index"] == p.Irq.INTX:
        c._watch_resample_fd()
    return None


def _region_access(body: bytes, writing: bool) -> tuple[int, int, int, bytes]:
    if len(body) < p.REGION_ACCESS_SIZE:
        raise ProtocolError(errno.EINVAL, f"region access payload of {len(body)} bytes")
    offset, region, count, data = p.parse_region_access(body)
    if count > p.MAX_DATA_XFER_SIZE:
        raise ProtocolError(errno.EINVAL, f"count {count} > max_data_xfer_size")
    if writing and len(data) != count:
        raise ProtocolError(errno.EINVAL, f"count {count} but {len(data)} data bytes")
    if not writing and data:
        raise ProtocolError(errno.EINVAL, f"read request carries {len(data)} stray bytes")
    return offset, region, count, data


def _region_read(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> tuple[bytes, None]:
    offset, region, count, _ = _region_access(body, writing=False)
    data = c.device.region_read(region, offset, count)
    return p.pack_region_access(offset, region, count, data), None


def _region_write(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    offset, region, _, data = _region_access(body, writing=True)
    c.device.region_write(region, offset, data)
    return None  # QEMU takes a header-only reply (and posted writes get none)


def _region_write_multi(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    m = p.WriteMulti.parse(body)
    if m["wr_cnt"] > p.WRITE_MULTI_MAX or len(body) != 8 + 24 * m["wr_cnt"]:
        raise ProtocolError(errno.EINVAL, f"WRITE_MULTI of {m['wr_cnt']} entries in "
                            f"{len(body)} bytes")
    for e in m["entries"]:
        if not 1 <= e["count"] <= 8:
            raise ProtocolError(errno.EINVAL, f"WRITE_MULTI entry count {e['count']}")
        c.device.region_write(e["region"], e["offset"], e["data"][: e["count"]])
    return None


def _device_reset(c: Connection, msg_id: int, body: bytes, fds: list[int]) -> None:
    log.info("client %s: device reset", c.peer)
    c.device.reset()
    return None


_TAKES_FDS = frozenset({Command.DMA_MAP, Command.DEVICE_SET_IRQS})
_HANDLERS: dict[int, Handler] = {
    Command.VERSION: _version,
    Command.DMA_MAP: _dma_map,
    Command.DMA_UNMAP: _dma_unmap,
    Command.DEVICE_GET_INFO: _device_get_info,
    Command.DEVICE_GET_REGION_INFO: _get_region_info,
    Command.DEVICE_GET_IRQ_INFO: _get_irq_info,
    Command.DEVICE_SET_IRQS: _set_irqs,
    Command.REGION_READ: _region_read,
    Command.REGION_WRITE: _region_write,
    Command.REGION_WRITE_MULTI: _region_write_multi,
    Command.DEVICE_RESET: _device_reset,
}


def _name(cmd: int) -> str:
    try:
        return Command(cmd).name
    except ValueError:
        return f"command {cmd}"


def _fds_from(anc: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds += arr
    return fds


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _peer(sock: trio.socket.SocketType) -> tuple[str, int | None]:
    """The client as the logs name it, and its uid (SO_PEERCRED)."""
    try:
        pid, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))
        return f"pid {pid} uid {uid}", uid
    except OSError:
        return "unknown peer", None


class SocketPathError(ErrnoError):
    """The socket path cannot be ours: another live server owns it, or it is not a socket."""


class Listener:
    """Listen on a UNIX socket and serve one client at a time with ``device``.

    ``device`` may be a function returning it or None: a device that exists only later (an EP
    guest's controller before the guest starts it); clients are refused until it does, and
    its background tasks are not ours (the EP guest's side runs the SoC).

    The path is claimed with care: one longer than ``sun_path`` takes is refused, missing
    parent directories are created 0700 (logged) and removed again on exit if still empty,
    a stale socket (nobody accepts on it) is replaced, a live one or any other file is
    refused, and on exit the path is unlinked only if it is still the socket this listener
    bound.  Only clients of our own user, or of a uid in ``allow_uids``, are served
    (SO_PEERCRED); with other users allowed, the socket and the directories made for it open
    up to them.
    """

    def __init__(self, path: Path, device: PciDevice | Callable[[], PciDevice | None],
                 allow_uids: frozenset[int] = frozenset()) -> None:
        self.path = path
        self.device = device
        self.allowed_uids = allow_uids | {os.getuid()}
        self._shared = bool(allow_uids - {os.getuid()})
        self.active: Connection | None = None
        self._idle = trio.Event()  # set when the active connection has ended
        self.connections = 0
        self._sock: socket.socket | None = None
        self._ident: tuple[int, int] | None = None  # (st_dev, st_ino) of our socket file
        self._made_dirs: list[Path] = []  # created for the socket, outermost first

    def bind(self) -> None:
        """Claim the path and listen; SocketPathError says why not (callable before trio
        runs, so ``vfio-ep serve`` reports it in one line)."""
        size = len(os.fsencode(self.path))
        if size > SUN_PATH_MAX:
            raise SocketPathError(errno.ENAMETOOLONG, f"{self.path}: too long for a UNIX "
                                  f"socket ({size} bytes; sun_path holds {SUN_PATH_MAX} and "
                                  "the NUL)")
        self._made_dirs = _make_dirs(self.path.parent, 0o711 if self._shared else 0o700)
        try:
            self._claim()
        except SocketPathError:
            self.close()
            raise

    def _claim(self) -> None:
        if self.path.exists() or self.path.is_symlink():
            if self.path.is_symlink() or not self.path.is_socket():
                raise SocketPathError(errno.EEXIST, f"{self.path} exists and is not a socket")
            if _accepts(self.path):
                raise SocketPathError(errno.EADDRINUSE, f"{self.path}: another server is "
                                      "listening on it (stop it, or choose another --socket)")
            log.info("%s: replacing a stale socket (nobody listens on it)", self.path)
            self.path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o111 if self._shared else 0o177)  # born 0600 (0666 when shared)
        try:
            sock.bind(str(self.path))
        except OSError as e:
            sock.close()
            raise SocketPathError(e.errno or errno.EIO, f"{self.path}: {e.strerror}") from None
        finally:
            os.umask(old)
        sock.listen(4)
        st = os.stat(self.path)
        self._sock, self._ident = sock, (st.st_dev, st.st_ino)

    def close(self) -> None:
        """Stop listening and give the path back: the socket if it is still ours (a
        successor may own it now), then the directories made for it, if empty."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._ident:
                self.path.unlink()
        for d in reversed(self._made_dirs):
            try:
                d.rmdir()
            except OSError:
                break  # something else lives there now: it stays, and so do its parents
            log.info("removed %s, made for the socket", d)
        self._made_dirs = []

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        sock = trio.socket.from_stdlib_socket(self._sock)
        use_fast, why = native.available()
        log.info("listening on %s (%s)", self.path,
                 "C fast path" if use_fast else f"Python path: {why}")
        try:
            async with trio.open_nursery() as nursery:
                for task in self.device.background if isinstance(self.device, PciDevice) \
                        else ():
                    await nursery.start(task)
                task_status.started()
                while True:
                    conn_sock, _ = await sock.accept()
                    peer, uid = _peer(conn_sock)
                    if uid not in self.allowed_uids:
                        log.warning("refusing client %s: uid not allowed (allowed: %s; "
                                    "--allow-uid adds one)", peer,
                                    ", ".join(map(str, sorted(self.allowed_uids))))
                        conn_sock.close()
                        continue
                    if self.active is not None and _hung_up(self.active.sock):
                        # The client before died (QEMU killed and restarted at once): its
                        # teardown is under way; let it finish, then serve the new one.
                        with trio.move_on_after(TEARDOWN_GRACE):
                            await self._idle.wait()
                    if self.active is not None:
                        log.warning("refusing client %s: already serving %s", peer,
                                    self.active.peer)
                        conn_sock.close()
                        continue
                    device = self.device if isinstance(self.device, PciDevice) \
                        else self.device()
                    if device is None:
                        log.warning("refusing client %s: the controller on %s is not started "
                                    "yet (its EP guest starts it)", peer, self.path)
                        conn_sock.close()
                        continue
                    self.active = Connection(conn_sock, device, peer)
                    self._idle = trio.Event()
                    self.connections += 1
                    nursery.start_soon(self._run, self.active)
        finally:
            sock.close()
            self.close()

    async def _run(self, conn: Connection) -> None:
        try:
            await conn.serve()
        finally:
            self.active = None
            self._idle.set()


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the peer of ``sock`` has closed its end (what is left to read aside)."""
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLRDHUP)
    return any(events & (select.POLLRDHUP | select.POLLHUP) for _, events in poller.poll(0))


def _make_dirs(path: Path, mode: int) -> list[Path]:
    """Create ``path`` and any missing parents with ``mode`` (sockets live there: 0700 keeps
    other users out, 0711 lets allowed ones reach the socket without listing); the ones
    made, outermost first."""
    missing = []
    while not path.exists():
        missing.append(path)
        path = path.parent
    made: list[Path] = []
    for d in reversed(missing):
        try:
            d.mkdir(mode=mode)
        except OSError as e:
            for m in reversed(made):
                m.rmdir()
            raise SocketPathError(e.errno or errno.EIO, f"{d}: {e.strerror}") from None
        os.chmod(d, mode)  # whatever the umask
        log.info("created %s (%o) for the socket; removed at exit", d, mode)
        made.append(d)
    return made


def _accepts(path: Path) -> bool:
    """Whether a server is listening on the socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True
