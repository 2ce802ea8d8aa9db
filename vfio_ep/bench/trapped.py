"""trapped: a guest's trapped register accesses and doorbell rings, against a C reference server.

One guest sees three devices: vfio-ep's pci-epf-test (MSI doorbell), the C reference vfio-user
server's device (refserver.c: one thread, blocking reads, registers copied and nothing else,
pci-epf-test's BAR layout) and ivshmem-plain (MMIO QEMU serves in-process).  The guest
program (qemu/bench/epbench.c) times, on both vfio-user devices through vfio-pci, register
reads, register writes and a doorbell ring to its MSI-X; so every vfio-ep figure has the C
floor for the same access, in the same guest, in the same minute.  Run once on the C fast
path and once on the Python path.
"""

from __future__ import annotations

import time
from typing import Any

from vfio_ep.bench.client import Client
from vfio_ep.bench.common import HERE, BenchError, Column, Result, build_c, median, serve
from vfio_ep.bench.dispatch import REG_COMMAND, REG_SIZE
from vfio_ep.bench.doorbell import (
    IVSHMEM,
    PROGRAM,
    REF_DEVICE,
    REF_VENDOR,
    parse_results,
    run_guest,
    vfio_bind,
    vfio_prelude,
)
from vfio_ep.tail import tail

PATHS = (("C fast path", True), ("Python path", False))
HOST_READS = 5000
# (access, vfio-ep result, reference result, target vs the reference, target vs a read)
ACCESSES = (
    ("register read", "epf-register-read", "ref-register-read", 1.0, None),
    ("register write", "epf-register-write", "ref-register-write", 1.0, None),
    ("register write Python sees", "epf-command-write", "ref-register-write", 1.3, None),
    ("doorbell -> MSI-X (msi)", "doorbell-round-trip", "ref-doorbell-round-trip", None, 1.2),
)


def _met(value: float | None, target: float | None) -> str | None:
    if value is None or target is None:
        return None
    return "yes" if value <= target else f"no ({value / target:.2f}x over)"


def host_round_trips(reads: int = HOST_READS) -> dict[str, float]:
    """Median us of a REGION_READ round trip from a host client: the raw C socket (the sink
    answers without looking), the C reference, vfio-ep on each path, and on the C path a
    register a Python handler answers (COMMAND, watched EP RAM)."""
    out = {}
    servers = (("raw C socket", dict(argv=[str(build_c(HERE / "sink.c"))]), False, REG_SIZE),
               ("C reference", dict(argv=[str(build_c(HERE / "refserver.c"))]), True,
                REG_SIZE),
               ("vfio-ep C path", dict(fastpath=True), True, REG_SIZE),
               ("vfio-ep C path, a register Python answers", dict(fastpath=True), True,
                REG_COMMAND),
               ("vfio-ep Python path", dict(fastpath=False), True, REG_SIZE))
    for name, how, negotiate, reg in servers:
        with serve(**how) as server, Client(server.socket, negotiate=negotiate) as c:
            for _ in range(20):
                c.read32(0, reg)
            times = []
            for _ in range(reads):
                start = time.perf_counter()
                c.read32(0, reg)
                times.append(time.perf_counter() - start)
        out[name] = median(times) * 1e6
    return out


def run(n: int = 2000, n_mmio: int = 20000, reps: int = 3) -> Result:
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    runs: dict[str, list[str]] = {path: [] for path, _ in PATHS}
    floors: list[float] = []
    ref_ring_vs_read: list[float] = []
    got_by_path: dict[str, list[dict[str, dict[str, Any]]]] = {path: [] for path, _ in PATHS}
    for _ in range(reps):  # the paths interleaved, so both see the machine's same moods
        for path, fastpath in PATHS:
            script = (vfio_prelude() + vfio_bind("REF", REF_VENDOR, REF_DEVICE, "reference")
                      + f"/{PROGRAM} mmio {n_mmio}\n/{PROGRAM} ref {n} $REF\n"
                      f"/{PROGRAM} doorbell {n} $BDF\n")
            result = run_guest(script, ["doorbell=msi"], extra_qemu_args=IVSHMEM,
                               fastpath=fastpath, reference=True)
            got = parse_results(result.output)
            runs[path].append(str(result.run_dir))
            missing = [k for _, ours, ref, _, _ in ACCESSES for k in (ours, ref)
                       if k not in got] + [k for k in ("ivshmem-mmio-read",) if k not in got]
            if missing:
                raise BenchError(f"{path}: no {', '.join(missing)} result in the guest "
                                 f"output:\n{tail(result.output)}")
            got_by_path[path].append(got)
            floors.append(got["ivshmem-mmio-read"]["median_ns"] / 1e3)
            ref_ring_vs_read.append(got["ref-doorbell-round-trip"]["median_ns"]
                                    / got["ref-register-read"]["median_ns"])
    for path, _ in PATHS:
        each = got_by_path[path]
        for access, ours, ref, vs_ref, vs_read in ACCESSES:
            r_ref = median([g[ours]["median_ns"] / g[ref]["median_ns"] for g in each])
            r_read = (median([g[ours]["median_ns"] / g["epf-register-read"]["median_ns"]
                              for g in each]) if vs_read else None)
            target = (f"<= {vs_ref:.1f}x C reference" if vs_ref
                      else f"<= {vs_read:.1f}x register read")
            rows.append({
                "path": path, "access": access,
                "median_us": median([g[ours]["median_ns"] for g in each]) / 1e3,
                "p99_us": median([g[ours]["p99_ns"] for g in each]) / 1e3,
                "ref_us": median([g[ref]["median_ns"] for g in each]) / 1e3,
                "vs_ref": r_ref, "vs_read": r_read, "target": target,
                "met": _met(r_ref, vs_ref) if vs_ref else _met(r_read, vs_read)})
    host = host_round_trips()
    notes = [
        f"{n} accesses of each kind per device after 20 warm-up ones, rdtsc-timed in the "
        "guest through vfio-pci (no-IOMMU) pread/pwrite on both devices; each figure the "
        f"median over {reps} guests per path (paths interleaved), each ratio the median of "
        "the per-guest ratios.",
        "the C reference's own doorbell -> MSI-X is "
        f"{median(ref_ring_vs_read):.2f}x its register read (median over the guests): the "
        "interrupt's way back through QEMU and the guest costs that much under TCG, so the "
        "<= 1.2x target is below what even the C floor reaches here; vs C ref compares the "
        "rings themselves.",
        "C reference: vfio_ep/bench/refserver.c, a minimal vfio-user server in C (one thread, "
        "blocking reads, register storage, a doorbell register raising MSI-X vector 0), in "
        "the same guest as vfio-ep's device.",
        "register write: pci-epf-test's SIZE register (no side effect).  QEMU waits for the "
        "reply of every write to a device with a region the guest maps directly (its posted "
        "writes could pass a later access through the mapping), so both devices, each with a "
        "mapped RAM BAR, get non-posted writes: sustained posted writes do not occur.  "
        "'Python sees': COMMAND 0, a watched register (the function's code runs, with "
        "nothing to do), against the reference's plain register write.",
        f"the host side alone (a Python client, median of {HOST_READS} REGION_READs of a "
        "BAR0 register, no QEMU): " + ", ".join(f"{k} {v:.1f} us" for k, v in host.items())
        + "; a read Python answers vs the C reference: "
        f"{host['vfio-ep C path, a register Python answers'] / host['C reference']:.2f}x "
        "(target <= 1.5x).",
        "in-QEMU MMIO read (ivshmem-plain BAR0) in the same guests: "
        + ", ".join(f"{f:.2f} us" for f in floors) + ".",
    ]
    return Result(
        "trapped", "trapped register accesses and doorbell -> MSI-X, vfio-ep vs a C server",
        "the C reference vfio-user server in the same guest",
        [Column("path", "path"), Column("access", "access"),
         Column("median_us", "median us", "{:,.1f}"), Column("p99_us", "p99 us", "{:,.1f}"),
         Column("ref_us", "C ref median us", "{:,.1f}"),
         Column("vs_ref", "vs C ref", "{:,.2f}x"),
         Column("vs_read", "vs register read", "{:,.2f}x"),
         Column("target", "target"), Column("met", "met")],
        rows, {"n": n, "n_mmio": n_mmio, "reps": reps, "run_dirs": runs}, notes,
        time.monotonic() - started)
