"""The built-in network peer behind the EP's ntb_netdev, fed frames as a guest sends them.

Checksums are verified with an independent RFC 1071 sum; the guest tests run the real
stack (ping, nc) against it.
"""

from __future__ import annotations

import ipaddress
import os
import struct
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from vfio_ep.ntb import netpeer as n

GUEST_MAC = bytes.fromhex("aabbccddeeff")
GUEST_IP = bytes([10, 0, 0, 10])
PEER_IP = bytes([10, 0, 0, 11])
MTU = 65510


def rfc1071(data: bytes) -> int:
    """The textbook one's-complement sum, folded and complemented."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_packet(protocol: int, payload: bytes, src: bytes = GUEST_IP) -> bytes:
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, 0x4000, 64,
                                protocol, 0, src, PEER_IP))
    hdr[10:12] = rfc1071(bytes(hdr)).to_bytes(2, "big")
    return struct.pack("!6s6sH", n.PEER_MAC, GUEST_MAC, n.ETH_P_IP) + bytes(hdr) + payload


def parse_ip(frame: bytes) -> tuple[int, bytes]:
    assert frame[:6] == GUEST_MAC and frame[6:12] == n.PEER_MAC
    ip = frame[14:]
    assert rfc1071(ip[:20]) == 0, "bad IP header checksum"
    return ip[9], ip[20:struct.unpack("!H", ip[2:4])[0]]


class Wire:
    """A NetPeer and the frames it sends, with its timers on a trio nursery."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self.out: list[bytes] = []

        def spawn(fn: Callable[[], Awaitable[None]], name: str) -> None:
            nursery.start_soon(fn, name=name)

        self.peer = n.NetPeer(ipaddress.IPv4Interface("10.0.0.11/24"), self.out.append, spawn,
                              MTU)

    def take(self) -> list[bytes]:
        out = list(self.out)
        self.out.clear()
        return out


def test_arp_and_icmp_echo() -> None:
    w = Wire(None)  # type: ignore[arg-type]
    arp = struct.pack("!6s6sHHHBBH6s4s6s4s", b"\xff" * 6, GUEST_MAC, n.ETH_P_ARP, 1, 0x800, 6,
                      4, 1, GUEST_MAC, GUEST_IP, bytes(6), PEER_IP)
    w.peer.receive(arp)
    (reply,) = w.take()
    assert reply[:6] == GUEST_MAC and struct.unpack("!H", reply[20:22])[0] == 2
    assert reply[22:28] == n.PEER_MAC and reply[28:32] == PEER_IP
    icmp = bytearray(struct.pack("!BBHHH", 8, 0, 0, 0x1234, 7) + os.urandom(56))
    icmp[2:4] = rfc1071(bytes(icmp)).to_bytes(2, "big")
    w.peer.receive(ip_packet(n.IPPROTO_ICMP, bytes(icmp)))
    proto, echo = parse_ip(w.take()[0])
    assert proto == n.IPPROTO_ICMP and echo[0] == 0 and rfc1071(echo) == 0
    assert echo[4:] == icmp[4:]
    icmp[2] ^= 1  # a broken checksum is not answered
    w.peer.receive(ip_packet(n.IPPROTO_ICMP, bytes(icmp)))
    assert not w.take()


def test_udp_echo() -> None:
    w = Wire(None)  # type: ignore[arg-type]
    data = b"hello over ntb"
    udp = struct.pack("!HHHH", 40000, 7, 8 + len(data), 0) + data
    w.peer.receive(ip_packet(n.IPPROTO_UDP, udp))
    proto, echo = parse_ip(w.take()[0])
    pseudo = PEER_IP + GUEST_IP + bytes([0, n.IPPROTO_UDP]) + len(echo).to_bytes(2, "big")
    assert proto == n.IPPROTO_UDP and rfc1071(pseudo + echo) == 0
    assert struct.unpack("!HH", echo[:4]) == (7, 40000) and echo[8:] == data


class Guest:
    """A minimal TCP client: enough to open, send, read the echo, and close."""

    def __init__(self, wire: Wire, port: int) -> None:
        self.w = wire
        self.port = port
        self.seq = 1000
        self.ack = 0
        self.received = bytearray()
        self.fin = False

    def send(self, flags: int, data: bytes = b"", options: bytes = b"") -> None:
        hdr = struct.pack("!HHIIBBHHH", 50000, self.port, self.seq, self.ack,
                          (20 + len(options)) // 4 << 4, flags, 65535, 0, 0) + options
        length = (len(hdr) + len(data)).to_bytes(2, "big")
        pseudo = GUEST_IP + PEER_IP + bytes([0, n.IPPROTO_TCP]) + length
        seg = hdr[:16] + rfc1071(pseudo + hdr + data).to_bytes(2, "big") + hdr[18:] + data
        self.w.peer.receive(ip_packet(n.IPPROTO_TCP, seg))
        self.seq += len(data) + (1 if flags & (n.TCP_SYN | n.TCP_FIN) else 0)

    def read(self) -> list[tuple[int, int, bytes]]:
        """Segments the peer sent: (flags, window, data); in-order data is kept."""
        segs = []
        for frame in self.w.take():
            proto, seg = parse_ip(frame)
            pseudo = PEER_IP + GUEST_IP + bytes([0, proto]) + len(seg).to_bytes(2, "big")
            assert proto == n.IPPROTO_TCP and rfc1071(pseudo + seg) == 0, "bad TCP checksum"
            _, _, seq, _, doff, flags, window = struct.unpack("!HHIIBBH", seg[:16])
            data = seg[(doff >> 4) * 4:]
            if flags & n.TCP_SYN:
                self.ack = seq + 1
            elif seq == self.ack:
                self.received += data
                self.ack += len(data) + (1 if flags & n.TCP_FIN else 0)
                self.fin |= bool(flags & n.TCP_FIN)
            segs.append((flags, window, data))
        return segs


def test_tcp_echo_open_transfer_close() -> None:
    trio.run(_echo_open_transfer_close)


async def _echo_open_transfer_close() -> None:
    async with trio.open_nursery() as nursery:
        w = Wire(nursery)
        g = Guest(w, n.ECHO_PORT)
        g.send(n.TCP_SYN, options=bytes([2, 4]) + (1460).to_bytes(2, "big"))
        ((flags, _, _),) = g.read()
        assert flags == n.TCP_SYN | n.TCP_ACK
        g.send(n.TCP_ACK)
        data = os.urandom(200_000)
        for off in range(0, len(data), 8192):  # the peer's window is 64 KiB, ours too
            g.send(n.TCP_ACK | n.TCP_PSH, data[off:off + 8192])
            g.read()
            g.send(n.TCP_ACK)  # acknowledge what came back, opening room for more
            g.read()
        g.send(n.TCP_FIN | n.TCP_ACK)
        for _ in range(200):
            g.read()
            g.send(n.TCP_ACK)
            if g.fin:
                break
        assert g.fin and bytes(g.received) == data
        assert all(len(seg) <= 1460 for _, _, seg in g.read())
        await trio.testing.wait_all_tasks_blocked()
        assert not w.peer.tcp  # closed
        nursery.cancel_scope.cancel()


def test_tcp_retransmits_what_was_not_acknowledged() -> None:
    trio.run(_retransmits)


async def _retransmits() -> None:
    async with trio.open_nursery() as nursery:
        w = Wire(nursery)
        g = Guest(w, n.ECHO_PORT)
        g.send(n.TCP_SYN)
        g.read()
        g.send(n.TCP_ACK)
        g.send(n.TCP_ACK | n.TCP_PSH, b"lost once")
        first = [d for _, _, d in g.read() if d]
        g.ack -= len(b"lost once")  # pretend the echo never arrived
        g.received.clear()
        with trio.fail_after(2):
            while not g.received:
                await trio.sleep(0.05)
                g.read()
        assert first == [b"lost once"] and bytes(g.received) == b"lost once"
        nursery.cancel_scope.cancel()


def test_tcp_to_a_closed_port_is_reset() -> None:
    w = Wire(None)  # type: ignore[arg-type]
    g = Guest(w, 22)
    g.send(n.TCP_SYN)
    ((flags, _, _),) = g.read()
    assert flags & n.TCP_RST


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 13, b"\xff" * 14 + b"\x45",
                                     ip_packet(n.IPPROTO_TCP, b"\x00" * 5)])
def test_malformed_frames_are_dropped(garbage: bytes) -> None:
    w = Wire(None)  # type: ignore[arg-type]
    w.peer.receive(garbage)
    assert not w.take()
