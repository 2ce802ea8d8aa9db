"""A function's COMMAND register, trapped where the kernel polls it.

pci-epf-test, pci-epf-vntb and pci-epf-ntb each poll a COMMAND register from a work item
(every 1 or 5 ms); here a write watch on it starts the handler at once.  What the work item
gave the kernel stays: one command handled at a time, and a reset (PERST#) cancels the
command in flight (cancel_delayed_work_sync()), so a host that rebooted never waits on, nor
gets the status of, a command it sent before.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from vfio_ep.epc.irq import Cancellable, Spawn


class TrappedCommand:
    """Runs ``handle`` on the EP's CPU when the RC writes COMMAND (:meth:`written`, the
    watch's callback).  A write while a command runs is handled once more after it, as the
    kernel's next poll would see it; :meth:`reset` cancels the command and leaves the
    handler idle for the next write."""

    def __init__(self, spawn: Spawn, handle: Callable[[], Awaitable[None]], name: str) -> None:
        self._spawn = spawn
        self._handle = handle
        self._name = name
        self._work: Cancellable | None = None  # the command queued or running
        self._again = False

    @property
    def busy(self) -> bool:
        """A command is queued or running."""
        return self._work is not None

    def written(self, addr: int, size: int) -> None:
        """The RC wrote COMMAND."""
        if self._work is not None:
            self._again = True
            return
        self._work = self._spawn(self._run, self._name)

    async def _run(self) -> None:
        work = self._work
        try:
            while True:
                self._again = False
                await self._handle()
                if not self._again:
                    return
        finally:
            if self._work is work:  # not cancelled by a reset (which left the handler idle)
                self._work = None

    def reset(self) -> None:
        """PERST#: cancel_delayed_work_sync() of the command handler."""
        if self._work is not None:
            self._work.cancel()
            self._work = None
        self._again = False
