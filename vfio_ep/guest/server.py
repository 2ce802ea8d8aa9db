"""The ``vfio-ep serve`` process a run starts: its command line, its readiness, and the
facts it reports of what it serves (``--facts``), which the run's guests are told to expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfio_ep.guest.children import LaunchError, spawn, terminate
from vfio_ep.tail import tail

SERVER_READY_TIMEOUT = 30.0
FACTS_FILE = "endpoint.json"  # beside the server's log: what it serves, by controller

# What ``vfio-ep serve --facts`` writes: by controller, its profile, IDs, function and the
# function's own facts (vfio_ep.serve.endpoint_facts).
Facts = dict[str, dict[str, Any]]


@dataclass
class Served:
    """A running server: its process, its socket per controller, and what it serves."""

    process: asyncio.subprocess.Process
    sockets: dict[str, Path]
    facts: Facts


def server_command(sockets: Sequence[str], server_args: Sequence[str], facts: Path,
                   server_argv: Sequence[str] | None = None) -> list[str]:
    """``vfio-ep serve`` on ``sockets`` (``PATH`` or ``CONTROLLER=PATH``), reporting what it
    serves in ``facts``; ``server_argv`` swaps the program part."""
    prefix = list(server_argv or [sys.executable, "-m", "vfio_ep", "-v", "serve"])
    return [*prefix, *(a for s in sockets for a in ("--socket", s)), "--facts", str(facts),
            *server_args]


async def wait_for_sockets(server: asyncio.subprocess.Process, sockets: Sequence[Path],
                           log: Path) -> None:
    """The server is ready once its sockets exist; fail with its log if it died first."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while not all(s.exists() for s in sockets):
        text = log.read_text(errors="replace") if log.exists() else ""
        if server.returncode is not None:
            raise LaunchError(f"vfio-ep server exited with {server.returncode} before creating "
                              f"{', '.join(map(str, sockets))}:\n{tail(text)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"vfio-ep server made no socket in {SERVER_READY_TIMEOUT:.0f} "
                              f"s:\n{tail(text)}")
        await asyncio.sleep(0.05)


def read_facts(path: Path) -> Facts:
    """What a server wrote with ``--facts`` (before its sockets existed, so once they do,
    the file is whole); {} when there is none, as from a server a test started itself."""
    try:
        facts: Facts = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return facts


@contextlib.asynccontextmanager
async def running_server(controllers: Sequence[str], server_args: Sequence[str], log: Path,
                         server_argv: Sequence[str] | None = None) -> AsyncIterator[Served]:
    """``vfio-ep serve`` with a socket per named controller (its output in ``log``, its facts
    beside it), ready to connect to; stopped (and its sockets' directory removed) on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
    sockets = {c: tmp / f"{c}.sock" for c in dict.fromkeys(controllers)}
    facts = log.with_name(FACTS_FILE)
    cmd = server_command([f"{c}={p}" for c, p in sockets.items()], server_args, facts,
                         server_argv)
    server = await spawn(cmd, stdout=log.open("wb"))
    try:
        await wait_for_sockets(server, list(sockets.values()), log)
        yield Served(server, sockets, read_facts(facts))
    finally:
        await terminate(server)
        shutil.rmtree(tmp, ignore_errors=True)
