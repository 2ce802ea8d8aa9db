"""Which NTB client the EP side runs on an NTB function, as a Linux EP would load one.

``ntb_client = "netdev"`` is ntb_transport with ntb_netdev (the seeds' setup: the RC pings
the EP over ntb_netdev), ``"pingpong"`` is ntb_pingpong, ``"tool"`` is ntb_tool with a
person at the EP answering every doorbell (:mod:`vfio_ep.ntb.tool`), ``"none"`` binds
nothing.  ``netdev`` picks what the EP's network interface is connected to: ``builtin``,
a small network peer answering ARP, ICMP echo and UDP/TCP echo at ``netdev_address``, or
``tap:NAME``, a host TAP device (CAP_NET_ADMIN).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from vfio_ep.config import U32
from vfio_ep.ntb.core import NtbClient

CLIENT_NAMES = ("netdev", "pingpong", "tool", "none")
TAP_PREFIX = "tap:"


@dataclass(frozen=True)
class NtbClientAttributes:
    """The EP-side client of an NTB function and its settings."""

    ntb_client: str = "netdev"
    netdev: str = "builtin"
    netdev_address: str = "10.0.0.11/24"
    pingpong_delay_ms: U32 = 1000  # ntb_pingpong's delay_ms (a uint module parameter)

    def __post_init__(self) -> None:
        if self.ntb_client not in CLIENT_NAMES:
            raise ValueError(f"ntb_client must be one of {', '.join(CLIENT_NAMES)}")
        if self.netdev != "builtin" and not (self.netdev.startswith(TAP_PREFIX)
                                             and len(self.netdev) > len(TAP_PREFIX)):
            raise ValueError(f"netdev {self.netdev!r}: builtin or tap:NAME")
        try:
            ipaddress.IPv4Interface(self.netdev_address)
        except ValueError as e:
            raise ValueError(f"netdev_address: {e}") from None


def create_client(a: NtbClientAttributes) -> NtbClient:
    """The client ``a.ntb_client`` names, configured."""
    if a.ntb_client == "pingpong":
        from vfio_ep.ntb.pingpong import PingPong

        return PingPong(a.pingpong_delay_ms / 1000)
    if a.ntb_client == "tool":
        from vfio_ep.ntb.tool import ToolResponder

        return ToolResponder()
    from vfio_ep.ntb.netdev import NetdevClient

    return NetdevClient(a.netdev, ipaddress.IPv4Interface(a.netdev_address))
