"""ntb: the seeds' vNTB ping latency, per doorbell backend, in one run.

The guest pings the EP's built-in network peer over ntb_netdev / ntb_transport / ntb_hw_epf
against pci-epf-vntb, as the seeds measured on R-Car (0.9 ms with the interrupt doorbell,
4-12 ms polled every 5 ms).  Each echo request rings the EP's doorbell and the reply rings
the RC's MSI, so the round trip shows the RC->EP doorbell path.  The baseline is the MSI
doorbell measured in the same run; polling runs at the kernel's 5 ms period (pci-epf-vntb's
default) and at 1 ms.
"""

from __future__ import annotations

import re
import time
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, median, ratio, serve
from vfio_ep.epf.functions.pci_epf_vntb import CONTROLLER_DEFAULTS
from vfio_ep.guest.launcher import GUEST_MODULES, GuestBoot, boot_guest

PEER = "10.0.0.11"
FAST_POLL_US = 1000
CONFIGS = (
    ("msi", ("doorbell=msi",)),
    ("embedded", ("doorbell=embedded",)),
    (f"poll {CONTROLLER_DEFAULTS['doorbell_poll_interval_us']} us (kernel, default)",
     ("doorbell=poll",)),
    (f"poll {FAST_POLL_US} us", ("doorbell=poll", f"doorbell_poll_interval_us={FAST_POLL_US}")),
)
_TIME = re.compile(r"time=([\d.]+) ms")

SCRIPT = f"""set -e
insmod /{GUEST_MODULES}/ntb_transport.ko
insmod /{GUEST_MODULES}/ntb_netdev.ko
ip addr add 10.0.0.10/24 dev eth0
ip link set eth0 up
for i in $(seq 100); do grep -q 1 /sys/class/net/eth0/carrier && break; sleep 0.1; done
ping -c 10 -i 0.05 -W 5 {PEER} > /dev/null
ping -c {{count}} -i {{interval}} -W 5 {PEER}
"""


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))]


def ping_stats(times: list[float]) -> dict[str, float]:
    """A row's numbers from busybox ping's per-reply times (ms)."""
    return {"median_ms": median(times), "p99_ms": percentile(times, 0.99),
            "replies": len(times)}


def run(count: int = 200, interval: float = 0.05) -> Result:
    started = time.monotonic()
    rows: list[dict[str, Any]] = []
    for label, sets in CONFIGS:
        with serve(("ntb_client=netdev", *sets), function="pci-epf-vntb") as server:
            result = boot_guest(GuestBoot(SCRIPT.format(count=count, interval=interval),
                                          socket=server.socket), timeout=300)
            log = server.log_tail()
        times = [float(t) for t in _TIME.findall(result.output)]
        if not result.ok or len(times) < count * 0.9:
            raise BenchError(f"{label}: {len(times)} of {count} replies ({result.error or ''});"
                             f" run dir {result.run_dir}\n{result.output[-2000:]}\n{log}")
        rows.append({"backend": label, **ping_stats(times)})
    base = rows[0]
    for row in rows:
        row["ratio_median"] = ratio(row["median_ms"], base["median_ms"])
        row["ratio_p99"] = ratio(row["p99_ms"], base["p99_ms"])
    return Result(
        "ntb", "vNTB ping round trip over ntb_netdev (guest -> EP's network peer)",
        "the MSI doorbell in the same run",
        [Column("backend", "doorbell"), Column("median_ms", "median ms", "{:,.2f}"),
         Column("p99_ms", "p99 ms", "{:,.2f}"), Column("ratio_median", "median vs msi",
                                                         "{:,.1f}x"),
         Column("ratio_p99", "p99 vs msi", "{:,.1f}x"), Column("replies", "replies")],
        rows, {"count": count, "interval": interval},
        [f"{count} pings every {interval * 1000:.0f} ms after 10 warm-up pings, one guest per "
         "backend (TCG); busybox ping's per-reply times.",
         "The seeds on R-Car: 0.9 ms with the interrupt doorbell, 4-12 ms polled (5 ms)."],
        time.monotonic() - started)
