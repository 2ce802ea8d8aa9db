"""Ctrl-C and SIGTERM in a run: one way for every mode to stop and keep what finished.

A run (the kselftest, the NTB suites, a pair, a matrix, ``--exec``, a soak) may be stopped
by its user (Ctrl-C, SIGINT) or by a CI job's timeout (SIGTERM) at any moment: inside a boot
(the event loop), between two phases, or while results are written.  Both signals become
:class:`Interrupted`, raised in the main thread; an event loop running a boot turns the
signal into a cancellation first, so QEMU and the server are torn down before it is raised
(:func:`vfio_ep.guest.children.run_async`).  Each mode catches it where it knows what
finished (:func:`keeping`), writes that, prints its run directory and lets it go on; the
command (:func:`exit_on_interrupt`) exits with 128 + the signal's number (130, 143), as a
shell reports a process a signal ended.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator
from types import FrameType

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run.  A KeyboardInterrupt, so code that lets Ctrl-C
    through lets SIGTERM through as well."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def status(self) -> int:
        """The exit status a shell gives a process this signal ended: 130, 143."""
        return 128 + self.signum


def _raise(signum: int, _frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def keeping(keep: Callable[[Interrupted], None]) -> Iterator[None]:
    """When the block is interrupted, ``keep`` writes what finished and prints where it is;
    the interruption goes on to the command line."""
    try:
        yield
    except Interrupted as e:
        keep(e)
        raise


@contextlib.contextmanager
def exit_on_interrupt() -> Iterator[None]:
    """A command's body: SIGINT and SIGTERM raise :class:`Interrupted` in it (SIGTERM's
    default would end the process with no results and no teardown), and end the process
    with the status a shell gives a process that signal ended."""
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    except Interrupted as e:
        raise SystemExit(e.status) from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
