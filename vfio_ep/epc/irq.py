"""EP-side interrupts: virqs, request_irq/free_irq, and handlers run as trio tasks.

Platform blocks (eDMA, MSI controller, doorbells) raise a virq with
:meth:`IrqDomain.handle`; the actions requested on it run in order in a task.  A
doorbell's waiter, a task itself, raises with :meth:`IrqDomain.handle_now`: plain-function
handlers run right there.  Semantics follow kernel/irq: sharing needs IRQF_SHARED on every
action and agreeing IRQF_ONESHOT, a threaded request without a primary handler needs
IRQF_ONESHOT, a line does not nest (a raise while its handlers run is replayed once
afterwards), and a raise nobody claims is counted as spurious.
"""

from __future__ import annotations

import errno
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol

from vfio_ep.errors import ErrnoError

log = logging.getLogger(__name__)

IRQF_SHARED = 0x00000080
IRQF_ONESHOT = 0x00002000
IRQ_NONE = 0
IRQ_HANDLED = 1

IrqHandler = Callable[[int, Any], int | Awaitable[int]]
class Cancellable(Protocol):
    """Work on the EP's CPU that can be cancelled (cancel_work_sync)."""

    def cancel(self) -> None: ...


Spawn = Callable[[Callable[[], Awaitable[None]], str], Cancellable]


class IrqError(ErrnoError):
    """request_irq() refused."""


@dataclass
class IrqAction:
    handler: IrqHandler
    flags: int
    name: str
    dev_id: Any


@dataclass
class IrqDesc:
    virq: int
    chip: str
    ack: Callable[[], None] | None = None  # irq_chip.irq_ack: called before the handlers
    actions: list[IrqAction] = field(default_factory=list)
    running: bool = False
    pending: bool = False
    count: int = 0
    spurious: int = 0


class IrqDomain:
    """The EP's interrupt controller as functions see it: virq numbers and actions."""

    def __init__(self, spawn: Spawn) -> None:
        self._spawn = spawn
        self.descs: dict[int, IrqDesc] = {}
        self._next = 32  # like Linux: low numbers are legacy, start above them

    def alloc(self, chip: str, ack: Callable[[], None] | None = None) -> int:
        virq = self._next
        self._next += 1
        self.descs[virq] = IrqDesc(virq, chip, ack)
        return virq

    def dispose(self, virq: int) -> None:
        desc = self.descs.pop(virq, None)
        if desc and desc.actions:
            log.warning("virq %d (%s) disposed with %d actions still requested", virq,
                        desc.chip, len(desc.actions))

    def request_irq(self, virq: int, handler: IrqHandler, flags: int, name: str,
                    dev_id: Any) -> None:
        """request_irq()/request_threaded_irq(NULL, fn): both run ``handler`` in a task."""
        desc = self.descs.get(virq)
        if desc is None:
            raise IrqError(errno.EINVAL, f"virq {virq} does not exist")
        if flags & IRQF_SHARED and dev_id is None:
            raise IrqError(errno.EINVAL, f"{name}: shared IRQ needs a dev_id")
        if desc.actions:
            first = desc.actions[0]
            if not (flags & first.flags & IRQF_SHARED):
                raise IrqError(errno.EBUSY, f"{name}: virq {virq} already requested by "
                               f"{first.name} and not shared by both")
            if (flags ^ first.flags) & IRQF_ONESHOT:
                raise IrqError(errno.EBUSY, f"{name}: IRQF_ONESHOT mismatch with {first.name}"
                               f" on virq {virq}")
        desc.actions.append(IrqAction(handler, flags, name, dev_id))

    def free_irq(self, virq: int, dev_id: Any) -> None:
        desc = self.descs.get(virq)
        if desc is None:
            log.warning("free_irq of unknown virq %d", virq)
            return
        for a in desc.actions:
            if a.dev_id is dev_id:
                desc.actions.remove(a)
                return
        log.warning("free_irq: virq %d has no action for %r", virq, dev_id)

    def handle(self, virq: int) -> None:
        """generic_handle_irq(): the hardware raised ``virq``."""
        desc = self.descs.get(virq)
        if desc is None:
            log.warning("interrupt on unknown virq %d", virq)
            return
        desc.count += 1
        if desc.running:
            desc.pending = True
            return
        desc.running = True
        self._spawn(lambda: self._run(desc), f"irq-{virq}-{desc.chip}")

    def handle_now(self, virq: int) -> None:
        """generic_handle_irq() from a task at a clean point (a doorbell's waiter, the eDMA
        engine done with a transfer): when
        every action is a plain function (a hard-IRQ handler), they run right here, as the
        kernel runs them in the interrupt, without the task a raise otherwise starts (the
        doorbell -> handler -> host interrupt path is that much shorter); otherwise as
        :meth:`handle`.  A handler's exception is logged, never raised into the caller."""
        desc = self.descs.get(virq)
        if desc is None or desc.running or any(
                inspect.iscoroutinefunction(a.handler) for a in desc.actions):
            self.handle(virq)
            return
        desc.count += 1
        desc.running = True
        try:
            while True:
                desc.pending = False
                if desc.ack:
                    desc.ack()
                results = [a.handler(desc.virq, a.dev_id) for a in list(desc.actions)]
                if any(inspect.isawaitable(r) for r in results):  # not plain after all
                    self._spawn(partial(self._run, desc, results), f"irq-{virq}-{desc.chip}")
                    return  # the task finishes this round, and owns `running`
                self._account(desc, results)
                if not desc.pending:
                    break
        except Exception:
            log.exception("virq %d (%s): handler failed", virq, desc.chip)
        desc.running = False

    async def _run(self, desc: IrqDesc, first: list[Any] | None = None) -> None:
        """The actions of ``desc`` in a task, again while raised meanwhile; ``first``: the
        results of a round already started (awaited here)."""
        try:
            while True:
                if first is None:  # each action in turn, awaited before the next
                    desc.pending = False
                    if desc.ack:
                        desc.ack()
                    results = []
                    for action in list(desc.actions):
                        result = action.handler(desc.virq, action.dev_id)
                        results.append(await result if inspect.isawaitable(result)
                                       else result)
                else:
                    results = [await r if inspect.isawaitable(r) else r for r in first]
                    first = None
                self._account(desc, results)
                if not desc.pending:
                    return
        finally:
            desc.running = False

    @staticmethod
    def _account(desc: IrqDesc, results: list[Any]) -> None:
        """A raise no action claimed is spurious."""
        if IRQ_HANDLED not in results:
            desc.spurious += 1
            log.info("virq %d (%s): nobody cared", desc.virq, desc.chip)

