"""``vfio-ep soak``: one server, guest after guest for N minutes, with resets and kills.

A serious endpoint survives a long day: every run boots a fresh guest (a new vfio-user
connection to the same server) that runs the function's suite (the kselftest for
pci-epf-test, the NTB suite's netdev phase for pci-epf-vntb).  Between runs, at random, the
guest first resets the device (``echo 1 > .../reset``: a DEVICE_RESET mid-session), or its
QEMU is killed a few seconds into the run (a client gone without a word).  At the end: runs,
failures, and the server's RSS and open fds after the first run and at the end (flat is the
bar).  Exit status 0 only when no run failed.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from vfio_ep import cmdline
from vfio_ep.config import ConfigError
from vfio_ep.guest.assets import NTB_SUITE, TAP_LIB
from vfio_ep.guest.children import LaunchError, run_async
from vfio_ep.guest.interrupt import Interrupted, keeping
from vfio_ep.guest.launcher import KSELFTEST_NAME, GuestBoot, GuestRun
from vfio_ep.guest.provision import GuestAssets, ProvisionError, provision_all
from vfio_ep.guest.results import parse_tap
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.guest.runner import Target, ntb_suite_script
from vfio_ep.guest.server import Facts, running_server

DEVICE = "/sys/bus/pci/devices/0000:01:00.0"  # the endpoint, alone behind the root port
RESET_FIRST = 0.25  # share of runs whose guest resets the device before the suite
KILL = 0.15  # share of runs whose QEMU is killed a few seconds in
RUN_TIMEOUT = 300.0
SETTLE_STEADY = 1.0  # the server's fd count unchanged this long: it is done with the client
SETTLE_TIMEOUT = 15.0


@dataclass
class ServerStats:
    """What a leak would show: the server's anonymous resident memory (its heap: mapped
    guest RAM comes and goes with each client) and open fds."""

    rss_kib: int
    fds: int

    @classmethod
    def of(cls, pid: int) -> ServerStats:
        with open(f"/proc/{pid}/status") as f:
            rss = next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
        return cls(rss, len(os.listdir(f"/proc/{pid}/fd")))

    @classmethod
    async def settled(cls, pid: int) -> ServerStats:
        """The server's figures once it has let the last client go.

        QEMU's exit ends a run, but the server closes that client's socket, eventfds and
        memfds a moment later: read at once, a loaded host counted them as leaked (13 -> 46
        fds).  So read until the fd count holds for a while (or give up and report it).
        """
        last = cls.of(pid)
        steady_since = time.monotonic()
        deadline = steady_since + SETTLE_TIMEOUT
        while time.monotonic() - steady_since < SETTLE_STEADY and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            now = cls.of(pid)
            if now.fds != last.fds:
                steady_since = time.monotonic()
            last = now
        return last


@dataclass
class Tally:
    runs: int = 0
    failed: list[str] = field(default_factory=list)
    resets: int = 0
    kills: int = 0
    tests: int = 0


def soak(minutes: float, function: str | None, sets: list[str], seed: int | None,
         run_dir: Path | None) -> int:
    """Loop the suite against one server for ``minutes``; 0 when no run failed."""
    target = Target(function, None, None, tuple(sets))
    try:
        comp = cmdline.load(None, function, sets, None)
    except (ConfigError, ValueError) as e:
        print(f"vfio-ep soak: {e}", file=sys.stderr)
        return 2
    driver = next(iter(comp.functions.values())).driver
    suite: Callable[[Facts], str]
    if driver == "pci_epf_vntb":
        suite = partial(ntb_suite_script, "netdev")
        extra_sets: tuple[str, ...] = ("ntb_client=netdev",)
    elif driver == "pci_epf_test":
        suite, extra_sets = (lambda _: f"/{KSELFTEST_NAME}"), ()
    else:
        print(f"vfio-ep soak: no suite soaks {driver}", file=sys.stderr)
        return 2
    rng = random.Random(seed)
    top = new_run_dir(run_dir)
    tally = Tally()
    try:
        with keeping(lambda interruption: _summary(tally, None, None, top, interruption)):
            return run_async(_soak(minutes * 60, suite, next(iter(comp.controllers)),
                                   target.server_args(*extra_sets), provision_all(), rng, top,
                                   tally))
    except (ProvisionError, LaunchError) as e:
        print(f"vfio-ep soak: {e}", file=sys.stderr)
        return 2


async def _soak(seconds: float, suite_of: Callable[[Facts], str], controller: str,
                server_args: list[str],
                assets: GuestAssets, rng: random.Random, top: Path, tally: Tally) -> int:
    deadline = time.monotonic() + seconds
    quiet = [sys.executable, "-m", "vfio_ep", "serve"]  # INFO logs: hours of DEBUG are GBs
    async with running_server([controller], server_args, top / "server.log",
                              quiet) as served:
        server, suite = served.process, suite_of(served.facts)
        first: ServerStats | None = None
        while time.monotonic() < deadline or not tally.runs:
            n = tally.runs + 1
            reset = rng.random() < RESET_FIRST
            kill_after = rng.uniform(2, 6) if rng.random() < KILL else None
            script = f"echo 1 > {DEVICE}/reset; {suite}" if reset else suite
            run = GuestRun(GuestBoot(script, socket=served.sockets[controller], assets=assets,
                                     run_dir=top / f"run{n:04d}",
                                     files={"ntb_suite.sh": NTB_SUITE, "tap_lib.sh": TAP_LIB}))
            started = time.monotonic()
            result = await run.run(kill_after or RUN_TIMEOUT)
            tally.runs += 1
            tally.resets += reset
            what = "reset first, " if reset else ""
            if kill_after is not None:
                tally.kills += 1
                line = f"QEMU killed after {kill_after:.1f} s"
            else:
                report = parse_tap(result.output, result.line_times)
                tally.tests += len(report.tests)
                line = (f"{sum(t.status != 'fail' for t in report.tests)}/"
                        f"{len(report.tests)} ok"
                        f"{'' if result.ok else f', {result.error or result.exit_status}'}")
                if not (result.ok and report.passed) or report.ran_nothing:
                    tally.failed.append(f"run {n}: {line} ({result.run_dir})")
            print(f"run {n}: {what}{line} ({time.monotonic() - started:.0f} s)", flush=True)
            if server.returncode is not None:
                tally.failed.append(f"the server exited with {server.returncode}")
                break
            if first is None:
                first = await ServerStats.settled(server.pid)
        last = await ServerStats.settled(server.pid) if server.returncode is None else None
    _summary(tally, first, last, top)
    return 0 if not tally.failed else 1


def _summary(tally: Tally, first: ServerStats | None, last: ServerStats | None,
             top: Path, interruption: Interrupted | None = None) -> None:
    print(f"\nsoak: {tally.runs} runs ({tally.resets} with a reset first, {tally.kills} with "
          f"QEMU killed), {tally.tests} tests, {len(tally.failed)} failed"
          + (f"; interrupted ({interruption})" if interruption else ""))
    if first and last:
        print(f"server: RssAnon {first.rss_kib} KiB after run 1, {last.rss_kib} KiB at the end "
              f"({last.rss_kib - first.rss_kib:+d}); open fds {first.fds} -> {last.fds}")
    for line in tally.failed:
        print(f"FAILED {line}")
    print(f"run directory: {top}", flush=True)
