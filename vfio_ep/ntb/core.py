"""``struct ntb_dev`` and ``ntb_dev_ops`` (include/linux/ntb.h), for the EP side.

A hardware driver subclasses :class:`NtbDev` and implements the operations; a client
(:class:`NtbClient`) probes the device, installs its context with :meth:`NtbDev.set_ctx`
and from then on gets ``link_event()`` and ``db_event(vector)``.  The operations keep the
kernel's names and meanings (0-based doorbell bits and vectors, spad indices, memory
window indices), with one peer (``pidx`` 0) as every two-port NTB has.

Memory is what the EP's CPU can reach: buffers a client allocates for its inbound memory
windows live in EP RAM (``dma_alloc``/``mem_read``/``mem_write``; ``get_dma_dev`` in the
kernel), and a peer memory window is an EP address range (``peer_mw_get_addr``) reached
with ``io_read``/``io_write``, which may wait for the RC: hence async.
"""

from __future__ import annotations

import abc
import logging
from typing import Protocol

from vfio_ep.epc.irq import Spawn

log = logging.getLogger(__name__)

NTB_DEF_PEER_IDX = 0
SZ_4K = 0x1000


class NtbIoError(OSError):
    """A peer memory window access that reached nothing (unmapped, or no RC attached)."""


class NtbCtxOps(Protocol):
    """struct ntb_ctx_ops: what a client hears from the device."""

    def link_event(self) -> None: ...

    def db_event(self, vector: int) -> None: ...


class NtbClient(Protocol):
    """struct ntb_client: ``probe`` when bound (it may set a context), ``remove`` on unbind."""

    def probe(self, ntb: NtbDev) -> None: ...

    def remove(self, ntb: NtbDev) -> None: ...


class NtbDev(abc.ABC):
    """An NTB device: the ops a hardware driver implements, and the event plumbing."""

    def __init__(self, name: str, spawn: Spawn) -> None:
        self.name = name
        self.spawn = spawn  # a work queue: run an async job on the EP's CPU
        self.ctx: NtbCtxOps | None = None
        self.client: NtbClient | None = None

    # -- client binding and events (ntb/core.c) -------------------------------
    def register_client(self, client: NtbClient) -> None:
        """Bind ``client`` (ntb_register_client matching this device).  A probe that finds
        no EP RAM for its buffers (-ENOMEM), or a host interface it cannot attach, fails
        the configuration: a ValueError, what the user must change."""
        if self.client is not None:
            raise RuntimeError(f"{self.name}: already bound to {type(self.client).__name__}")
        self.client = client
        try:
            client.probe(self)
        except (MemoryError, OSError) as e:
            self.client = None
            why = (f"{e} (-ENOMEM; a larger ram_size, or smaller windows)"
                   if isinstance(e, MemoryError) else e.strerror)
            raise ValueError(f"{self.name}: {type(client).__name__} probe: {why}") from None

    def unregister_client(self) -> None:
        if self.client is not None:
            self.client.remove(self)
            self.client = None

    def set_ctx(self, ctx: NtbCtxOps) -> None:
        """ntb_set_ctx(): ValueError if a context is installed already (-EINVAL)."""
        if self.ctx is not None:
            raise ValueError(f"{self.name}: a context is installed already")
        self.ctx = ctx

    def clear_ctx(self) -> None:
        self.ctx = None

    def link_event(self) -> None:
        """ntb_link_event(): the driver saw the link change; the client re-reads it."""
        if self.ctx is not None:
            self.ctx.link_event()

    def db_event(self, vector: int) -> None:
        """ntb_db_event(): doorbell ``vector`` (0-based) fired."""
        if self.ctx is not None:
            self.ctx.db_event(vector)

    # -- ntb_dev_ops --------------------------------------------------------
    @abc.abstractmethod
    def mw_count(self, pidx: int = NTB_DEF_PEER_IDX) -> int:
        """Inbound memory windows."""

    @abc.abstractmethod
    def mw_get_align(self, pidx: int, idx: int) -> tuple[int, int, int]:
        """(address alignment, size alignment, maximum size) of inbound window ``idx``."""

    @abc.abstractmethod
    def mw_set_trans(self, pidx: int, idx: int, addr: int, size: int) -> None:
        """Point inbound window ``idx`` at local memory ``addr`` (EP address), ``size`` bytes.
        Raises OSError with the errno the hardware driver returns."""

    @abc.abstractmethod
    def mw_clear_trans(self, pidx: int, idx: int) -> None: ...

    @abc.abstractmethod
    def peer_mw_count(self) -> int: ...

    @abc.abstractmethod
    def peer_mw_get_addr(self, idx: int) -> tuple[int, int]:
        """(EP address, size) of outbound window ``idx``: writes there reach the peer."""

    @abc.abstractmethod
    def link_is_up(self) -> bool: ...

    @abc.abstractmethod
    def link_enable(self) -> None: ...

    @abc.abstractmethod
    def link_disable(self) -> None: ...

    @abc.abstractmethod
    def db_valid_mask(self) -> int: ...

    @abc.abstractmethod
    def db_vector_count(self) -> int: ...

    @abc.abstractmethod
    def db_vector_mask(self, vector: int) -> int: ...

    @abc.abstractmethod
    def db_read(self) -> int: ...

    @abc.abstractmethod
    def db_clear(self, bits: int) -> None: ...

    @abc.abstractmethod
    def peer_db_set(self, bits: int) -> None:
        """Ring the peer's doorbells ``bits`` (may be deferred, never blocks)."""

    @abc.abstractmethod
    def spad_count(self) -> int: ...

    @abc.abstractmethod
    def spad_read(self, idx: int) -> int: ...

    @abc.abstractmethod
    def spad_write(self, idx: int, value: int) -> None: ...

    @abc.abstractmethod
    def peer_spad_read(self, pidx: int, idx: int) -> int: ...

    @abc.abstractmethod
    def peer_spad_write(self, pidx: int, idx: int, value: int) -> None: ...

    # -- memory the EP's CPU reaches (get_dma_dev, ioremap of a peer window) ---
    @abc.abstractmethod
    def dma_alloc(self, size: int, align: int) -> int:
        """Zeroed local memory for an inbound window; its EP address (MemoryError)."""

    @abc.abstractmethod
    def dma_free(self, addr: int, size: int) -> None: ...

    @abc.abstractmethod
    def mem_read(self, addr: int, size: int) -> bytes: ...

    @abc.abstractmethod
    def mem_write(self, addr: int, data: bytes | memoryview) -> None: ...

    @abc.abstractmethod
    async def io_read(self, addr: int, size: int) -> bytes:
        """Read a peer window; NtbIoError where nothing is mapped."""

    @abc.abstractmethod
    async def io_write(self, addr: int, data: bytes | memoryview) -> None: ...
