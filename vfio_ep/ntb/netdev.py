"""ntb_netdev (drivers/net/ntb_netdev.c) on the EP: Ethernet frames over a transport QP.

The EP's network interface has one queue (``ntb_netdev``'s default), its MTU is the QP's
largest payload less the Ethernet header, and its carrier follows the QP link.  What the
interface is plugged into is a backend: the built-in network peer
(:mod:`vfio_ep.ntb.netpeer`) or a host TAP device (:mod:`vfio_ep.ntb.tap`).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
from collections import deque
from typing import Protocol

import trio

from vfio_ep.ntb.clients import TAP_PREFIX
from vfio_ep.ntb.core import NtbClient, NtbDev
from vfio_ep.ntb.transport import NtbTransport, TransportQp

log = logging.getLogger(__name__)

ETH_HLEN = 14
TX_RETRY = 0.0005  # ring full: the RC frees entries without a doorbell, look again soon
TX_QUEUE_LIMIT = 1000  # frames waiting for the ring; more are dropped, as a full qdisc does


class NetBackend(Protocol):
    """Where the EP's interface is plugged in: ``receive`` takes frames from the NTB link."""

    def receive(self, frame: bytes) -> None: ...

    def close(self) -> None: ...


class NetdevClient(NtbClient):
    """An NtbClient: ntb_transport, and ntb_netdev on its first queue pair."""

    def __init__(self, netdev: str, address: ipaddress.IPv4Interface) -> None:
        self.netdev = netdev
        self.address = address
        self.transport = NtbTransport(on_probe=self._netdev_probe)
        self.ntb: NtbDev | None = None
        self.qp: TransportQp | None = None
        self.backend: NetBackend | None = None
        self.carrier = False
        self.mtu = 0
        self.stats = {"rx_frames": 0, "tx_frames": 0, "tx_dropped": 0}
        self._txq: deque[bytes] = deque()
        self._tx_running = False

    # -- NtbClient ------------------------------------------------------------
    def probe(self, ntb: NtbDev) -> None:
        self.ntb = ntb
        self.transport.probe(ntb)

    def remove(self, ntb: NtbDev) -> None:
        self.transport.remove(ntb)
        if self.backend is not None:
            self.backend.close()

    # -- ntb_netdev ---------------------------------------------------------------
    def _netdev_probe(self, transport: NtbTransport) -> None:
        """ntb_netdev_probe(): a queue, the MTU, the backend; then the QP link."""
        qp = transport.create_queue(self._rx_handler, self._event_handler)
        if qp is None:
            raise ValueError(f"{transport.ntb.name}: no free queue pair for ntb_netdev")
        self.qp = qp
        self.mtu = qp.max_size() - ETH_HLEN
        self.backend = self._open_backend(transport.ntb)
        log.info("%s: ntb_netdev: MTU %d, %s", transport.ntb.name, self.mtu, self.netdev)
        qp.link_up(rx_buf_len=self.mtu + ETH_HLEN)

    def _open_backend(self, ntb: NtbDev) -> NetBackend:
        if self.netdev.startswith(TAP_PREFIX):
            from vfio_ep.ntb.tap import TapBackend

            return TapBackend(self.netdev.removeprefix(TAP_PREFIX), self.xmit, ntb.spawn)
        from vfio_ep.ntb.netpeer import NetPeer

        return NetPeer(self.address, self.xmit, ntb.spawn, self.mtu)

    def _rx_handler(self, qp: TransportQp, frame: bytes) -> None:
        self.stats["rx_frames"] += 1
        if self.backend is not None:
            self.backend.receive(frame)

    def _event_handler(self, qp: TransportQp, up: bool) -> None:
        self.carrier = up
        log.info("%s: ntb_netdev: carrier %s", qp.ntb.name, "on" if up else "off")
        if not up:
            self._txq.clear()

    # -- ndo_start_xmit -----------------------------------------------------------
    def xmit(self, frame: bytes) -> None:
        """A frame from the backend towards the RC; dropped while the carrier is off."""
        if not self.carrier or len(self._txq) >= TX_QUEUE_LIMIT or self.qp is None:
            self.stats["tx_dropped"] += 1
            return
        if len(frame) > self.mtu + ETH_HLEN:
            log.warning("ntb_netdev: dropping a %d-byte frame (MTU %d)", len(frame), self.mtu)
            self.stats["tx_dropped"] += 1
            return
        self._txq.append(frame)
        if not self._tx_running:
            self._tx_running = True
            self.qp.ntb.spawn(self._tx_worker, "ntb_netdev-tx")

    async def _tx_worker(self) -> None:
        try:
            while self._txq and self.qp is not None:
                rc = await self.qp.tx_enqueue(self._txq[0])
                if rc == -errno.EAGAIN:
                    await trio.sleep(TX_RETRY)
                    continue
                frame = self._txq.popleft()
                if rc:
                    self.stats["tx_dropped"] += 1
                    log.debug("ntb_netdev: %d-byte frame dropped: %s", len(frame),
                              errno.errorcode.get(-rc, rc))
                else:
                    self.stats["tx_frames"] += 1
        finally:
            self._tx_running = False
