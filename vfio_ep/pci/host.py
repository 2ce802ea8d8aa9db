"""What the device model needs from whoever plays the root complex: its memory and its IRQs.

The PCI device, the endpoint controller behind it and the functions reach RC memory and raise
interrupts through these interfaces; the vfio-user connection implements them (its DMA table
and IRQ eventfds), so nothing below the transport imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from vfio_ep.pci.regions import Irq


class RcBusError(Exception):
    """An access to RC memory that nothing answers: unmapped, or no RC attached (on PCIe, a
    completion with Unsupported Request)."""


class RcMemory(Protocol):
    """RC (guest) memory by bus address; both calls raise RcBusError where nothing is mapped.

    Async, because a range without shared memory is reached with messages to the client.
    ``on_change`` hooks run after the client maps or unmaps memory: views taken before are
    stale from then on."""

    on_change: list[Callable[[], None]]

    async def read(self, addr: int, size: int) -> bytes: ...

    async def write(self, addr: int, data: bytes | memoryview) -> None: ...

    def view(self, addr: int, size: int) -> memoryview:
        """Zero-copy access where the range is shared memory (RcBusError otherwise)."""
        ...

    def views(self, addr: int, size: int) -> list[memoryview] | None:
        """Zero-copy access, one view per shared mapping the range crosses; None where part
        of it is reached only by messages; RcBusError where part of it is unmapped."""
        ...


class Interrupts(Protocol):
    """Interrupt delivery to the RC: INTx level, MSI/MSI-X vectors by VFIO IRQ index."""

    def set_intx(self, level: bool) -> None: ...

    def set_intx_disabled(self, disabled: bool) -> None: ...

    def trigger(self, irq: Irq, vector: int) -> bool:
        """Signal one MSI/MSI-X vector; False where the RC has not assigned it."""
        ...


class Host(Protocol):
    """The attached client: its memory and its interrupts (work runs on the EP's CPU).

    Read-only to the device: the transport owns both (and its own, richer types of them)."""

    @property
    def dma(self) -> RcMemory: ...

    @property
    def irqs(self) -> Interrupts: ...
