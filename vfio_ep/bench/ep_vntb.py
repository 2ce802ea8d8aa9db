"""ep-vntb: the seeds' vNTB ping with the kernel's vNTB on both sides (``run --ep-guest
--function pci-epf-vntb``), the embedded doorbell against polling, in one run.

The RC guest pings the EP guest's ntb_netdev (10.0.0.11, the seeds' address).  Each echo
request rings the EP's doorbell: with the eDMA's embedded doorbell the EP guest's
pci-epf-vntb hears it as an interrupt; on a SoC without the eDMA (``edma=0``) it finds it
at its next 5 ms poll (epf_ntb_cmd_handler), as the seeds' R-Car did before the doorbell
patches (0.9 ms with the doorbell, 4-12 ms polled: >= 4x).  The reply rings the RC's MSI
either way.  The baseline is the embedded doorbell measured in the same run (the ``ntb``
benchmark has the same ping against vfio-ep's Python pci-epf-vntb).
"""

from __future__ import annotations

import re
import time
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, ratio
from vfio_ep.bench.ntb import ping_stats
from vfio_ep.guest.ep_guest import EpGuestRun
from vfio_ep.guest.ep_ntb import boot_vntb_phase
from vfio_ep.guest.provision import provision_all
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.tail import tail

CONFIGS = (("embedded (the eDMA's)", ()), ("polled, 5 ms (edma=0)", ("edma=0",)))
SEED_RATIO = 4.0  # R-Car: 4-12 ms polled against 0.9 ms with the doorbell
_TIME = re.compile(r"^ntb ping: .*time=([\d.]+) ms", re.MULTILINE)
GUEST_TIMEOUT = 600


def run(count: int = 200) -> Result:
    started = time.monotonic()
    assets = provision_all()
    top = new_run_dir(None)
    rows: list[dict[str, Any]] = []
    for i, (label, sets) in enumerate(CONFIGS):
        run_ = EpGuestRun(sets, function="pci-epf-vntb")
        pair = boot_vntb_phase(run_, assets, top / f"{i}", "ping", timeout=GUEST_TIMEOUT,
                               env=(f"BENCH_PINGS={count}",))
        output = pair.rc.output if pair.rc else ""
        times = [float(t) for t in _TIME.findall(output)]
        if pair.error or len(times) < count * 0.9:
            raise BenchError(f"{label}: {len(times)} of {count} replies ({pair.error or ''}); "
                             f"run dir {top / str(i)}\n--- RC guest ---\n{tail(output)}\n"
                             f"--- EP guest ---\n{tail(pair.ep.output)}")
        rows.append({"doorbell": label, **ping_stats(times)})
    base = rows[0]
    for row in rows:
        row["ratio"] = ratio(row["median_ms"], base["median_ms"])
    return Result(
        "ep-vntb", "vNTB ping with the kernel's vNTB on both sides (RC guest -> EP guest)",
        "the embedded doorbell in the same run",
        [Column("doorbell", "EP doorbell"), Column("median_ms", "median ms", "{:,.2f}"),
         Column("p99_ms", "p99 ms", "{:,.2f}"),
         Column("ratio", "median vs embedded", "{:,.1f}x"),
         Column("replies", "replies")],
        rows, {"count": count, "run_dir": str(top)},
        [f"{count} pings every 50 ms after 10 warm-up pings, one pair of guests per row "
         "(TCG, the server and both QEMUs on one CPU); busybox ping's per-reply times.",
         f"The seeds on R-Car: 0.9 ms with the doorbell, 4-12 ms polled (>= {SEED_RATIO:g}x). "
         "Here only the request's direction polls (the reply is the RC's MSI) and a TCG "
         "round trip costs ~2 ms of its own, so the ratio is smaller than the board's."],
        time.monotonic() - started)
