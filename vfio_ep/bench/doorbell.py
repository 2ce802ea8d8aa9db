"""doorbell: the in-guest doorbell round trip per backend, vs an in-QEMU MMIO read.

A static C program in the guest (guest/epbench.c) owns pci-epf-test through VFIO no-IOMMU
(userspace needs the MSI-X on an eventfd, which pci_endpoint_test's ioctls do not expose),
enables the doorbell, then N times rings it and waits for the MSI-X: ring -> QEMU -> posted
REGION_WRITE -> doorbell backend on the EP side -> pci-epf-test's handler -> MSI-X -> QEMU ->
guest interrupt -> eventfd.  The floor is the same guest reading a register of a device QEMU
emulates in-process (ivshmem-plain BAR0): the cheapest a device access can be under TCG.
"""

from __future__ import annotations

import re
import time
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, guest_programs, ratio, serve
from vfio_ep.epc.core import PciEpcAttributes
from vfio_ep.epf.functions.pci_epf_test import PciEpfTestAttributes
from vfio_ep.guest.launcher import GuestResult, boot_guest
from vfio_ep.tail import tail

BACKENDS = ("msi", "embedded", "poll")
IVSHMEM = ["-object", "memory-backend-memfd,id=ivmem,size=1M,share=on",
           "-device", "ivshmem-plain,memdev=ivmem"]
PROGRAM = "epbench"
_RESULT = re.compile(r"^RESULT (\S+) (.*)$", re.MULTILINE)

# Find pci-epf-test, hand it from pci_endpoint_test to vfio-pci (no-IOMMU mode: the guest
# has no IOMMU, and the program only does MMIO and interrupts, no DMA).
VFIO_PRELUDE = """set -e
BDF=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor):$(cat $d/device)" = "{vendor:#06x}:{device:#06x}" ]; then
    BDF=${{d##*/}}
  fi
done
if [ -z "$BDF" ]; then echo "no pci-epf-test device"; exit 1; fi
echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode
if [ -e /sys/bus/pci/devices/$BDF/driver ]; then
  echo $BDF > /sys/bus/pci/devices/$BDF/driver/unbind
fi
echo vfio-pci > /sys/bus/pci/devices/$BDF/driver_override
echo $BDF > /sys/bus/pci/drivers_probe
echo "pci-epf-test $BDF: $(basename $(readlink /sys/bus/pci/devices/$BDF/driver))"
"""


def vfio_prelude() -> str:
    a = PciEpfTestAttributes()
    return VFIO_PRELUDE.format(vendor=a.vendorid, device=a.deviceid)


def parse_results(output: str) -> dict[str, dict[str, Any]]:
    """``RESULT name k=v ...`` lines -> {name: {k: float or str}}."""
    found: dict[str, dict[str, Any]] = {}
    for name, rest in _RESULT.findall(output):
        fields: dict[str, Any] = {}
        for item in rest.split():
            key, _, value = item.partition("=")
            try:
                fields[key] = float(value)
            except ValueError:
                fields[key] = value
        found[name] = fields
    return found


def run_guest(script: str, sets: list[str], *, timeout: float = 300,
              extra_qemu_args: list[str] | None = None, live: Any = None,
              on_server: Any = None) -> GuestResult:
    """Boot a guest with the programs in its initramfs against a fresh server (``sets``);
    ``on_server`` gets the server before the guest boots (the idle benchmark wants its pid)."""
    programs = guest_programs()
    with serve(sets) as server:
        if on_server is not None:
            on_server(server)
        result = boot_guest(script, server_args=[], socket=server.socket, timeout=timeout,
                            extra_files={f"/{k}": v for k, v in programs.items()},
                            extra_qemu_args=extra_qemu_args or [], live=live)
        log = server.log_tail()
    if not result.ok:
        raise BenchError(f"guest failed ({result.error or result.exit_status}); run dir "
                         f"{result.run_dir}\n--- guest ---\n{tail(result.output)}\n"
                         f"--- server ---\n{log}")
    return result


def run(n: int = 2000, n_mmio: int = 20000, backends: tuple[str, ...] = BACKENDS) -> Result:
    started = time.monotonic()
    rows = []
    runs = {}
    for backend in backends:
        script = (vfio_prelude() + f"/{PROGRAM} mmio {n_mmio}\n"
                  f"/{PROGRAM} doorbell {n} $BDF\n")
        result = run_guest(script, [f"doorbell={backend}"], extra_qemu_args=IVSHMEM)
        got = parse_results(result.output)
        try:
            ring, floor = got["doorbell-round-trip"], got["ivshmem-mmio-read"]
            reg = got["epf-register-read"]
        except KeyError as e:
            raise BenchError(f"{backend}: no {e} result in the guest output:\n"
                             f"{tail(result.output)}") from None
        runs[backend] = str(result.run_dir)
        rows.append({"backend": backend,
                     "median_us": ring["median_ns"] / 1e3, "p99_us": ring["p99_ns"] / 1e3,
                     "floor_median_us": floor["median_ns"] / 1e3,
                     "floor_p99_us": floor["p99_ns"] / 1e3,
                     "ratio_median": ratio(ring["median_ns"], floor["median_ns"]),
                     "ratio_p99": ratio(ring["p99_ns"], floor["p99_ns"]),
                     "reg_read_us": reg["median_ns"] / 1e3, "ring_via": ring["via"]})
    poll_us = PciEpcAttributes.doorbell_poll_interval_us
    notes = [f"{n} rings per backend after 20 warm-up rings; floor: {n_mmio} reads of "
             "ivshmem-plain BAR0 in the same guest (TCG); rdtsc-timed in the guest.",
             "register read: a pci-epf-test STATUS read from the same guest, one non-posted "
             "vfio-user round trip, for scale.",
             f"poll backend at the default doorbell_poll_interval_us={poll_us}."]
    return Result(
        "doorbell", "in-guest doorbell round trip (ring -> MSI-X on an eventfd)",
        "ivshmem-plain BAR0 MMIO read in the same guest",
        [Column("backend", "backend"), Column("median_us", "median us", "{:,.1f}"),
         Column("p99_us", "p99 us", "{:,.1f}"),
         Column("floor_median_us", "floor median us", "{:,.2f}"),
         Column("floor_p99_us", "floor p99 us", "{:,.2f}"),
         Column("ratio_median", "median vs floor", "{:,.0f}x"),
         Column("ratio_p99", "p99 vs floor", "{:,.0f}x"),
         Column("reg_read_us", "register read us", "{:,.1f}")],
        rows, {"n": n, "n_mmio": n_mmio, "backends": list(backends), "run_dirs": runs},
        notes, time.monotonic() - started)


