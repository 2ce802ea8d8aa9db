"""probe: ``vfio-ep serve`` with the stages of a posted write and of a command measured, for
the breakdowns under the dispatch and transfer rows (``python -m vfio_ep.bench.probe`` takes
``vfio-ep``'s arguments; :func:`vfio_ep.bench.common.serve` starts it with ``probe=True``).

The stages are the server's own functions, wrapped here before it starts: the server carries
no instrumentation of its own, so there is nothing to cost or to switch off when it is not
benchmarked.  A probed function that is renamed fails :func:`install` (the benchmarks' smoke
tests run it).  Two kinds of probes:

- timers (:data:`TIMED`): the calls of a function and the CPU time of the thread inside them,
  summed.  Each call costs ~1.2 us of clock reads (CLOCK_THREAD_CPUTIME_ID is a system call
  here), so only functions called once for a batch of posted writes are timed;
- stamps (:data:`STAMPED`): when each stage of a command began, on CLOCK_MONOTONIC as the
  client's stamps (``time.monotonic_ns``): the first call of each function since the previous
  command's MSI-X.  A command's stamps are complete at its MSI-X (``IrqSet.trigger``, stamped
  on entry, so before the client can see the interrupt).  ~0.1 us a stamp.

SIGUSR1 writes the timers and the commands completed since the previous SIGUSR1 to the file
named by $VFIO_EP_PROBE (JSON, replaced whole): :func:`take`.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from vfio_ep.bench.common import PROBE_ENV, BenchError, Server
from vfio_ep.cli import main as vfio_ep
from vfio_ep.epf.functions.pci_epf_test import PciEpfTest
from vfio_ep.vfio_user.fastpath import FastPath
from vfio_ep.vfio_user.irq import IrqSet
from vfio_ep.vfio_user.server import Connection

TAKE_TIMEOUT = 10.0  # seconds for the server to answer SIGUSR1

# Timed: the posted writes' way through the event loop, per batch.
TIMED: dict[str, tuple[type, str]] = {
    "applied": (Connection, "_apply_posted"),  # the whole batch, its copy included
    "copied": (FastPath, "posted"),  # the queue copied out of the I/O thread's struct
}
# Stamped: a command's way from the event loop to its interrupt (pci-epf-test's).
STAMPED: dict[str, tuple[type, str]] = {
    "applied": (Connection, "_apply_posted"),  # the event loop woke to the COMMAND write
    "handler": (PciEpfTest, "_handle_one"),  # the watch's callback started it; it runs
    "raise": (PciEpfTest, "_raise_irq"),  # the function's work is done
    "msix": (IrqSet, "trigger"),  # the MSI-X's eventfd is written (the command's end)
}
END = "msix"


@dataclass
class Recording:
    """What the probed server measured: each timer's calls and CPU ns since it started (the
    caller subtracts two takes: a dump that lands inside a timer's update loses nothing),
    and the commands completed since the previous take, each as stage -> monotonic ns."""

    timers: dict[str, tuple[int, int]] = field(default_factory=dict)
    commands: list[dict[str, int]] = field(default_factory=list)

    def since(self, before: Recording) -> dict[str, tuple[int, int]]:
        """Each timer's calls and CPU ns between ``before`` and this take."""
        return {name: (calls - before.timers.get(name, (0, 0))[0],
                       ns - before.timers.get(name, (0, 0))[1])
                for name, (calls, ns) in self.timers.items()}


class _Probes:
    """The recording in the server, filled by the wrappers."""

    def __init__(self) -> None:
        self.timers: dict[str, list[int]] = {}  # name -> [calls, CPU ns]
        self.commands: list[dict[str, int]] = []
        self._stamps: dict[str, int] = {}

    def timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.thread_time_ns
        total = self.timers.setdefault(name, [0, 0])

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += 1
                total[1] += clock() - start

        return wrapper

    def stamped(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def stamp() -> None:
            self._stamps.setdefault(name, time.monotonic_ns())
            if name == END:
                self.commands.append(self._stamps)
                self._stamps = {}

        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def awaited(*args: Any, **kwargs: Any) -> Any:
                stamp()
                return await fn(*args, **kwargs)

            return awaited

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            stamp()
            return fn(*args, **kwargs)

        return wrapper

    def dump(self, path: Path) -> None:
        """Write the timers and the commands completed since the last dump (to a new file
        renamed over ``path``)."""
        commands, self.commands = self.commands, []
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps({"timers": self.timers, "commands": commands}))
        tmp.rename(path)


def install() -> _Probes:
    """Wrap the probed functions (each stamped one inside its timer, where both)."""
    probes = _Probes()
    for kind, points in ((probes.stamped, STAMPED), (probes.timed, TIMED)):
        for name, (owner, attr) in points.items():
            fn = getattr(owner, attr)  # AttributeError: a probed function was renamed
            setattr(owner, attr, kind(name, fn))
    return probes


def take(server: Server) -> Recording:
    """What ``server`` (started with ``probe=True``) has measured (see :class:`Recording`)."""
    if server.probe is None:
        raise BenchError("the server was not started with probe=True")
    server.probe.unlink(missing_ok=True)
    os.kill(server.pid, signal.SIGUSR1)
    deadline = time.monotonic() + TAKE_TIMEOUT
    while not server.probe.exists():
        if time.monotonic() > deadline or server.proc.poll() is not None:
            raise BenchError(f"the probed server wrote no {server.probe}:\n{server.log_tail()}")
        time.sleep(0.005)
    data = json.loads(server.probe.read_text())
    return Recording({k: (calls, ns) for k, (calls, ns) in data["timers"].items()},
                     data["commands"])


def main() -> None:
    """``vfio-ep`` (its arguments from the command line) with the probes installed."""
    probes = install()
    path = Path(os.environ[PROBE_ENV])

    def on_signal(signum: int, frame: FrameType | None) -> None:
        probes.dump(path)

    signal.signal(signal.SIGUSR1, on_signal)
    vfio_ep(prog_name="vfio-ep")


if __name__ == "__main__":
    main()
