"""idle: the server's CPU use while a guest is attached and idle, with a doorbell enabled
(per backend) vs with none.

A doorbell should cost nothing until it rings: the MSI and embedded backends wait on an
eventfd, while the poll backend reads its EP RAM word every ``doorbell_poll_interval_us``.
The guest program sets up pci-epf-test exactly alike in every case (VFIO, MSI-X), enables the
doorbell or not, prints "IDLE begin", sleeps, prints "IDLE end"; the host samples the server
process's CPU time (all threads) at the two lines.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from vfio_ep.bench.common import (
    BenchError,
    Column,
    ProcSample,
    Result,
    Server,
    ratio,
    sample_process,
)
from vfio_ep.bench.doorbell import BACKENDS, PROGRAM, run_guest, vfio_prelude
from vfio_ep.epc.core import PciEpcAttributes

BASELINE = "no doorbell"
RESOLUTION_PCT = 0.01  # 100 us of CPU a second: below this, a ratio to the baseline is noise


class Sampler:
    """The server's CPU use at the guest's IDLE begin/end lines."""

    def __init__(self) -> None:
        self.server: Server | None = None
        self.samples: dict[str, ProcSample] = {}

    def attach(self, server: Server) -> None:
        self.server = server

    def line(self, text: str) -> None:
        if self.server is not None and text.startswith("IDLE "):
            self.samples[text.split()[1]] = sample_process(self.server.pid)

    def row(self, case: str) -> dict[str, Any]:
        try:
            a, b = self.samples["begin"], self.samples["end"]
        except KeyError:
            raise BenchError("the guest never printed IDLE begin/end") from None
        window = b.when - a.when
        return {"case": case, "cpu_pct": 100 * (b.on_cpu - a.on_cpu) / window,
                "cpu_pct_ticks": 100 * (b.ticks - a.ticks) / window,
                "wakeups_s": (b.wakeups - a.wakeups) / window, "window_s": window}


def measure(case: str, seconds: float) -> dict[str, Any]:
    backend = "auto" if case == BASELINE else case
    sampler = Sampler()
    flag = "" if case == BASELINE else " db"
    script = vfio_prelude() + f"/{PROGRAM} idle {seconds:g} $BDF{flag}\n"
    run_guest(script, [f"doorbell={backend}"], live=sampler.line, on_server=sampler.attach,
              timeout=300 + seconds)
    return sampler.row(case)


# The poll backend's floor: the same C poller (native/vfu_poll.c) on a word nobody rings, in
# a process doing nothing else: what polling at that period costs this machine.
POLLER_ALONE = """
import os, sys, time
from vfio_ep._native import ffi, lib
word, p = ffi.new("uint32_t *"), ffi.new("struct vfu_poller *")
p.word, p.count, p.interval_ns, p.efd = word, 1, int(sys.argv[1]) * 1000, os.eventfd(0)
assert lib.vfu_poller_start(p) == 0
print("ready", flush=True)
time.sleep(float(sys.argv[2]))
lib.vfu_poller_stop(p)
"""
FLOOR = "C poller alone (floor)"


def measure_poller_alone(seconds: float, interval_us: int) -> dict[str, Any]:
    proc = subprocess.Popen([sys.executable, "-c", POLLER_ALONE, str(interval_us),
                             str(seconds + 2)], stdout=subprocess.PIPE, text=True)
    try:
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise BenchError("the C poller did not start (is the extension built?)")
        time.sleep(0.5)
        a = sample_process(proc.pid)
        time.sleep(seconds)
        b = sample_process(proc.pid)
    finally:
        proc.kill()
        proc.wait()
    window = b.when - a.when
    return {"case": FLOOR, "cpu_pct": 100 * (b.on_cpu - a.on_cpu) / window,
            "cpu_pct_ticks": 100 * (b.ticks - a.ticks) / window,
            "wakeups_s": (b.wakeups - a.wakeups) / window, "window_s": window}


def run(seconds: float = 10, backends: tuple[str, ...] = BACKENDS) -> Result:
    started = time.monotonic()
    rows = [measure(case, seconds) for case in (BASELINE, *backends)]
    poll_us = PciEpcAttributes.doorbell_poll_interval_us
    floor = measure_poller_alone(seconds, poll_us) if "poll" in backends else None
    base = rows[0]["cpu_pct"]
    for row in rows:
        row["ratio"] = ratio(row["cpu_pct"], base) if base >= RESOLUTION_PCT else None
        row["extra_pct"] = row["cpu_pct"] - base
        if row["case"] == "poll" and floor is not None:
            row["vs_floor"] = ratio(row["extra_pct"], floor["cpu_pct"])
            row["us_per_poll"] = row["extra_pct"] * 1e4 / (1e6 / poll_us)
    if floor is not None:
        floor.update(extra_pct=floor["cpu_pct"], vs_floor=1.0,
                     us_per_poll=floor["cpu_pct"] * 1e4 / (1e6 / poll_us))
        rows.append(floor)
    notes = [f"server CPU over a {seconds:g} s idle window (guest attached, MSI-X set up through "
             "VFIO); CPU % of one core from the process CPU clock (ns, all threads), utime+stime "
             "(10 ms ticks) alongside; wakeups: context switches of all the server's threads "
             "(the poll backend's poller is a C thread: native/vfu_poll.c).",
             f"poll backend at the default doorbell_poll_interval_us={poll_us}; its floor: "
             "the same C poller thread alone in a process, on a word nobody rings (what a "
             "wakeup every period costs this machine); us/poll: CPU per period.",
             "target: poll <= 1 % of a core; where the floor alone is above that, the gap is "
             "the machine's wakeup cost (a virtual CPU's timer and context switch), not the "
             "server's."]
    if base < RESOLUTION_PCT:
        notes.append(f"the server without a doorbell used {base:.4f} % (below "
                     f"{RESOLUTION_PCT} %, i.e. it was essentially never scheduled): a ratio to "
                     "it would be noise, so it is left out (-); compare the CPU % over none.")
    return Result(
        "idle", "server CPU while idle with a doorbell enabled", "the same guest, no doorbell",
        [Column("case", "doorbell"), Column("cpu_pct", "CPU %", "{:.3f}"),
         Column("cpu_pct_ticks", "CPU % (ticks)", "{:.2f}"),
         Column("wakeups_s", "wakeups/s", "{:,.0f}"), Column("window_s", "window s", "{:.1f}"),
         Column("extra_pct", "CPU % over none", "{:+.3f}"),
         Column("ratio", "vs none", "{:,.1f}x"),
         Column("us_per_poll", "us/poll", "{:.1f}"),
         Column("vs_floor", "vs floor", "{:.2f}x")],
        rows, {"seconds": seconds, "backends": list(backends)}, notes,
        time.monotonic() - started)
