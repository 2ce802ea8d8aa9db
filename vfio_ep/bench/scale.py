"""scale: how a trapped register read's cost grows with the devices one process serves, and
with 2048 MSI-X vectors.

One ``vfio-ep serve`` composes 1, 4 or 16 controllers, each with its pci-epf-test and its
own socket (the composition of pci-ep-cfs); a client per device reads a register of each
in turn (REGION_READ of BAR0, one socket round trip, answered by the C fast path).  The
baseline is the same read with one device in the same run.  A device with 2048 MSI-X
vectors (the most MSI-X allows: a 32 KiB table) is read the same way.
"""

from __future__ import annotations

import time
from pathlib import Path

from vfio_ep.bench.client import Client
from vfio_ep.bench.common import Column, Result, median, ratio, serve
from vfio_ep.epf.functions import pci_epf_test as t

DEVICES = (1, 4, 16)
REG_BAR = 0
MAGIC = t.REG_OFFSET["magic"][0]


def read_latency(sockets: list[Path], reads: int) -> float:
    """Median seconds of a register read, the devices taken in turn."""
    clients = [Client(s) for s in sockets]
    try:
        for c in clients:  # warm-up: first touches, the fast path's window table
            c.read32(REG_BAR, MAGIC)
        times = []
        for i in range(reads):
            c = clients[i % len(clients)]
            start = time.perf_counter()
            c.read32(REG_BAR, MAGIC)
            times.append(time.perf_counter() - start)
        return median(times)
    finally:
        for c in clients:
            c.close()


def run(devices: tuple[int, ...] = DEVICES, reads: int = 20_000) -> Result:
    started = time.monotonic()
    rows = []
    base = None
    for n in devices:
        with serve(controllers=n) as server:
            sockets = [server.socket.with_name(f"ep{k}.sock") for k in range(n)]
            took = read_latency(sockets, reads)
        base = base or took
        rows.append({"case": f"{n} device{'s' if n > 1 else ''}, one process", "us": took * 1e6,
                     "ratio": ratio(took, base)})
    with serve(["msix_interrupts=2048"]) as server:
        took = read_latency([server.socket], reads)
    rows.append({"case": "1 device, 2048 MSI-X vectors", "us": took * 1e6,
                 "ratio": ratio(took, base)})
    notes = [f"median of {reads} REGION_READs of BAR0 (pci-epf-test's magic register, served "
             "by the C fast path), a client per device, the devices read in turn; each server "
             "a `vfio-ep serve --config` of that many controllers."]
    return Result(
        "scale", "trapped register read vs devices served by one process",
        "one device in the same run",
        [Column("case", "served"), Column("us", "read us", "{:.1f}"),
         Column("ratio", "vs one device", "{:.2f}x")],
        rows, {"devices": list(devices), "reads": reads}, notes, time.monotonic() - started)
