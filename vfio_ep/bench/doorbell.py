"""doorbell: the in-guest doorbell round trip per backend, vs an in-QEMU MMIO read.

A static C program in the guest (guest/epbench.c) owns pci-epf-test through VFIO no-IOMMU
(userspace needs the MSI-X on an eventfd, which pci_endpoint_test's ioctls do not expose),
enables the doorbell, then N times rings it and waits for the MSI-X: ring -> QEMU -> posted
REGION_WRITE -> doorbell backend on the EP side -> pci-epf-test's handler -> MSI-X -> QEMU ->
guest interrupt -> eventfd.  The floor is the same guest reading a register of a device QEMU
emulates in-process (ivshmem-plain BAR0): the cheapest a device access can be under TCG.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vfio_ep.bench.common import (
    HERE,
    BenchError,
    Column,
    Result,
    Server,
    build_c,
    guest_programs,
    ratio,
    serve,
)
from vfio_ep.epc.core import PciEpcAttributes
from vfio_ep.epf.functions.pci_epf_test import PciEpfTestAttributes
from vfio_ep.guest.launcher import GuestBoot, GuestResult, boot_guest
from vfio_ep.guest.qemu_cmdline import vfio_user_device
from vfio_ep.tail import tail

BACKENDS = ("msi", "embedded", "poll")
IVSHMEM = ["-object", "memory-backend-memfd,id=ivmem,size=1M,share=on",
           "-device", "ivshmem-plain,memdev=ivmem"]
PROGRAM = "epbench"
REF_PORT = "rp-ref"
# The reference device's IDs (refserver.c)
REF_VENDOR, REF_DEVICE = 0x1B36, 0x10F0
_RESULT = re.compile(r"^RESULT (\S+) (.*)$", re.MULTILINE)

# Find a device by vendor:device and hand it to vfio-pci (no-IOMMU mode: the guest has no
# IOMMU, and the programs only do MMIO and interrupts, no DMA); its address in $<var>.
VFIO_BIND = """set -e
{var}=
for d in /sys/bus/pci/devices/*; do
  if [ "$(cat $d/vendor):$(cat $d/device)" = "{vendor:#06x}:{device:#06x}" ]; then
    {var}=${{d##*/}}
  fi
done
if [ -z "${var}" ]; then echo "no {what} device"; exit 1; fi
echo 1 > /sys/module/vfio/parameters/enable_unsafe_noiommu_mode
if [ -e /sys/bus/pci/devices/${var}/driver ]; then
  echo ${var} > /sys/bus/pci/devices/${var}/driver/unbind
fi
echo vfio-pci > /sys/bus/pci/devices/${var}/driver_override
echo ${var} > /sys/bus/pci/drivers_probe
echo "{what} ${var}: $(basename $(readlink /sys/bus/pci/devices/${var}/driver))"
"""


def vfio_bind(var: str, vendor: int, device: int, what: str) -> str:
    """Guest shell lines binding the device ``vendor:device`` to vfio-pci, its BDF in $var."""
    return VFIO_BIND.format(var=var, vendor=vendor, device=device, what=what)


def vfio_prelude() -> str:
    """pci-epf-test bound to vfio-pci, its address in $BDF."""
    a = PciEpfTestAttributes()
    return vfio_bind("BDF", a.vendorid, a.deviceid, "pci-epf-test")


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
              on_server: Any = None, fastpath: bool = True,
              reference: bool = False) -> GuestResult:
    """Boot a guest with the programs in its initramfs against a fresh server (``sets``);
    ``on_server`` gets the server before the guest boots (the idle benchmark wants its pid).
    ``reference``: the C reference server's device beside it (:func:`reference_server`)."""
    programs = guest_programs()
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(serve(sets, fastpath=fastpath))
        extra = list(extra_qemu_args or [])
        if reference:
            extra += reference_device_args(stack.enter_context(reference_server()).socket)
        if on_server is not None:
            on_server(server)
        result = boot_guest(GuestBoot(script, socket=server.socket,
                                      files={f"/{k}": v for k, v in programs.items()},
                                      qemu_args=tuple(extra), live=live), timeout)
        log = server.log_tail()
    if not result.ok:
        raise BenchError(f"guest failed ({result.error or result.exit_status}); run dir "
                         f"{result.run_dir}\n--- guest ---\n{tail(result.output)}\n"
                         f"--- server ---\n{log}")
    return result


@contextlib.contextmanager
def reference_server() -> Iterator[Server]:
    """The C reference vfio-user server (refserver.c) on its own socket."""
    with serve(argv=[str(build_c(HERE / "refserver.c"))]) as server:
        yield server


def reference_device_args(socket: Path) -> list[str]:
    """QEMU arguments adding the reference server's device behind a root port of its own,
    attached the way ``run`` attaches vfio-ep's."""
    return ["-device", f"pcie-root-port,id={REF_PORT},bus=pcie.0,chassis=2",
            "-device", json.dumps(vfio_user_device(socket, device_id="ref", bus=REF_PORT))]


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


