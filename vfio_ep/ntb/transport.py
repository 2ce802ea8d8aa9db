"""ntb_transport (drivers/ntb/ntb_transport.c, Linux 7.3.4, wire protocol version 4).

The EP's end of the software queue-pair transport that a guest's ntb_transport talks to.
Everything on the wire is as in the kernel: the scratchpad handshake (VERSION, QP_LINKS,
NUM_QPS, NUM_MWS, MWi size), the per-QP ring in each memory window (frames of
``rx_max_frame`` bytes ending in ``struct ntb_payload_header``, the consumer index in the
window's last 4 bytes), the version check against the packet count, DONE and LINK_DOWN
flags, data -> flags -> doorbell ordering, and QP q on doorbell bit q.

Two things differ on the EP, both invisible on the wire: the inbound buffers are set up
once at probe and kept across link cycles (``ntb_set_mw`` finds the size unchanged, as the
kernel does when it re-links), so a memory window BAR can be mapped by the guest directly;
and receive buffers are never short, so the client's handler gets every frame.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from construct import Int32ul, Struct

from vfio_ep.epc.soc import DelayedWork
from vfio_ep.epf.regs import field_offsets
from vfio_ep.ntb.core import NTB_DEF_PEER_IDX as PIDX
from vfio_ep.ntb.core import NtbClient, NtbCtxOps, NtbDev, NtbIoError

log = logging.getLogger(__name__)

NTB_TRANSPORT_VERSION = 4
TRANSPORT_MTU = 0x10000
# Scratchpad indices
VERSION, QP_LINKS, NUM_QPS, NUM_MWS, MW0_SZ_HIGH, MW0_SZ_LOW = range(6)
NTB_TRANSPORT_MIN_SPADS = MW0_SZ_HIGH + 2
DESC_DONE_FLAG = 1 << 0
LINK_DOWN_FLAG = 1 << 1
NTB_LINK_DOWN_TIMEOUT = 0.010  # seconds between handshake retries
RX_INFO_SIZE = 4  # struct ntb_rx_info { unsigned int entry; }

# struct ntb_payload_header, at the end of every frame
PayloadHeader = Struct("ver" / Int32ul, "len" / Int32ul, "flags" / Int32ul)
HDR_SIZE: int = PayloadHeader.sizeof()
HDR = field_offsets(PayloadHeader)

RxHandler = Callable[["TransportQp", bytes], None]
EventHandler = Callable[["TransportQp", bool], None]


def _u32(value: int) -> bytes:
    return (value & 0xFFFFFFFF).to_bytes(4, "little")


@dataclass
class TransportMw:
    """struct ntb_transport_mw: the peer window (phys) and our inbound buffer (dma)."""

    phys_addr: int
    phys_size: int
    xlat_size: int = 0
    buff_size: int = 0
    dma_addr: int = 0  # EP address of the local buffer the peer writes into


@dataclass
class TransportQp:
    """struct ntb_transport_qp."""

    transport: NtbTransport
    qp_num: int
    tx_mw: int = 0
    tx_max_frame: int = 0
    tx_max_entry: int = 0
    tx_index: int = 0
    rx_info: int = 0  # EP address, in the peer's window: our consumer index for its TX
    rx_buff: int = 0
    rx_max_frame: int = 0
    rx_max_entry: int = 0
    rx_index: int = 0
    remote_rx_info: int = 0  # EP address, in our buffer: the peer's consumer index
    link_is_up: bool = False
    active: bool = False
    client_ready: bool = False
    rx_buf_len: int = 0  # the client's receive buffer size (ntb_netdev: mtu + ETH_HLEN)
    rx_handler: RxHandler | None = None
    event_handler: EventHandler | None = None
    rx_pkts: int = 0
    tx_pkts: int = 0
    stats: dict[str, int] = field(default_factory=dict)
    _rx_running: bool = False
    _rx_again: bool = False
    link_work: DelayedWork = field(init=False)  # qp->link_work

    def __post_init__(self) -> None:
        self.link_work = DelayedWork(self.ntb.spawn, partial(self.transport._qp_link_work, self),
                                     f"{self.ntb.name}-qp{self.qp_num}-link")

    @property
    def ntb(self) -> NtbDev:
        return self.transport.ntb

    def count(self, what: str, n: int = 1) -> None:
        self.stats[what] = self.stats.get(what, 0) + n

    # -- the client's API (ntb_transport_*) ---------------------------------------
    def max_size(self) -> int:
        """ntb_transport_max_size(): the largest payload a frame carries."""
        return self.tx_max_frame - HDR_SIZE

    def tx_free_entry(self) -> int:
        head = self.tx_index
        tail = int.from_bytes(self.ntb.mem_read(self.remote_rx_info, 4), "little")
        return tail - head if tail >= head else self.tx_max_entry + tail - head

    def link_up(self, rx_buf_len: int) -> None:
        """ntb_transport_link_up(): the client is ready; bring the QP up once linked."""
        self.client_ready = True
        self.rx_buf_len = rx_buf_len
        if self.transport.link_is_up:
            self.link_work.schedule(0)

    async def tx_enqueue(self, data: bytes) -> int:
        """ntb_transport_tx_enqueue(): 0, or -ENOLINK / -EMSGSIZE / -EAGAIN (ring full)."""
        if not data:
            return -errno.EINVAL
        if not self.link_is_up:
            return -errno.ENOLINK
        if len(data) > self.max_size():
            return -errno.EMSGSIZE
        return await self._process_tx(data, 0)

    async def _process_tx(self, data: bytes, flags: int) -> int:
        """ntb_process_tx() + ntb_async_tx() + ntb_tx_copy_callback(), CPU copy."""
        if not self.tx_free_entry():
            self.count("tx_ring_full")
            return -errno.EAGAIN
        index, ver = self.tx_index, self.tx_pkts
        self.tx_index = (self.tx_index + 1) % self.tx_max_entry
        self.tx_pkts += 1
        offset = self.tx_mw + self.tx_max_frame * index
        hdr = offset + self.tx_max_frame - HDR_SIZE
        try:
            await self.ntb.io_write(hdr + HDR["len"][0], _u32(len(data)))
            await self.ntb.io_write(hdr + HDR["ver"][0], _u32(ver))
            if data:
                await self.ntb.io_write(offset, data)
            await self.ntb.io_write(hdr + HDR["flags"][0], _u32(flags | DESC_DONE_FLAG))
        except NtbIoError as e:
            log.warning("%s: qp %d: TX lost, peer window unreachable: %s", self.ntb.name,
                        self.qp_num, e)
            return -errno.EIO
        self.ntb.peer_db_set(1 << self.qp_num)
        self.count("tx_bytes", len(data))
        return 0

    # -- receive (ntb_transport_rxc_db, the doorbell tasklet) ---------------------------
    def schedule_rx(self) -> None:
        if self._rx_running:
            self._rx_again = True
            return
        self._rx_running = True
        self.ntb.spawn(self._rxc_db, f"{self.ntb.name}-qp{self.qp_num}-rx")

    async def _rxc_db(self) -> None:
        try:
            while True:
                self._rx_again = False
                done = 0
                while done < self.rx_max_entry and await self._process_rxc():
                    done += 1
                bit = 1 << self.qp_num
                again = self._rx_again
                if done == self.rx_max_entry:  # there is more work to do
                    again = True
                elif self.ntb.db_read() & bit:  # a doorbell may have come meanwhile
                    self.ntb.db_clear(bit)
                    again = True
                if not (again and self.active):
                    return
        finally:
            self._rx_running = False

    async def _process_rxc(self) -> bool:
        """ntb_process_rxc(): one frame; False when there is none (or the ring stalls)."""
        ntb = self.ntb
        offset = self.rx_buff + self.rx_max_frame * self.rx_index
        hdr_addr = offset + self.rx_max_frame - HDR_SIZE
        hdr = PayloadHeader.parse(ntb.mem_read(hdr_addr, HDR_SIZE))
        log.debug("%s: qp %d: RX index %d ver %d len %d flags %#x", ntb.name, self.qp_num,
                  self.rx_index, hdr.ver, hdr.len, hdr.flags)
        if not hdr.flags & DESC_DONE_FLAG:
            self.count("rx_ring_empty")
            return False
        if hdr.flags & LINK_DOWN_FLAG:
            log.info("%s: qp %d: link down flag set", ntb.name, self.qp_num)
            self.transport.schedule_qp_cleanup(self)
            ntb.mem_write(hdr_addr + HDR["flags"][0], _u32(0))
            return False
        if hdr.ver != self.rx_pkts & 0xFFFFFFFF:
            self.count("rx_err_ver")
            log.warning("%s: qp %d: version mismatch, expected %d - got %d: the ring "
                        "stalls, as in Linux", ntb.name, self.qp_num, self.rx_pkts, hdr.ver)
            return False
        if not self.client_ready:
            self.count("rx_err_no_buf")
            return False
        index = self.rx_index
        data = b""
        if hdr.len > self.rx_buf_len:
            self.count("rx_err_oflow")
            log.warning("%s: qp %d: receive buffer overflow! Wanted %d got %d", ntb.name,
                        self.qp_num, hdr.len, self.rx_buf_len)
        else:
            self.rx_pkts += 1
            self.count("rx_bytes", hdr.len)
            data = ntb.mem_read(offset, hdr.len)
        self.rx_index = (self.rx_index + 1) % self.rx_max_entry
        # ntb_complete_rxc(): flags cleared, then the peer learns the entry is free.
        ntb.mem_write(hdr_addr + HDR["flags"][0], _u32(0))
        try:
            await ntb.io_write(self.rx_info, _u32(index))
        except NtbIoError as e:
            log.warning("%s: qp %d: cannot return RX entry %d: %s", ntb.name, self.qp_num,
                        index, e)
        if data and self.rx_handler is not None and self.client_ready:
            self.rx_handler(self, data)
        return True


class NtbTransport(NtbClient, NtbCtxOps):
    """An ntb_transport context on one NTB device (an NtbClient and its NtbCtxOps)."""

    def __init__(self, max_mw_size: int = 0, on_probe: Callable[[NtbTransport], None]
                 | None = None) -> None:
        self.max_mw_size = max_mw_size
        self.on_probe = on_probe  # a transport client (ntb_netdev) creating its queues
        self.ntb: NtbDev
        self.mws: list[TransportMw] = []
        self.qps: list[TransportQp] = []
        self.qp_bitmap_free = 0
        self.link_is_up = False
        self.link_work: DelayedWork  # nt->link_work, made at probe

    # -- NtbClient ------------------------------------------------------------
    def probe(self, ntb: NtbDev) -> None:
        """ntb_transport_probe(): windows, QP count, queues; then enable the link."""
        self.ntb = ntb
        self.link_work = DelayedWork(ntb.spawn, self._link_work, f"{ntb.name}-transport-link")
        spad_count = ntb.spad_count()
        if spad_count < NTB_TRANSPORT_MIN_SPADS:
            raise ValueError(f"{ntb.name}: ntb_transport needs {NTB_TRANSPORT_MIN_SPADS} "
                             f"scratchpads, the device has {spad_count}")
        mw_count = min(ntb.peer_mw_count(), (spad_count - MW0_SZ_HIGH) // 2)
        for i in range(mw_count):
            self.mws.append(TransportMw(*ntb.peer_mw_get_addr(i)))
        qp_bitmap = ntb.db_valid_mask()
        qp_count = max(qp_bitmap.bit_length() - 1, 0)  # ilog2
        qp_count = min(qp_count, mw_count)
        self.qps = [TransportQp(self, q) for q in range(qp_count)]
        self.qp_bitmap_free = (1 << qp_count) - 1
        for qp in self.qps:
            self._init_queue(qp)
        # Inbound buffers now (see the module docstring): the peer's size is this device's.
        for i in range(mw_count):
            self._set_mw(i, ntb.mw_get_align(PIDX, i)[2])
        ntb.set_ctx(self)
        log.info("%s: ntb_transport: %d memory window(s), %d queue pair(s)", ntb.name,
                 mw_count, qp_count)
        if self.on_probe is not None:
            self.on_probe(self)
        ntb.link_enable()
        ntb.link_event()

    def remove(self, ntb: NtbDev) -> None:
        self._link_cleanup()
        ntb.link_disable()
        ntb.clear_ctx()

    # -- NtbCtxOps --------------------------------------------------------------
    def link_event(self) -> None:
        """ntb_transport_event_callback()."""
        if self.ntb.link_is_up():
            self.link_work.schedule(0)
        else:
            self._link_cleanup()

    def db_event(self, vector: int) -> None:
        """ntb_transport_doorbell_callback(): wake the QPs of this vector."""
        allocated = ((1 << len(self.qps)) - 1) & ~self.qp_bitmap_free
        bits = allocated & self.ntb.db_vector_mask(vector)
        for qp in self.qps:
            if bits & (1 << qp.qp_num) and qp.active:
                qp.schedule_rx()

    # -- queues -------------------------------------------------------------------
    def create_queue(self, rx_handler: RxHandler, event_handler: EventHandler
                     ) -> TransportQp | None:
        """ntb_transport_create_queue(): the lowest free QP, or None."""
        for qp in self.qps:
            if self.qp_bitmap_free & (1 << qp.qp_num):
                self.qp_bitmap_free &= ~(1 << qp.qp_num)
                qp.rx_handler, qp.event_handler = rx_handler, event_handler
                self.ntb.db_clear(1 << qp.qp_num)
                log.info("%s: NTB Transport QP %d created", self.ntb.name, qp.qp_num)
                return qp
        return None

    def _num_qps_mw(self, mw_num: int) -> int:
        qp_count, mw_count = len(self.qps), len(self.mws)
        return qp_count // mw_count + (1 if mw_num < qp_count % mw_count else 0)

    def _init_queue(self, qp: TransportQp) -> None:
        """ntb_transport_init_queue(): the TX side, in the peer's window."""
        mw_num = qp.qp_num % len(self.mws)
        mw = self.mws[mw_num]
        mw_size = min(mw.phys_size, self.max_mw_size) if self.max_mw_size else mw.phys_size
        tx_size = mw_size // self._num_qps_mw(mw_num)
        qp.tx_mw = mw.phys_addr + tx_size * (qp.qp_num // len(self.mws))
        tx_size -= RX_INFO_SIZE
        qp.rx_info = qp.tx_mw + tx_size
        qp.tx_max_frame = min(TRANSPORT_MTU, tx_size // 2)
        if qp.tx_max_frame <= HDR_SIZE:  # the kernel divides by zero here
            raise ValueError(f"{self.ntb.name}: ntb_transport: memory window {mw_num + 1} "
                             f"({mw_size} bytes) holds no frame for queue {qp.qp_num}")
        qp.tx_max_entry = tx_size // qp.tx_max_frame

    def _setup_qp_mw(self, qp: TransportQp) -> None:
        """ntb_transport_setup_qp_mw(): the RX side, in our buffer; counters reset."""
        mw_num = qp.qp_num % len(self.mws)
        mw = self.mws[mw_num]
        rx_size = mw.xlat_size // self._num_qps_mw(mw_num)
        qp.rx_buff = mw.dma_addr + rx_size * (qp.qp_num // len(self.mws))
        rx_size -= RX_INFO_SIZE
        qp.remote_rx_info = qp.rx_buff + rx_size
        qp.rx_max_frame = min(TRANSPORT_MTU, rx_size // 2)
        qp.rx_max_entry = rx_size // qp.rx_max_frame
        qp.rx_index = 0
        self.ntb.mem_write(qp.remote_rx_info, _u32(qp.rx_max_entry - 1))
        for i in range(qp.rx_max_entry):
            self.ntb.mem_write(qp.rx_buff + qp.rx_max_frame * (i + 1) - HDR_SIZE,
                               bytes(HDR_SIZE))
        qp.rx_pkts = qp.tx_pkts = qp.tx_index = 0

    def _set_mw(self, num_mw: int, size: int) -> None:
        """ntb_set_mw(): a local buffer of ``size`` behind inbound window ``num_mw``."""
        mw = self.mws[num_mw]
        addr_align, size_align, _ = self.ntb.mw_get_align(PIDX, num_mw)
        xlat_size = -(-size // size_align) * size_align
        if mw.xlat_size == xlat_size:
            return
        if mw.buff_size:
            self.ntb.dma_free(mw.dma_addr, mw.buff_size)
        buff_size = -(-size // addr_align) * addr_align
        mw.dma_addr = self.ntb.dma_alloc(buff_size, addr_align)
        mw.xlat_size, mw.buff_size = xlat_size, buff_size
        self.ntb.mw_set_trans(PIDX, num_mw, mw.dma_addr, xlat_size)

    # -- link -------------------------------------------------------------------
    def _link_work(self) -> None:
        """ntb_transport_link_work(): publish our sizes, check the peer's, then the QPs."""
        ntb = self.ntb
        for i, mw in enumerate(self.mws):
            size = min(mw.phys_size, self.max_mw_size) if self.max_mw_size else mw.phys_size
            ntb.peer_spad_write(PIDX, MW0_SZ_HIGH + 2 * i, size >> 32)
            ntb.peer_spad_write(PIDX, MW0_SZ_LOW + 2 * i, size & 0xFFFFFFFF)
        ntb.peer_spad_write(PIDX, NUM_MWS, len(self.mws))
        ntb.peer_spad_write(PIDX, NUM_QPS, len(self.qps))
        ntb.peer_spad_write(PIDX, VERSION, NTB_TRANSPORT_VERSION)
        theirs = (ntb.spad_read(VERSION), ntb.spad_read(NUM_QPS), ntb.spad_read(NUM_MWS))
        if theirs != (NTB_TRANSPORT_VERSION, len(self.qps), len(self.mws)):
            if ntb.link_is_up():
                self.link_work.schedule(NTB_LINK_DOWN_TIMEOUT)
            return
        for i in range(len(self.mws)):
            size = ntb.spad_read(MW0_SZ_HIGH + 2 * i) << 32 | ntb.spad_read(MW0_SZ_LOW + 2 * i)
            try:
                self._set_mw(i, size)
            except (OSError, MemoryError) as e:
                log.error("%s: Unable to set mw%d translation (%#x bytes): %s", ntb.name, i,
                          size, e)
                return
        self.link_is_up = True
        log.info("%s: ntb_transport link up (version %d, %d QPs)", ntb.name,
                 NTB_TRANSPORT_VERSION, len(self.qps))
        for qp in self.qps:
            self._setup_qp_mw(qp)
            if qp.client_ready:
                qp.link_work.schedule(0)

    def _qp_link_work(self, qp: TransportQp) -> None:
        """ntb_qp_link_work(): set our bit in the peer's QP_LINKS; up once the peer set
        ours."""
        ntb = self.ntb
        val = ntb.spad_read(QP_LINKS)
        ntb.peer_spad_write(PIDX, QP_LINKS, val | 1 << qp.qp_num)
        if val & 1 << qp.qp_num:
            log.info("%s: qp %d: Link Up", ntb.name, qp.qp_num)
            qp.link_is_up = qp.active = True
            if qp.event_handler is not None:
                qp.event_handler(qp, True)
            qp.schedule_rx()
        elif self.link_is_up:
            qp.link_work.schedule(NTB_LINK_DOWN_TIMEOUT)

    def schedule_qp_cleanup(self, qp: TransportQp) -> None:
        """The peer sent LINK_DOWN on this QP: clean up, then try to re-link."""
        self._qp_link_cleanup(qp)
        if self.link_is_up:
            qp.link_work.schedule(NTB_LINK_DOWN_TIMEOUT)

    def _qp_link_cleanup(self, qp: TransportQp) -> None:
        """ntb_qp_link_cleanup()."""
        qp.link_work.cancel()
        was_up = qp.link_is_up
        qp.link_is_up = qp.active = False
        qp.tx_index = qp.rx_index = qp.rx_pkts = qp.tx_pkts = 0
        if qp.remote_rx_info and qp.rx_max_entry:
            self.ntb.mem_write(qp.remote_rx_info, _u32(qp.rx_max_entry - 1))
        if was_up:
            log.info("%s: qp %d: Link Cleanup", self.ntb.name, qp.qp_num)
        if qp.event_handler is not None:
            qp.event_handler(qp, False)

    def _link_cleanup(self) -> None:
        """ntb_transport_link_cleanup(): QPs down, and our scratchpads zeroed so the next
        handshake starts clean.  (The inbound buffers stay: see the module docstring.)"""
        self.link_work.cancel()
        for qp in self.qps:
            if not self.qp_bitmap_free & (1 << qp.qp_num):
                self._qp_link_cleanup(qp)
        if self.link_is_up:
            log.info("%s: ntb_transport link down", self.ntb.name)
        self.link_is_up = False
        for i in range(self.ntb.spad_count()):
            self.ntb.spad_write(i, 0)
