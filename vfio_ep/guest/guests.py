"""Several guests against one server: a pci-epf-ntb pair, ``--exec`` on each controller, a
host that comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from vfio_ep.guest.children import run_async
from vfio_ep.guest.launcher import GuestBoot, GuestResult, GuestRun
from vfio_ep.guest.provision import GuestAssets, provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.server import running_server

# (label, line): a guest boots once the guest so labelled has printed that line.
Cue = tuple[str, str]


@dataclass(frozen=True)
class GuestSpec:
    """One guest of several against one server: attached to ``controller``'s socket.  With
    ``after``, it boots once the guest labelled so has exited: the same host coming back.
    With ``cue``, once that guest has printed that line (or exited): two hosts whose drivers
    must not start at the same moment.  ``qemu_args`` go on its QEMU command line (a NIC,
    say)."""

    label: str
    controller: str
    script: str
    after: str | None = None
    qemu_args: tuple[str, ...] = ()
    cue: Cue | None = None


class Cues:
    """The boots of a run's guests, each once what it waits for has happened (``after``: a
    guest has exited; ``cue``, a :data:`Cue`: a guest has printed a line, or exited without
    it).  The guests' live output goes through :meth:`heard`."""

    def __init__(self, wanted: Iterable[Cue | None]) -> None:
        self._said = {cue: asyncio.Event() for cue in wanted if cue is not None}
        self._booting: dict[str, asyncio.Task[GuestResult]] = {}

    def heard(self, label: str, line: str) -> None:
        if (said := self._said.get((label, line))) is not None:
            said.set()

    def boot(self, label: str, run: GuestRun, timeout: float, *, after: str | None = None,
             cue: Cue | None = None) -> asyncio.Task[GuestResult]:
        """``run``'s boot as guest ``label``, once guest ``after`` has exited and ``cue``
        has come; either names a guest booted before this one."""
        before = self._booting[after] if after else None
        task = asyncio.create_task(self._boot(run, timeout, before, cue))
        self._booting[label] = task
        return task

    async def _boot(self, run: GuestRun, timeout: float,
                    before: asyncio.Task[GuestResult] | None, cue: Cue | None) -> GuestResult:
        if before is not None:
            await asyncio.wait([before])  # its failure is its own result
        if cue is not None:
            await self.wait(cue)
        return await run.run(timeout)

    async def wait(self, cue: Cue) -> None:
        """Until ``cue``'s guest has printed its line or has ended (its own result then
        says why it never did)."""
        said = asyncio.create_task(self._said[cue].wait())
        try:
            await asyncio.wait({said, self._booting[cue[0]]},
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            said.cancel()


def boot_guests(specs: Sequence[GuestSpec], *, server_args: list[str],
                assets: GuestAssets | None = None, timeout: float = 300, run_dir: Path,
                files: Mapping[str, Path | bytes] | None = None,
                live: Callable[[str, str], None] | None = None,
                options: GuestOptions = DEFAULT_OPTIONS) -> list[GuestResult]:
    """Start one ``vfio-ep serve`` with a socket per controller the specs name, boot every
    guest at once against it (run directory ``run_dir/<label>``; a guest with ``after`` or
    ``cue`` when that one has exited or printed the line; either names a guest before it),
    and return their results in order, each with the server's log and facts.  ``live`` gets
    (label, line) as each guest prints."""
    return run_async(_boot_guests(specs, server_args, assets or provision_all(), timeout,
                                  run_dir, files or {}, live, options))


async def _boot_guests(specs: Sequence[GuestSpec], server_args: list[str],
                       assets: GuestAssets, timeout: float, run_dir: Path,
                       files: Mapping[str, Path | bytes],
                       live: Callable[[str, str], None] | None,
                       options: GuestOptions) -> list[GuestResult]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    cues = Cues(s.cue for s in specs)
    async with running_server([s.controller for s in specs], server_args, log) as served:
        tasks = []
        for i, s in enumerate(specs):
            gdb_port = None if options.gdb_port is None else options.gdb_port + i
            run = GuestRun(GuestBoot(
                s.script, socket=served.sockets[s.controller], assets=assets,
                run_dir=run_dir / s.label, files=files, qemu_args=s.qemu_args,
                options=replace(options, gdb_port=gdb_port),
                live=partial(_heard, cues, s.label, live)))
            tasks.append(cues.boot(s.label, run, timeout, after=s.after, cue=s.cue))
        results = await asyncio.gather(*tasks)
    server_log = log.read_text(errors="replace")
    return [replace(r, server_log=server_log, facts=served.facts) for r in results]


def _heard(cues: Cues, label: str, live: Callable[[str, str], None] | None,
           line: str) -> None:
    cues.heard(label, line)
    if live is not None:
        live(label, line)
