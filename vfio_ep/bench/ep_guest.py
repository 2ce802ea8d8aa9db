"""ep-guest: the kernel's own pci-epf-test in an EP guest (``run --ep-guest``), timed from
the RC guest by the same program as the other guest benchmarks, each row against a baseline
measured in the same run.

One RC script (qemu/bench/epbench.c plus pci_endpoint_test's ioctls) runs twice: against the
EP guest's function, and against vfio-ep's Python pci-epf-test, so every access has the
Python function's number beside it.  The rows:

- the doorbell: RC rings, the EP guest's kernel handler sets STATUS and raises the MSI-X,
  against the same round trip with the Python function on the same kind of doorbell (the
  eDMA's interrupt emulation, "embedded": what pci-ep-msi.c falls back to in an x86 EP guest);
- each BAR's 32-bit read and write (BAR_TEST's accesses), against ivshmem-plain's MMIO read
  in the same RC guest.  The EP guest's BARs are trapped: vfio-ep's C I/O thread serves each
  access from the EP guest's memory;
- a DMA READ and WRITE through the EP guest's dmaengine, timed by the function itself (its
  ``READ => Size: ... Time: ...`` line in the EP guest's dmesg: the transfer alone), against
  the host copying the same bytes.  The RC's ioctl time (buffers, random fill, both CRC32s,
  the function's 1 ms command poll) is beside it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, guest_programs, median, ratio
from vfio_ep.bench.doorbell import IVSHMEM, PROGRAM, parse_results, run_guest, vfio_prelude
from vfio_ep.guest.ep_guest import EpGuestRun, PairResult, boot_ep_pair
from vfio_ep.guest.provision import provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.tail import tail

MIB = 1 << 20
# The largest transfer the kernel's pair takes: pci_endpoint_test (RC) and pci-epf-test (EP)
# each kzalloc() the whole buffer, and kmalloc's ceiling is 4 MiB (MAX_PAGE_ORDER 10); 4 MiB +
# 4 KiB and 8 MiB fail with ENOMEM in the RC's ioctl before the function sees a command.
DMA_SIZE = 4 * MIB
OPS = ("READ", "WRITE")  # the function's commands: READ fetches from RC memory
# The RC driver's ioctl behind each: its PCITEST_READ has the function WRITE to the RC.
IOCTL = {"READ": "write", "WRITE": "read"}
TEST_DEV = "/dev/pci-endpoint-test.0"
PYTHON_DOORBELL = "embedded"  # the Python function's doorbell, the EP guest's kind
BARS = range(6)
GUEST_TIMEOUT = 900
# pci_epf_test_print_rate(): "READ => Size: 4194304 B, DMA: YES, Time: 0.012345678 s, ..."
_RATE = re.compile(r"\b(READ|WRITE) => Size: (\d+) B, DMA: YES, Time: (\d+\.\d+) s")
_DOORBELL = "doorbell-round-trip"
_FLOOR = "ivshmem-mmio-read"


def rc_script(n: int, n_mmio: int, size: int, reps: int) -> str:
    """What the RC guest runs against either function: DMA through its own driver, then the
    function handed to vfio-pci for the floor, the doorbell and the BARs."""
    xfer = "".join(f"/{PROGRAM} xfer {IOCTL[op]} {size} {reps} {TEST_DEV}\n" for op in OPS)
    return ("set -e\n[ -f /lib/modules/pci_endpoint_test.ko ] && "
            "insmod /lib/modules/pci_endpoint_test.ko\n" + xfer + vfio_prelude()
            + f"/{PROGRAM} mmio {n_mmio}\n/{PROGRAM} doorbell {n} $BDF\n"
            f"/{PROGRAM} bars {n} $BDF\n")


def ep_pair(script: str) -> PairResult:
    """``run --ep-guest``'s EP guest (pci-test-howto.rst's setup on the generic profile),
    then an RC guest running ``script`` with the guest programs and ivshmem-plain."""
    top = new_run_dir(None)
    rc_options = dataclasses.replace(DEFAULT_OPTIONS, qemu_args=tuple(IVSHMEM))
    files: dict[str, Path | bytes] = {f"/{k}": v for k, v in guest_programs().items()}
    pair = boot_ep_pair(EpGuestRun(), provision_all(), top, script, timeout=GUEST_TIMEOUT,
                        rc_options=rc_options, rc_files=files)
    if pair.error or pair.rc is None or not pair.rc.ok:
        rc = pair.rc
        raise BenchError(f"EP guest pair failed ({pair.error or (rc and rc.error) or 'exit '}"
                         f"{rc.exit_status if rc else ''}); run dir {top}\n--- RC guest ---\n"
                         f"{tail(rc.output) if rc else ''}\n--- EP guest ---\n"
                         f"{tail(pair.ep.output)}\n--- server ---\n{tail(pair.server_log)}")
    return pair


def transfer_times(dmesg: str, size: int) -> dict[str, list[float]]:
    """The function's own DMA times (seconds) of ``size``-byte transfers, by operation, in
    dmesg order, without each operation's first (the RC program's warm-up)."""
    times: dict[str, list[float]] = {op: [] for op in OPS}
    for op, got, seconds in _RATE.findall(dmesg):
        if int(got) == size:
            times[op].append(float(seconds))
    return {op: t[1:] for op, t in times.items()}


def host_copy(size: int, reps: int) -> float:
    """Seconds for this process to copy ``size`` bytes (median of ``reps`` after a warm-up):
    what the eDMA model does for a transfer, guest RAM to guest RAM."""
    src, dst = memoryview(bytearray(os.urandom(size))), memoryview(bytearray(size))
    took = []
    for _ in range(reps + 1):
        start = time.perf_counter()
        dst[:] = src
        took.append(time.perf_counter() - start)
    return median(took[1:])


def _us(sample: dict[str, Any] | None, key: str = "median_ns") -> float | None:
    return sample[key] / 1e3 if sample else None


def _row(case: str, ep: dict[str, Any], python: dict[str, Any] | None, baseline: str,
         baseline_us: float | None, **more: Any) -> dict[str, Any]:
    """One access timed in the RC guest: the EP guest's function against ``baseline``."""
    row = {"case": case, "via": ep["via"], "median_us": _us(ep), "p99_us": _us(ep, "p99_ns"),
           "mb_s": None, "baseline": baseline, "baseline_us": baseline_us,
           "ratio": ratio(_us(ep), baseline_us), "python_us": _us(python), "rc_us": None}
    return row | more


def access_rows(ep: dict[str, dict[str, Any]], python: dict[str, dict[str, Any]]
                ) -> list[dict[str, Any]]:
    """The doorbell against the Python function's; each BAR against ivshmem's read."""
    rows = [_row("doorbell -> MSI-X", ep[_DOORBELL], python[_DOORBELL],
                 f"Python pci-epf-test, doorbell={PYTHON_DOORBELL}", _us(python[_DOORBELL]))]
    floor = _us(ep[_FLOOR])
    for bar in BARS:
        for kind in ("read", "write"):
            name = f"bar{bar}-{kind}"
            if name in ep:
                rows.append(_row(f"BAR{bar} {kind}", ep[name], python.get(name),
                                 "ivshmem-plain BAR0 read", floor))
    return rows


def dma_rows(ep: dict[str, dict[str, Any]], python: dict[str, dict[str, Any]],
             dmesg: str, size: int, host_s: float) -> list[dict[str, Any]]:
    """READ and WRITE by the EP guest's dmaengine, timed by the function, against the host's
    copy; the RC's ioctl time, and the Python function's, beside them."""
    rows = []
    for op, times in transfer_times(dmesg, size).items():
        if not times:
            raise BenchError(f"no '{op} => Size: {size} B, DMA: YES' line in the EP guest's "
                             f"dmesg:\n{tail(dmesg)}")
        took = median(times)
        key = f"pcitest-{IOCTL[op]}-dma"
        rows.append({"case": f"DMA {op} {size / MIB:g} MiB", "via": "EP dmaengine",
                     "median_us": took * 1e6, "p99_us": max(times) * 1e6,
                     "mb_s": size / took / 1e6, "baseline": "host memcpy, same size",
                     "baseline_us": host_s * 1e6, "ratio": ratio(took, host_s),
                     "python_us": _us(python.get(key)), "rc_us": _us(ep.get(key))})
    return rows


def _guest_results(output: str, what: str) -> dict[str, dict[str, Any]]:
    got = parse_results(output)
    missing = [k for k in (_DOORBELL, _FLOOR, "bar0-read",
                                 *(f"pcitest-{i}-dma" for i in IOCTL.values()))
               if k not in got]
    if missing:
        raise BenchError(f"{what}: no {', '.join(missing)} result in the RC guest's output:\n"
                         f"{tail(output)}")
    return got


def run(n: int = 2000, n_mmio: int = 20000, size: int = DMA_SIZE, reps: int = 5) -> Result:
    started = time.monotonic()
    script = rc_script(n, n_mmio, size, reps)
    baseline = run_guest(script, [f"doorbell={PYTHON_DOORBELL}"], extra_qemu_args=IVSHMEM,
                         timeout=GUEST_TIMEOUT)
    python = _guest_results(baseline.output, "Python pci-epf-test")
    pair = ep_pair(script)
    assert pair.rc is not None  # ep_pair raised otherwise
    ep = _guest_results(pair.rc.output, "EP guest")
    dmesg_file = pair.ep.run_dir / "dmesg.txt"
    dmesg = dmesg_file.read_text(errors="replace") if dmesg_file.exists() else ""
    rows = access_rows(ep, python) + dma_rows(ep, python, dmesg, size, host_copy(size, reps))
    return Result(
        "ep-guest", "Linux's pci-epf-test in an EP guest, timed from the RC guest",
        "per row: the Python pci-epf-test's doorbell, ivshmem's MMIO read, a host memcpy",
        [Column("case", "case"), Column("via", "via"),
         Column("median_us", "median us", "{:,.1f}"), Column("p99_us", "p99 us", "{:,.1f}"),
         Column("mb_s", "MB/s", "{:,.0f}"), Column("baseline", "baseline"),
         Column("baseline_us", "baseline us", "{:,.2f}"),
         Column("ratio", "vs baseline", "{:,.1f}x"),
         Column("python_us", "Python fn us", "{:,.2f}"),
         Column("rc_us", "RC ioctl us", "{:,.0f}")],
        rows, {"n": n, "n_mmio": n_mmio, "size": size, "reps": reps,
               "run_dirs": {"python": str(baseline.run_dir),
                            "ep_guest": str(pair.ep.run_dir.parent)}},
        _notes(n, n_mmio, size, reps), time.monotonic() - started)


def _notes(n: int, n_mmio: int, size: int, reps: int) -> list[str]:
    return [
        "vs baseline: time / the baseline's time (higher is slower).  Same RC guest program "
        "(epbench.c) against both functions; Python fn us: the same measurement against "
        f"vfio-ep's Python pci-epf-test (doorbell={PYTHON_DOORBELL}), in its own guest.",
        f"doorbell: {n} rings after 20 warm-up ones, ring -> the EP guest's threaded IRQ "
        "handler (STATUS, then pci_epf_test_raise_irq() through the EPC driver) -> MSI-X on "
        "an eventfd in the RC; rdtsc-timed in the RC guest.",
        f"BARs: {n} 32-bit reads and writes at each BAR's start (BAR0: SIZE); floor: "
        f"{n_mmio} ivshmem-plain BAR0 reads in the same RC guest.  In EP-guest mode every BAR "
        "is trapped: vfio-ep's C I/O thread serves it from the EP guest's memory (a read is "
        "a vfio-user round trip, a write is posted), hence tens of us per read where the "
        "Python function's RAM BARs are mapped into the RC guest (all but BAR0 and the one "
        "its doorbell can land in).",
        f"DMA: {reps} transfers of {size / MIB:g} MiB per operation after a warm-up; the "
        "median of the function's own time (its dmesg line: the dmaengine transfer alone, "
        "between the EP guest's buffer and RC memory through the outbound window); "
        f"baseline: this process copying {size / MIB:g} MiB.  {DMA_SIZE // MIB} MiB is the "
        "most the kernel's pair takes, not the issue's 64 MiB: pci_endpoint_test and "
        "pci-epf-test each kzalloc() the buffer, and 4 MiB is kmalloc's ceiling (4 MiB + "
        "4 KiB fails with ENOMEM in the RC's ioctl).",
        "RC ioctl us: the RC driver's ioctl (PCITEST_WRITE for the function's READ, "
        "PCITEST_READ for its WRITE) as the RC's userspace waits for it: the driver's "
        "buffer, random fill and CRC32 on both sides, the function's 1 ms command poll, "
        "under TCG.",
    ]
