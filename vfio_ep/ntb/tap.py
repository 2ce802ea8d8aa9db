"""A host TAP device as the EP's network: the host kernel's own stack is the peer.

``netdev = "tap:NAME"`` attaches to TAP interface NAME (created if missing, which needs
CAP_NET_ADMIN); frames from the guest are written to it and frames the host sends on it go
to the guest.  Configure the interface (address, up) yourself, best in a network namespace
of its own (``unshare -n``) so nothing reaches the machine's real network.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable

import trio

from vfio_ep.epc.irq import Spawn

log = logging.getLogger(__name__)

TUN_DEVICE = "/dev/net/tun"
TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
MAX_FRAME = 0x10000


class TapBackend:
    def __init__(self, name: str, send: Callable[[bytes], None],
                 spawn: Spawn) -> None:
        if len(name.encode()) >= IFNAMSIZ:
            raise ValueError(f"tap:{name}: interface names are at most {IFNAMSIZ - 1} bytes")
        self.name = name
        self.send = send
        self.fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(self.fd, TUNSETIFF, struct.pack("16sH", name.encode(),
                                                        IFF_TAP | IFF_NO_PI))
        except OSError as e:
            os.close(self.fd)
            raise OSError(e.errno, f"tap:{name}: cannot attach ({e.strerror}; creating a TAP "
                          "device needs CAP_NET_ADMIN)") from None
        self.dropped = 0
        self._scope = trio.CancelScope()
        spawn(self._reader, f"tap-{name}")
        log.info("ntb_netdev bridged to TAP device %s", name)

    def receive(self, frame: bytes) -> None:
        try:
            os.write(self.fd, frame)
        except OSError as e:  # the interface is down, or its queue full: a lost frame
            self.dropped += 1
            if e.errno not in (errno.EAGAIN, errno.EIO):
                log.warning("tap:%s: %s", self.name, e.strerror)

    async def _reader(self) -> None:
        with self._scope:
            while True:
                await trio.lowlevel.wait_readable(self.fd)
                try:
                    frame = os.read(self.fd, MAX_FRAME)
                except BlockingIOError:
                    continue
                self.send(frame)

    def close(self) -> None:
        self._scope.cancel()
        trio.lowlevel.notify_closing(self.fd)
        os.close(self.fd)
