"""bars: BAR_TEST's accesses, per BAR of pci-epf-test, against an in-QEMU MMIO read.

The guest program (qemu/bench/epbench.c) maps each BAR of pci-epf-test through vfio-pci and
times 32-bit reads and writes at its start, as BAR_TEST does them.  BAR0 holds the test
registers (trapped: every access is a vfio-user round trip); the others are EP RAM QEMU maps
straight into the guest, except the page a doorbell of this configuration could land on.  The
floor is ivshmem-plain's BAR0, served inside QEMU.
"""

from __future__ import annotations

import time
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, ratio
from vfio_ep.bench.doorbell import IVSHMEM, PROGRAM, parse_results, run_guest, vfio_prelude
from vfio_ep.tail import tail

BARS = range(6)


def run(n: int = 2000, n_mmio: int = 20000) -> Result:
    started = time.monotonic()
    script = vfio_prelude() + f"/{PROGRAM} mmio {n_mmio}\n/{PROGRAM} bars {n} $BDF\n"
    result = run_guest(script, [], extra_qemu_args=IVSHMEM)
    got = parse_results(result.output)
    if "ivshmem-mmio-read" not in got or "bar0-read" not in got:
        raise BenchError(f"no BAR results in the guest output:\n{tail(result.output)}")
    floor = got["ivshmem-mmio-read"]["median_ns"]
    rows: list[dict[str, Any]] = []
    for bar in BARS:
        read, write = got.get(f"bar{bar}-read"), got.get(f"bar{bar}-write")
        if read is None or write is None:
            continue
        rows.append({"bar": f"BAR{bar}", "via": read["via"],
                     "read_us": read["median_ns"] / 1e3, "write_us": write["median_ns"] / 1e3,
                     "read_vs_floor": ratio(read["median_ns"], floor),
                     "write_vs_floor": ratio(write["median_ns"], floor)})
    notes = [f"{n} 32-bit reads and {n} writes at the start of each BAR (BAR0: the SIZE "
             "register) through the guest's vfio-pci mmap, after 20 warm-up reads; medians, "
             "rdtsc-timed in the guest.",
             f"floor: {n_mmio} reads of ivshmem-plain BAR0 in the same guest: "
             f"{floor / 1e3:.2f} us.  BAR0 is trapped by design (the test registers); BARs "
             "1-5 are EP RAM mapped into the guest (a doorbell's page alone stays trapped, "
             "and only in the BAR this configuration's doorbell can land in)."]
    return Result(
        "bars", "BAR_TEST's accesses per pci-epf-test BAR, in the guest",
        "ivshmem-plain BAR0 MMIO read in the same guest",
        [Column("bar", "BAR"), Column("via", "via"),
         Column("read_us", "read us", "{:,.2f}"), Column("write_us", "write us", "{:,.2f}"),
         Column("read_vs_floor", "read vs floor", "{:,.1f}x"),
         Column("write_vs_floor", "write vs floor", "{:,.1f}x")],
        rows, {"n": n, "n_mmio": n_mmio, "run_dir": str(result.run_dir)}, notes,
        time.monotonic() - started)
