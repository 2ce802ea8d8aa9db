"""A small network peer behind the EP's ntb_netdev, so a guest can ping and move data.

It owns one IPv4 address (10.0.0.11/24 by default, the address the seeds ping) and answers
what a test needs, without privileges and without touching the host's network:

* ARP requests for its address;
* ICMP echo (``ping``);
* UDP echo on port 7;
* TCP echo on port 7 and discard on port 9: passive open, in-order delivery, cumulative
  acknowledgements, the peer's window and MSS respected, go-back-N retransmission, and a
  graceful close (the echo side closes once it has echoed everything after the guest's
  FIN, so ``nc 10.0.0.11 7 < file > copy`` ends by itself).  No window scaling, SACK or
  timestamps are offered, so the guest uses none.

Replies go to the Ethernet address the request came from.  Header layouts are declared once
with construct, checksums are the Internet one's-complement sum.
"""

from __future__ import annotations

import ipaddress
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from construct import Bytes, Int8ub, Int16ub, Int32ub, Struct

from vfio_ep.epc.irq import Spawn

log = logging.getLogger(__name__)

Send = Callable[[bytes], None]

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP = 1, 6, 17
ICMP_ECHOREPLY, ICMP_ECHO = 0, 8
ARPOP_REQUEST, ARPOP_REPLY = 1, 2
ECHO_PORT, DISCARD_PORT = 7, 9
PEER_MAC = bytes.fromhex("02000000000b")  # locally administered
IP_DF = 0x4000
TTL = 64

TCP_FIN, TCP_SYN, TCP_RST, TCP_PSH, TCP_ACK = 0x01, 0x02, 0x04, 0x08, 0x10
TCPOPT_MSS = 2
TCP_DEFAULT_MSS = 536
TCP_MAX_WINDOW = 0xFFFF  # no window scaling
TCP_BUFFER = 4 << 20  # echo data held (unsent + unacknowledged) before the window closes
RTO_INITIAL, RTO_MAX, RTO_TRIES = 0.2, 3.0, 15

EthHdr = Struct("dst" / Bytes(6), "src" / Bytes(6), "type" / Int16ub)
ArpPkt = Struct("htype" / Int16ub, "ptype" / Int16ub, "hlen" / Int8ub, "plen" / Int8ub,
                "op" / Int16ub, "sha" / Bytes(6), "spa" / Bytes(4), "tha" / Bytes(6),
                "tpa" / Bytes(4))
IpHdr = Struct("ver_ihl" / Int8ub, "tos" / Int8ub, "tot_len" / Int16ub, "id" / Int16ub,
               "frag_off" / Int16ub, "ttl" / Int8ub, "protocol" / Int8ub,
               "check" / Int16ub, "saddr" / Bytes(4), "daddr" / Bytes(4))
IcmpHdr = Struct("type" / Int8ub, "code" / Int8ub, "check" / Int16ub, "id" / Int16ub,
                 "seq" / Int16ub)
UdpHdr = Struct("sport" / Int16ub, "dport" / Int16ub, "len" / Int16ub, "check" / Int16ub)
TcpHdr = Struct("sport" / Int16ub, "dport" / Int16ub, "seq" / Int32ub, "ack" / Int32ub,
                "doff" / Int8ub, "flags" / Int8ub, "window" / Int16ub, "check" / Int16ub,
                "urg" / Int16ub)
ETH_LEN, IP_LEN, TCP_LEN = EthHdr.sizeof(), IpHdr.sizeof(), TcpHdr.sizeof()


def _ones_sum(data: bytes) -> int:
    """The one's-complement sum of the 16-bit words of ``data``, modulo 0xffff.

    A number's 16-bit digits sum to the number itself modulo 0xffff, which lets Python's
    big integers do the sum in C: fast enough for 64 KiB segments.
    """
    if len(data) % 2:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def inet_checksum(data: bytes) -> int:
    """RFC 1071: the checksum field that makes ``data`` (with the field zeroed) sum to 0."""
    return 0xFFFF - _ones_sum(data)


def checksum_ok(data: bytes) -> bool:
    """True when ``data``, checksum field included, sums to (one's-complement) zero."""
    return _ones_sum(data) == 0


def _seq_lt(a: int, b: int) -> bool:
    """a before b in 32-bit sequence space."""
    return 0 < (b - a) & 0xFFFFFFFF < 0x80000000


@dataclass
class _Ip:
    src: bytes
    dst: bytes
    protocol: int
    payload: bytes
    mac: bytes  # who sent it: replies go there


class NetPeer:
    """The built-in network backend of the EP's ntb_netdev."""

    def __init__(self, address: ipaddress.IPv4Interface, send: Send, spawn: Spawn,
                 mtu: int) -> None:
        self.ip = address.ip.packed
        self.send = send
        self.spawn = spawn
        self.mtu = mtu
        self.mac = PEER_MAC
        self._ip_id = 0
        self.tcp: dict[tuple[bytes, int, int], TcpConnection] = {}
        self.stats: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.stats[what] = self.stats.get(what, 0) + 1

    def close(self) -> None:
        for conn in list(self.tcp.values()):
            conn.abort()

    # -- input ----------------------------------------------------------------
    def receive(self, frame: bytes) -> None:
        """A frame from the guest; anything not for us, or malformed, is dropped."""
        if len(frame) < ETH_LEN:
            return
        eth = EthHdr.parse(frame)
        body = frame[ETH_LEN:]
        try:
            if eth.type == ETH_P_ARP:
                self._arp(body)
            elif eth.type == ETH_P_IP:
                self._ipv4(body, eth.src)
        except Exception as e:  # a malformed packet from the guest must not stop us
            self.count("malformed")
            log.debug("netpeer: dropped a malformed frame: %s", e)

    def _arp(self, body: bytes) -> None:
        arp = ArpPkt.parse(body)
        if arp.op != ARPOP_REQUEST or arp.tpa != self.ip:
            return
        self.count("arp")
        reply = ArpPkt.build(dict(htype=1, ptype=ETH_P_IP, hlen=6, plen=4, op=ARPOP_REPLY,
                                  sha=self.mac, spa=self.ip, tha=arp.sha, tpa=arp.spa))
        self.send(EthHdr.build(dict(dst=arp.sha, src=self.mac, type=ETH_P_ARP)) + reply)

    def _ipv4(self, body: bytes, mac: bytes) -> None:
        ip = IpHdr.parse(body)
        ihl = (ip.ver_ihl & 0xF) * 4
        if ip.ver_ihl >> 4 != 4 or ihl < IP_LEN or ip.tot_len > len(body) or \
                ip.daddr != self.ip or ip.frag_off & 0x3FFF or not checksum_ok(body[:ihl]):
            self.count("ip_dropped")
            return
        pkt = _Ip(ip.saddr, ip.daddr, ip.protocol, body[ihl:ip.tot_len], mac)
        if pkt.protocol == IPPROTO_ICMP:
            self._icmp(pkt)
        elif pkt.protocol == IPPROTO_UDP:
            self._udp(pkt)
        elif pkt.protocol == IPPROTO_TCP:
            self._tcp(pkt)

    def _icmp(self, pkt: _Ip) -> None:
        icmp = IcmpHdr.parse(pkt.payload)
        if icmp.type != ICMP_ECHO or not checksum_ok(pkt.payload):
            return
        self.count("icmp_echo")
        reply = bytearray(pkt.payload)
        reply[0] = ICMP_ECHOREPLY
        reply[2:4] = b"\0\0"
        reply[2:4] = inet_checksum(bytes(reply)).to_bytes(2, "big")
        self.output(pkt.mac, pkt.src, IPPROTO_ICMP, bytes(reply))

    def _udp(self, pkt: _Ip) -> None:
        udp = UdpHdr.parse(pkt.payload)
        if udp.dport != ECHO_PORT:
            return
        self.count("udp_echo")
        data = pkt.payload[UdpHdr.sizeof():udp.len]
        hdr = UdpHdr.build(dict(sport=ECHO_PORT, dport=udp.sport, len=udp.len, check=0))
        check = inet_checksum(_pseudo(self.ip, pkt.src, IPPROTO_UDP, udp.len) + hdr + data)
        hdr = hdr[:6] + (check or 0xFFFF).to_bytes(2, "big")
        self.output(pkt.mac, pkt.src, IPPROTO_UDP, hdr + data)

    def _tcp(self, pkt: _Ip) -> None:
        if not checksum_ok(_pseudo(pkt.src, self.ip, IPPROTO_TCP, len(pkt.payload))
                           + pkt.payload):
            self.count("tcp_bad_checksum")
            return
        seg = TcpHdr.parse(pkt.payload)
        data = pkt.payload[(seg.doff >> 4) * 4:]
        key = (pkt.src, seg.sport, seg.dport)
        conn = self.tcp.get(key)
        if conn is None:
            if seg.flags & TCP_SYN and not seg.flags & TCP_ACK and seg.dport in (
                    ECHO_PORT, DISCARD_PORT):
                conn = self.tcp[key] = TcpConnection(self, pkt.mac, pkt.src, seg.sport,
                                                     seg.dport, seg,
                                                     _mss_option(pkt.payload, seg.doff))
            elif not seg.flags & TCP_RST:
                self._reset(pkt.mac, pkt.src, seg, len(data))
            return
        conn.segment(seg, data)

    def _reset(self, mac: bytes, dst: bytes, seg: Any, length: int) -> None:
        """RST for a segment to no connection (RFC 793)."""
        if seg.flags & TCP_ACK:
            self.tcp_output(mac, dst, seg.dport, seg.sport, seg.ack, 0, TCP_RST, 0)
        else:
            ack = seg.seq + length + (1 if seg.flags & (TCP_SYN | TCP_FIN) else 0)
            self.tcp_output(mac, dst, seg.dport, seg.sport, 0, ack, TCP_RST | TCP_ACK, 0)

    # -- output ---------------------------------------------------------------
    def output(self, mac: bytes, dst: bytes, protocol: int, payload: bytes) -> None:
        self._ip_id = (self._ip_id + 1) & 0xFFFF
        hdr = IpHdr.build(dict(ver_ihl=0x45, tos=0, tot_len=IP_LEN + len(payload),
                               id=self._ip_id, frag_off=IP_DF, ttl=TTL, protocol=protocol,
                               check=0, saddr=self.ip, daddr=dst))
        hdr = hdr[:10] + inet_checksum(hdr).to_bytes(2, "big") + hdr[12:]
        self.send(EthHdr.build(dict(dst=mac, src=self.mac, type=ETH_P_IP)) + hdr + payload)

    def tcp_output(self, mac: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int,
                   flags: int, window: int, data: bytes = b"", options: bytes = b"") -> None:
        hdr = TcpHdr.build(dict(sport=sport, dport=dport, seq=seq & 0xFFFFFFFF,
                                ack=ack & 0xFFFFFFFF, doff=((TCP_LEN + len(options)) // 4) << 4,
                                flags=flags, window=window, check=0, urg=0)) + options
        check = inet_checksum(_pseudo(self.ip, dst, IPPROTO_TCP, len(hdr) + len(data))
                              + hdr + data)
        self.output(mac, dst, IPPROTO_TCP, hdr[:16] + check.to_bytes(2, "big") + hdr[18:]
                    + data)


def _pseudo(src: bytes, dst: bytes, protocol: int, length: int) -> bytes:
    return src + dst + bytes([0, protocol]) + length.to_bytes(2, "big")


def _mss_option(segment: bytes, doff: int) -> int:
    """The MSS option of a SYN, or the default 536."""
    opts = segment[TCP_LEN:(doff >> 4) * 4]
    i = 0
    while i < len(opts):
        kind = opts[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(opts) or opts[i + 1] < 2:
            break
        if kind == TCPOPT_MSS and opts[i + 1] == 4:
            return int.from_bytes(opts[i + 2:i + 4], "big")
        i += opts[i + 1]
    return TCP_DEFAULT_MSS


@dataclass
class TcpConnection:
    """One passive TCP connection: echo (port 7) or discard (port 9)."""

    peer: NetPeer
    mac: bytes
    remote: bytes
    rport: int
    lport: int
    syn: Any
    peer_mss: int
    iss: int = field(default_factory=lambda: random.getrandbits(32))
    state: str = "SYN_RCVD"
    sendbuf: bytearray = field(default_factory=bytearray)  # from snd_una on
    fin_wanted: bool = False
    fin_sent: bool = False
    received: int = 0
    _timer: trio.CancelScope | None = None
    _tries: int = 0
    _adv_window: int = 0

    def __post_init__(self) -> None:
        self.rcv_nxt = (self.syn.seq + 1) & 0xFFFFFFFF
        self.snd_una = self.snd_nxt = self.iss
        self.snd_wnd = self.syn.window
        self.mss = max(1, min(self.peer_mss, self.peer.mtu - IP_LEN - TCP_LEN))
        self._send_syn_ack()

    def _window(self) -> int:
        return max(0, min(TCP_MAX_WINDOW, TCP_BUFFER - len(self.sendbuf)))

    def _emit(self, seq: int, flags: int, data: bytes = b"", options: bytes = b"") -> None:
        self._adv_window = self._window()
        self.peer.tcp_output(self.mac, self.remote, self.lport, self.rport, seq, self.rcv_nxt,
                             flags, self._adv_window, data, options)

    def _send_syn_ack(self) -> None:
        mss = self.peer.mtu - IP_LEN - TCP_LEN
        self._emit(self.iss, TCP_SYN | TCP_ACK,
                   options=bytes([TCPOPT_MSS, 4]) + min(mss, 0xFFFF).to_bytes(2, "big"))
        self.snd_nxt = (self.iss + 1) & 0xFFFFFFFF
        self._arm()

    # -- input ----------------------------------------------------------------
    def segment(self, seg: Any, data: bytes) -> None:
        flags = seg.flags
        if flags & TCP_RST:
            self.abort()
            return
        if flags & TCP_SYN:  # a retransmitted SYN: answer it again
            if self.state == "SYN_RCVD":
                self.snd_nxt = self.iss
                self._send_syn_ack()
            return
        if not flags & TCP_ACK:
            return
        self._ack(seg.ack, seg.window)
        if self.state == "CLOSED":
            return
        need_ack = self._data(seg.seq, data, bool(flags & TCP_FIN))
        if not self._push() and need_ack:
            self._emit(self.snd_nxt, TCP_ACK)

    def _ack(self, ack: int, window: int) -> None:
        if not _seq_lt(self.snd_una, ack) or _seq_lt(self.snd_nxt, ack):
            self.snd_wnd = window  # a duplicate or stale ACK still updates the window
            return
        acked = (ack - self.snd_una) & 0xFFFFFFFF
        if self.state == "SYN_RCVD":
            self.state = "ESTABLISHED"
            acked -= 1  # our SYN
        if self.fin_sent and ack == self.snd_nxt:
            acked -= 1  # our FIN
            del self.sendbuf[:acked]
            self.snd_una = ack
            self._close()
            return
        del self.sendbuf[:acked]
        self.snd_una = ack
        self.snd_wnd = window
        self._tries = 0
        self._disarm()
        if self.snd_una != self.snd_nxt:
            self._arm()

    def _data(self, seq: int, data: bytes, fin: bool) -> bool:
        """Accept in-order data (and a FIN after it); True when an ACK is due."""
        offset = (self.rcv_nxt - seq) & 0xFFFFFFFF
        if data and offset < len(data):
            data = data[offset:]
            self.rcv_nxt = (self.rcv_nxt + len(data)) & 0xFFFFFFFF
            self.received += len(data)
            if self.lport == ECHO_PORT:
                self.sendbuf += data
            fresh_fin = fin
        else:
            fresh_fin = fin and offset == len(data)
        if fresh_fin and self.state in ("SYN_RCVD", "ESTABLISHED"):
            self.rcv_nxt = (self.rcv_nxt + 1) & 0xFFFFFFFF
            self.state = "CLOSE_WAIT"
            self.fin_wanted = True  # echo what is left, then close
            log.info("netpeer: TCP port %d: %d bytes received, closing", self.lport,
                     self.received)
        return bool(data) or fin

    # -- output ---------------------------------------------------------------
    def _push(self) -> bool:
        """Send what the window allows (then our FIN); True if anything went out."""
        sent = False
        while True:
            in_flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
            unsent = len(self.sendbuf) - in_flight
            room = self.snd_wnd - in_flight
            if unsent <= 0 or room <= 0:
                break
            n = min(self.mss, room, unsent)
            self._emit(self.snd_nxt, TCP_ACK | TCP_PSH,
                       bytes(self.sendbuf[in_flight:in_flight + n]))
            self.snd_nxt = (self.snd_nxt + n) & 0xFFFFFFFF
            sent = True
        in_flight = (self.snd_nxt - self.snd_una) & 0xFFFFFFFF
        if self.fin_wanted and not self.fin_sent and in_flight == len(self.sendbuf):
            self._emit(self.snd_nxt, TCP_FIN | TCP_ACK)
            self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
            self.fin_sent = True
            self.state = "LAST_ACK"
            sent = True
        if sent:
            self._arm()
        elif self._adv_window < self.mss <= self._window():
            self._emit(self.snd_nxt, TCP_ACK)  # our window opened again: say so
            sent = True
        return sent

    # -- retransmission -------------------------------------------------------
    def _arm(self) -> None:
        if self._timer is not None:
            return
        scope = self._timer = trio.CancelScope()
        rto = min(RTO_INITIAL * 2 ** self._tries, RTO_MAX)

        async def expire() -> None:
            with scope:
                await trio.sleep(rto)
                self._timer = None
                self._timeout()

        self.peer.spawn(expire, "netpeer-tcp-rto")

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timeout(self) -> None:
        """Go back to the first unacknowledged byte and send again (or give up)."""
        self._tries += 1
        if self._tries > RTO_TRIES:
            log.warning("netpeer: TCP port %d: no answer after %d tries, aborting",
                        self.lport, RTO_TRIES)
            self.abort()
            return
        if self.state == "SYN_RCVD":
            self.snd_nxt = self.iss
            self._send_syn_ack()
            return
        self.snd_nxt = self.snd_una
        if self.fin_sent:
            self.fin_sent = False
        if self.snd_wnd == 0 and self.sendbuf:  # a zero-window probe
            self._emit(self.snd_nxt, TCP_ACK, bytes(self.sendbuf[:1]))
            self.snd_nxt = (self.snd_nxt + 1) & 0xFFFFFFFF
            self._arm()
            return
        self._push()

    def abort(self) -> None:
        self._disarm()
        self._close()

    def _close(self) -> None:
        self._disarm()
        self.state = "CLOSED"
        self.peer.tcp.pop((self.remote, self.rport, self.lport), None)
