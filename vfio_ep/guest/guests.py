"""Several guests against one server: a pci-epf-ntb pair, ``--exec`` on each controller, a
host that comes back."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

from vfio_ep.guest.children import run_async
from vfio_ep.guest.launcher import GuestBoot, GuestResult, GuestRun
from vfio_ep.guest.provision import GuestAssets, provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.server import running_server


@dataclass(frozen=True)
class GuestSpec:
    """One guest of several against one server: attached to ``controller``'s socket.  With
    ``after``, it boots once the guest labelled so has exited: the same host coming back.
    ``qemu_args`` go on its QEMU command line (a NIC, say)."""

    label: str
    controller: str
    script: str
    after: str | None = None
    qemu_args: tuple[str, ...] = ()


def boot_guests(specs: Sequence[GuestSpec], *, server_args: list[str],
                assets: GuestAssets | None = None, timeout: float = 300, run_dir: Path,
                files: Mapping[str, Path | bytes] | None = None,
                live: Callable[[str, str], None] | None = None,
                options: GuestOptions = DEFAULT_OPTIONS) -> list[GuestResult]:
    """Start one ``vfio-ep serve`` with a socket per controller the specs name, boot every
    guest at once against it (run directory ``run_dir/<label>``; a guest with ``after`` when
    that one has exited), and return their results in order, each with the server's log and
    facts.  ``live`` gets (label, line) as each guest prints."""
    return run_async(_boot_guests(specs, server_args, assets or provision_all(), timeout,
                                  run_dir, files or {}, live, options))


async def _boot_guests(specs: Sequence[GuestSpec], server_args: list[str],
                       assets: GuestAssets, timeout: float, run_dir: Path,
                       files: Mapping[str, Path | bytes],
                       live: Callable[[str, str], None] | None,
                       options: GuestOptions) -> list[GuestResult]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    async with running_server([s.controller for s in specs], server_args, log) as served:
        tasks: dict[str, asyncio.Task[GuestResult]] = {}
        for i, s in enumerate(specs):
            gdb_port = None if options.gdb_port is None else options.gdb_port + i
            run = GuestRun(GuestBoot(
                s.script, socket=served.sockets[s.controller], assets=assets,
                run_dir=run_dir / s.label, files=files, qemu_args=s.qemu_args,
                options=replace(options, gdb_port=gdb_port),
                live=partial(live, s.label) if live else None))
            tasks[s.label] = asyncio.create_task(_boot_after(
                tasks[s.after] if s.after else None, run, timeout))
        results = await asyncio.gather(*tasks.values())
    server_log = log.read_text(errors="replace")
    return [replace(r, server_log=server_log, facts=served.facts) for r in results]


async def _boot_after(before: asyncio.Task[GuestResult] | None, run: GuestRun,
                      timeout: float) -> GuestResult:
    if before is not None:
        await asyncio.wait([before])  # its failure is its own result
    return await run.run(timeout)
