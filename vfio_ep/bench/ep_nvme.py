"""ep-nvme: the kernel's nvmet-pci-epf in an EP guest (``run --ep-guest --function
nvmet-pci-epf``) as the RC guest's NVMe drive, against QEMU's own emulated ``nvme`` device
in the same RC guest, in one run.

The RC guest has both: the EP guest's function (``Linux-pci-epf``: every command through
vfio-ep, the data moved by the EP guest's nvmet through the eDMA's slave channels, a
memory-backed null_blk behind it) and QEMU's nvme device on a file (``QEMU NVMe Ctrl``).
Each gets the same sequential direct I/O, 1 MiB a request (split at the target's 512 KiB
mdts), written then read; the ratio is QEMU's time over ours (above 1: ours is slower).
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import time
from typing import Any

from vfio_ep.bench.common import BenchError, Column, Result, ratio
from vfio_ep.guest.ep_guest import EpGuestRun, boot_ep_pair
from vfio_ep.guest.ep_nvme import RC_FIRMWARE
from vfio_ep.guest.provision import provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.tail import tail

MIB = 1 << 20
GUEST_TIMEOUT = 900
_LINE = re.compile(r"^nvme bench: (\S+) (write|read) ([\d.]+) s$", re.MULTILINE)

SCRIPT = """set -e
MIB=$1
t() { cut -d' ' -f1 /proc/uptime; }
for c in /sys/class/nvme/nvme*; do
	model=$(sed 's/ *$//' $c/model)
	case "$model" in "Linux-pci-epf") kind=ep ;; "QEMU NVMe Ctrl") kind=qemu ;; *) continue ;; esac
	d=/dev/${c##*/}n1
	for i in $(seq 100); do [ -b $d ] && break; sleep 0.1; done
	dd if=/dev/zero of=$d bs=1M count=8 oflag=direct 2>/dev/null  # warm-up
	for op in write read; do
		a=$(t)
		if [ $op = write ]; then dd if=/dev/zero of=$d bs=1M count=$MIB oflag=direct 2>/dev/null
		else dd if=$d of=/dev/null bs=1M count=$MIB iflag=direct 2>/dev/null; fi
		echo "nvme bench: $kind $op $(awk -v a=$a -v b=$(t) 'BEGIN { print b - a }') s"
	done
done
"""


def run(mib: int = 64) -> Result:
    started = time.monotonic()
    top = new_run_dir(None)
    image = top / "qemu-nvme.img"
    with image.open("wb") as f:
        f.truncate(4 * mib * MIB)
    rc_options = dataclasses.replace(DEFAULT_OPTIONS, qemu_args=(
        *RC_FIRMWARE, "-drive", f"file={image},if=none,id=nvq,format=raw,cache=writeback",
        "-device", "nvme,drive=nvq,serial=vfio-ep-bench"))
    pair = boot_ep_pair(EpGuestRun(function="nvmet-pci-epf"), provision_all(), top,
                        f"sh -c {shlex.quote(SCRIPT)} nvme-bench {mib}",
                        timeout=GUEST_TIMEOUT, rc_options=rc_options)
    output = pair.rc.output if pair.rc else ""
    seconds = {(kind, op): float(s) for kind, op, s in _LINE.findall(output)}
    if pair.error or len(seconds) != 4:
        raise BenchError(f"nvme bench: {pair.error or 'results missing'}; run dir {top}\n"
                         f"--- RC guest ---\n{tail(output)}\n--- EP guest ---\n"
                         f"{tail(pair.ep.output)}")
    rows: list[dict[str, Any]] = []
    for op in ("write", "read"):
        ep, qemu = seconds["ep", op], seconds["qemu", op]
        rows.append({"case": f"sequential {op}, {mib} MiB", "mb_s": mib * MIB / ep / 1e6,
                     "baseline_mb_s": mib * MIB / qemu / 1e6, "ratio": ratio(ep, qemu)})
    return Result(
        "ep-nvme", "nvmet-pci-epf in an EP guest as the RC guest's NVMe drive",
        "QEMU's emulated nvme device in the same RC guest",
        [Column("case", "case"), Column("mb_s", "nvmet-pci-epf MB/s", "{:,.1f}"),
         Column("baseline_mb_s", "QEMU nvme MB/s", "{:,.1f}"),
         Column("ratio", "time vs QEMU nvme", "{:,.1f}x")],
        rows, {"mib": mib, "run_dir": str(top)},
        [f"dd of {mib} MiB with O_DIRECT, 1 MiB a request, after an 8 MiB warm-up write; "
         "both devices in one RC guest (TCG), timed by /proc/uptime.",
         "nvmet-pci-epf: each command's doorbell is a trapped BAR0 write the EP guest's "
         "nvmet polls for, its data the eDMA's copy between the two guests' RAM, its "
         "completion an MSI-X from the EP guest; QEMU nvme: in QEMU's own process."],
        time.monotonic() - started)
