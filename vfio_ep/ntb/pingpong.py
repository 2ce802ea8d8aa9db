"""ntb_pingpong (drivers/ntb/test/ntb_pingpong.c) on the EP side.

On link up each side pings after ``delay``: its count into the peer's scratchpad 0, then
doorbell bit 0 (the peer's port number).  Every doorbell is a pong: count it, clear it and
ping again after ``delay``.  With both ends running it, each end's debugfs ``count`` grows.
"""

from __future__ import annotations

import logging

from vfio_ep.epc.soc import DelayedWork
from vfio_ep.ntb.core import NTB_DEF_PEER_IDX, NtbClient, NtbCtxOps, NtbDev

log = logging.getLogger(__name__)

PEER_PORT = 0  # two-port NTB: both ports are 0, so in_db = out_db = BIT(0)
IN_DB = OUT_DB = 1 << PEER_PORT


class PingPong(NtbClient, NtbCtxOps):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.count = 0
        self.ntb: NtbDev | None = None
        self._timer: DelayedWork | None = None  # pp->timer, made at probe

    # -- NtbClient ------------------------------------------------------------
    def probe(self, ntb: NtbDev) -> None:
        """pp_probe(): needs doorbell bit 0..1 and a scratchpad."""
        if ntb.db_valid_mask() & 0x3 != 0x3 or ntb.spad_count() < 1:
            raise ValueError(f"{ntb.name}: ntb_pingpong needs doorbells 0-1 and a scratchpad "
                             f"(db_valid_mask {ntb.db_valid_mask():#x}, "
                             f"{ntb.spad_count()} spads)")
        self.ntb = ntb
        self._timer = DelayedWork(ntb.spawn, self._ping, f"{ntb.name}-pingpong")
        ntb.set_ctx(self)
        ntb.link_enable()
        ntb.link_event()

    def remove(self, ntb: NtbDev) -> None:
        assert self._timer is not None
        self._timer.cancel()
        ntb.clear_ctx()
        ntb.link_disable()

    # -- NtbCtxOps --------------------------------------------------------------
    def link_event(self) -> None:
        """pp_setup(): (re)arm the ping timer while the link is up."""
        assert self.ntb is not None and self._timer is not None
        if self.ntb.link_is_up():
            self._timer.schedule(self.delay)
        else:
            self._timer.cancel()
            log.info("%s: ping-pong cancelled (link down)", self.ntb.name)

    def db_event(self, vector: int) -> None:
        """pp_pong()."""
        assert self.ntb is not None
        spad = self.ntb.spad_read(0)
        self.count += 1
        log.debug("%s: pong %d (spad %#x)", self.ntb.name, self.count, spad)
        self.ntb.db_clear(IN_DB)
        assert self._timer is not None
        self._timer.schedule(self.delay)

    def _ping(self) -> None:
        """pp_ping()."""
        assert self.ntb is not None
        self.ntb.peer_spad_write(NTB_DEF_PEER_IDX, 0, self.count)
        self.ntb.peer_db_set(OUT_DB)
