"""Interrupts towards the guest: the eventfds QEMU hands over with SET_IRQS.

Raising a vector means writing its eventfd.  MSI and MSI-X vectors are edge
events: QEMU emulates masking and the PBA, so a vector whose fd is not
assigned (yet) is only counted as lost-while-unassigned and logged.  INTx is
a level line, auto-masked when signalled and unmasked by QEMU (UNMASK
message, or the KVM resample eventfd) after the guest's EOI.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from vfio_ep.pci.host import Interrupts
from vfio_ep.vfio_user.protocol import (
    IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD,
    IRQ_INFO_MASKABLE,
    IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_MASK_ALL,
    IRQ_SET_ACTION_TRIGGER,
    IRQ_SET_ACTION_UNMASK,
    IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_MASK,
    IRQ_SET_DATA_NONE,
    Irq,
    ProtocolError,
)

log = logging.getLogger(__name__)


@dataclass
class IntxLine:
    """Level-triggered INTx with QEMU's auto-mask protocol."""

    asserted: bool = False
    masked: bool = False
    disabled: bool = False  # COMMAND.INTX_DISABLE
    resample_fd: int | None = None


@dataclass
class IrqSet(Interrupts):
    """The eventfds of one connection, by IRQ index and vector: the RC's interrupts as the
    device model raises them."""

    counts: dict[Irq, int]
    fds: dict[Irq, dict[int, int]] = field(default_factory=lambda: {i: {} for i in Irq})
    intx: IntxLine = field(default_factory=IntxLine)
    lost: int = 0
    coalesced: int = 0

    def info(self, index: int) -> tuple[int, int]:
        """(flags, count) for GET_IRQ_INFO; no NORESIZE, so QEMU adds MSI-X vectors singly."""
        if not 0 <= index < len(Irq):
            raise ProtocolError(errno.EINVAL, f"IRQ index {index} out of range")
        flags = IRQ_INFO_EVENTFD
        if index == Irq.INTX:
            flags |= IRQ_INFO_MASKABLE | IRQ_INFO_AUTOMASKED
        return flags, self.counts.get(Irq(index), 0)

    def set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int]) -> None:
        """Apply one SET_IRQS request; takes ownership of ``fds``."""
        try:
            self._set_irqs(flags, index, start, count, fds)
        except ProtocolError:
            _close_all(fds)
            raise

    def _set_irqs(self, flags: int, index: int, start: int, count: int, fds: list[int]) -> None:
        if not 0 <= index < len(Irq):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS index {index} out of range")
        irq = Irq(index)
        data = flags & IRQ_SET_DATA_MASK
        action = flags & IRQ_SET_ACTION_MASK_ALL
        if data not in (IRQ_SET_DATA_NONE, IRQ_SET_DATA_EVENTFD) or action not in (
            IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_UNMASK, IRQ_SET_ACTION_TRIGGER
        ):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS flags {flags:#x} not supported")
        limit = self.counts.get(irq, 0)
        if start + count > limit and not (data == IRQ_SET_DATA_NONE and count == 0):
            raise ProtocolError(
                errno.EINVAL, f"SET_IRQS {irq.name} vectors {start}+{count} beyond {limit}"
            )
        if fds and (data != IRQ_SET_DATA_EVENTFD or len(fds) != count):
            raise ProtocolError(errno.EINVAL, f"SET_IRQS carries {len(fds)} fds for {count}")

        if action == IRQ_SET_ACTION_TRIGGER:
            if data == IRQ_SET_DATA_NONE and count == 0:
                self.disable(irq)
            elif data == IRQ_SET_DATA_NONE:
                for v in range(start, start + count):
                    self.trigger(irq, v)
            else:
                for i, v in enumerate(range(start, start + count)):
                    self._assign(irq, v, fds[i] if fds else None)
        elif irq != Irq.INTX:
            raise ProtocolError(errno.EINVAL, f"mask/unmask of {irq.name} is QEMU's job")
        elif action == IRQ_SET_ACTION_MASK:
            self.intx.masked = True
        elif data == IRQ_SET_DATA_EVENTFD:
            self._set_resample_fd(fds[0] if fds else None)
        else:
            self.unmask_intx()

    def _assign(self, irq: Irq, vector: int, fd: int | None) -> None:
        if fd is not None:
            _check_eventfd(fd)
        old = self.fds[irq].pop(vector, None)
        if old is not None:
            os.close(old)
        if fd is not None:
            self.fds[irq][vector] = fd

    def _set_resample_fd(self, fd: int | None) -> None:
        if fd is not None:
            _check_eventfd(fd)
        if self.intx.resample_fd is not None:
            os.close(self.intx.resample_fd)
        self.intx.resample_fd = fd

    def disable(self, irq: Irq) -> None:
        for fd in self.fds[irq].values():
            os.close(fd)
        self.fds[irq].clear()
        if irq == Irq.INTX:
            # QEMU never de-assigns the resample fd: drop it with the line.
            self._set_resample_fd(None)
            self.intx.masked = False

    def close(self) -> None:
        for irq in Irq:
            self.disable(irq)

    def trigger(self, irq: Irq, vector: int) -> bool:
        """Signal one vector; False (and logged) when the guest has not assigned it."""
        fd = self.fds[irq].get(vector)
        if fd is None:
            self.lost += 1
            log.info("%s vector %d raised but not assigned by the guest", irq.name, vector)
            return False
        try:
            os.eventfd_write(fd, 1)
        except BlockingIOError:  # the counter is at its maximum: still signalled
            self.coalesced += 1
            log.warning("%s vector %d: the client's eventfd is full (never read); the "
                        "interrupt is coalesced", irq.name, vector)
        return True

    # INTx is a level: signal on assert when unmasked, re-signal on unmask while asserted.
    def set_intx(self, level: bool) -> None:
        self.intx.asserted = level
        self._update_intx()

    def unmask_intx(self) -> None:
        self.intx.masked = False
        self._update_intx()

    def set_intx_disabled(self, disabled: bool) -> None:
        self.intx.disabled = disabled
        self._update_intx()

    def _update_intx(self) -> None:
        line = self.intx
        if line.asserted and not line.masked and not line.disabled and self.trigger(Irq.INTX, 0):
            line.masked = True


def _check_eventfd(fd: int) -> None:
    """An IRQ fd must be an eventfd, made non-blocking: a write to a full counter (or to a
    pipe nobody reads) must not stop the server."""
    try:
        kind = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise ProtocolError(errno.EBADF, f"SET_IRQS fd {fd}: {e.strerror}") from None
    if kind != "anon_inode:[eventfd]":
        raise ProtocolError(errno.EINVAL, f"SET_IRQS fd is not an eventfd ({kind})")
    os.set_blocking(fd, False)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
