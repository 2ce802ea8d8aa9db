"""ntb-pair: two guests joined by pci-epf-ntb, against the same two guests joined by virtio-net.

Both guests boot with their side of the NTB pair and a virtio-net NIC; the two NICs' QEMU
netdevs are joined by a pair of UNIX datagram sockets (no host network address anywhere).
Guest a pings b and sends 16 MiB to b over TCP, over each network in turn, b timing each
transfer (``ntb_pair.sh a|b bench``); a second boot runs ntb_perf a -> b.  The baselines,
measured in the same run: virtio-net between the same guests for ping and TCP (the issue's
target: NTB within 1.5x), a host memcpy for throughput.
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from pathlib import Path

from vfio_ep.bench.common import BenchError, Column, Result, median, ratio
from vfio_ep.bench.ntb import percentile
from vfio_ep.guest.assets import NTB_PAIR, TAP_LIB
from vfio_ep.guest.guests import GuestSpec, boot_guests
from vfio_ep.guest.launcher import GuestResult
from vfio_ep.guest.runner import PAIR_ROLES, pair_cue

SERVER_ARGS = ["--function", "pci-epf-ntb"]
CONTROLLERS = ("ep0", "ep1")
PERF_ORDER = 24  # ntb_perf moves 16 MiB
MIB = 1 << 20
_PING = re.compile(r"^(ntb|virtio) ping: .*time=([\d.]+) ms", re.M)
_TRANSFER = re.compile(r"^(ntb|virtio) transfer: (\d+) bytes in ([\d.]+) s", re.M)
_PERF = re.compile(r"copied (\d+) bytes in (\d+) usecs")


def _virtio_nic(sockets: Path, role: str, peer: str) -> tuple[str, ...]:
    """A virtio-net NIC whose frames go to the other guest's datagram socket."""
    return ("-netdev", f"dgram,id=vnet,local.type=unix,local.path={sockets / role},"
                       f"remote.type=unix,remote.path={sockets / peer}",
            "-device", f"virtio-net-pci,netdev=vnet,mac=52:54:00:00:00:0{role.upper()}")


def _boot(phase: str, run_dir: Path, env: str = "", nics: Path | None = None
          ) -> list[GuestResult]:
    specs = [GuestSpec(role, ctrl, f"{env} sh /ntb_pair.sh {role} {phase}".strip(),
                       qemu_args=_virtio_nic(nics, role, peer) if nics else (),
                       cue=pair_cue(role, phase))
             for role, peer, ctrl in zip(PAIR_ROLES, PAIR_ROLES[::-1], CONTROLLERS,
                                         strict=True)]
    results = boot_guests(specs, server_args=SERVER_ARGS, timeout=600, run_dir=run_dir,
                          files={"ntb_pair.sh": NTB_PAIR, "tap_lib.sh": TAP_LIB})
    for spec, r in zip(specs, results, strict=True):
        if not r.ok:
            raise BenchError(f"ntb-pair {phase}, guest {spec.label}: "
                             f"{r.error or f'exit {r.exit_status}'}; run dir {r.run_dir}\n"
                             f"{r.output[-2000:]}")
    return results


def host_memcpy_mb_s(size: int, reps: int = 5) -> float:
    """A plain copy of ``size`` bytes between two buffers of this process."""
    src, dst = bytearray(size), bytearray(size)
    dst[:] = src  # warm-up: fault the pages in
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        dst[:] = src
        times.append(time.perf_counter() - start)
    return size / median(times) / 1e6


def run(pings: int = 200) -> Result:
    started = time.monotonic()
    top = Path(tempfile.mkdtemp(prefix="vfio-ep-bench-pair-"))
    nics = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
    try:
        a, b = _boot("bench", top / "bench", f"BENCH_PINGS={pings}", nics)
        perf = _boot("perf", top / "perf", f"PERF_ORDER={PERF_ORDER}")[0]
    finally:
        shutil.rmtree(nics, ignore_errors=True)
    rows = []
    rtts = {net: [float(t) for n, t in _PING.findall(a.output) if n == net]
            for net in ("virtio", "ntb")}
    for net, times in rtts.items():
        if len(times) < pings * 0.9:
            raise BenchError(f"ntb-pair: {len(times)} of {pings} {net} ping replies; run dir "
                             f"{top}")
    base = rtts["virtio"]
    for net, times in rtts.items():
        rows.append({"measure": f"ping a -> b, {net}", "value": median(times), "unit": "ms",
                     "p99": percentile(times, 0.99),
                     "ratio": ratio(median(times), median(base))})
    transfers = {net: int(n) / float(s) / 1e6 for net, n, s in _TRANSFER.findall(b.output)
                 if int(n) == 16 * MIB}  # b timed them, from the connection to the EOF
    if set(transfers) != {"ntb", "virtio"}:
        raise BenchError(f"ntb-pair: transfers measured: {sorted(transfers)}; run dir {top}")
    memcpy = host_memcpy_mb_s(16 * MIB)
    rows.append({"measure": "host memcpy 16 MiB", "value": memcpy, "unit": "MB/s",
                 "ratio": 1.0})
    for net in ("virtio", "ntb"):
        rows.append({"measure": f"TCP a -> b 16 MiB, {net}", "value": transfers[net],
                     "unit": "MB/s", "ratio": ratio(transfers[net], memcpy),
                     "vs_virtio": ratio(transfers[net], transfers["virtio"])})
    copied = _PERF.search(perf.output)
    if copied is None:
        raise BenchError(f"ntb-pair: ntb_perf printed no result; run dir {top}")
    perf_rate = int(copied[1]) / int(copied[2])  # bytes/us = MB/s
    rows.append({"measure": f"ntb_perf a -> b {1 << PERF_ORDER >> 20} MiB", "value": perf_rate,
                 "unit": "MB/s", "ratio": ratio(perf_rate, memcpy),
                 "vs_virtio": ratio(perf_rate, transfers["virtio"])})
    shutil.rmtree(top, ignore_errors=True)
    return Result(
        "ntb-pair", "two guests over pci-epf-ntb vs over virtio-net, and throughput",
        "virtio-net between the same two guests (ping); a host memcpy (throughput)",
        [Column("measure", "measure"), Column("value", "value", "{:,.2f}"),
         Column("unit", "unit"), Column("p99", "p99 ms", "{:,.2f}"),
         Column("ratio", "vs baseline", "{:,.3g}x"),
         Column("vs_virtio", "vs virtio TCP", "{:,.3g}x")],
        rows, {"pings": pings, "perf_order": PERF_ORDER},
        [f"{pings} pings every 50 ms after 10 warm-up pings, busybox ping's per-reply times; "
         "TCP is busybox nc, 16 MiB of zeros, timed by receiver b from the connection to the "
         "sender's EOF (/proc/uptime, 10 ms).",
         "virtio-net: each guest's NIC on a QEMU dgram netdev, the two joined by UNIX "
         "sockets; both guests TCG on the same 2 cores as the server.",
         "Target (issue 10): NTB ping within 1.5x of virtio-net."],
        time.monotonic() - started)
