"""The other side of a guest's ntb_tool: an EP that answers, so a script can check both ways.

ntb_tool exposes an NTB device's primitives in debugfs and expects a person on the other
side.  This client is that person, automated, so a guest script alone can verify every
primitive in both directions:

* at probe it sets up each inbound memory window with local memory of the window's full
  size (``mw_set_trans``), so the RC's ``peer_mwN`` writes land somewhere;
* on every doorbell it answers, in this order: each scratchpad the RC wrote as its peer
  scratchpad (the EP's own) comes back inverted in the RC's own scratchpad; each inbound
  window's contents are copied into the matching outbound window, i.e. into the buffer the
  RC gave with ``mw_transN`` (page by page, as far as the RC mapped it); then the same
  doorbell bits ring back.

Tests may also drive the device directly through the :class:`~vfio_ep.ntb.core.NtbDev`.
"""

from __future__ import annotations

import logging

from vfio_ep.ntb.core import NTB_DEF_PEER_IDX, SZ_4K, NtbClient, NtbCtxOps, NtbDev, NtbIoError

log = logging.getLogger(__name__)

SPAD_MASK = 0xFFFFFFFF


class ToolResponder(NtbClient, NtbCtxOps):
    def __init__(self) -> None:
        self.ntb: NtbDev | None = None
        self.inbound: list[tuple[int, int]] = []  # (EP address, size) per inbound window
        self.answered = 0
        self._busy = False
        self._pending = 0

    def probe(self, ntb: NtbDev) -> None:
        self.ntb = ntb
        for idx in range(ntb.mw_count()):
            _, _, size = ntb.mw_get_align(NTB_DEF_PEER_IDX, idx)
            addr = ntb.dma_alloc(size, SZ_4K)
            ntb.mw_set_trans(NTB_DEF_PEER_IDX, idx, addr, size)
            self.inbound.append((addr, size))
        ntb.set_ctx(self)

    def remove(self, ntb: NtbDev) -> None:
        ntb.clear_ctx()
        for idx, (addr, size) in enumerate(self.inbound):
            ntb.mw_clear_trans(NTB_DEF_PEER_IDX, idx)
            ntb.dma_free(addr, size)
        self.inbound = []

    def link_event(self) -> None:
        assert self.ntb is not None
        log.info("%s: ntb_tool peer: link %s", self.ntb.name,
                 "up" if self.ntb.link_is_up() else "down")

    def db_event(self, vector: int) -> None:
        assert self.ntb is not None
        self._pending |= self.ntb.db_vector_mask(vector)
        if not self._busy:
            self._busy = True
            self.ntb.spawn(self._answer, f"{self.ntb.name}-tool")

    async def _answer(self) -> None:
        ntb = self.ntb
        assert ntb is not None
        try:
            while self._pending:
                bits, self._pending = self._pending, 0
                ntb.db_clear(bits)
                for i in range(ntb.spad_count()):
                    ntb.peer_spad_write(NTB_DEF_PEER_IDX, i, ~ntb.spad_read(i) & SPAD_MASK)
                for idx, (addr, size) in enumerate(self.inbound):
                    await self._copy_to_peer(idx, addr, size)
                ntb.peer_db_set(bits)
                self.answered += 1
                log.info("%s: ntb_tool peer answered doorbell %#x", ntb.name, bits)
        finally:
            self._busy = False

    async def _copy_to_peer(self, idx: int, addr: int, size: int) -> None:
        """Inbound window ``idx`` into outbound window ``idx``, as far as the RC mapped it."""
        assert self.ntb is not None
        base, peer_size = self.ntb.peer_mw_get_addr(idx)
        for off in range(0, min(size, peer_size), SZ_4K):
            n = min(SZ_4K, size - off)
            try:
                await self.ntb.io_write(base + off, self.ntb.mem_read(addr + off, n))
            except NtbIoError:
                return
