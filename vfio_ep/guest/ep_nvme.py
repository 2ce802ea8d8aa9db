"""``vfio-ep run --ep-guest --function nvmet-pci-epf``: the kernel's NVMe endpoint target in
the EP guest, the RC guest's stock ``nvme`` driver against it.

The EP guest sets up an nvmet subsystem with one namespace (a memory-backed null_blk in its
RAM) and a ``pci`` port, and binds nvmet-pci-epf to the controller, as
Documentation/nvme/nvme-pci-endpoint-target.rst does (``--configfs SCRIPT`` replaces those
steps, verbatim).  Its DMA goes through the eDMA's slave channels (``dma_channels=slave``,
implied).  The RC guest's nvme driver binds the function; 64 MiB of random data are written
to ``nvme0n1`` and read back (``nvme_suite.sh first``).  Then that RC guest's QEMU goes and a
new one boots (link down and PERST# for the EP guest, as an RC's reboot on a board) and finds
the data (``nvme_suite.sh again``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from vfio_ep.guest.assets import NVME_SUITE, TAP_LIB
from vfio_ep.guest.ep_guest import EpGuestRun, boot_ep_pair, ep_facts
from vfio_ep.guest.interrupt import keeping
from vfio_ep.guest.provision import GuestAssets
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.runner import Progress, finish_suite
from vfio_ep.guest.trace import write_trace

NVME_MIB = 64  # what the RC writes and reads back
# The RC guests' firmware: QEMU's qboot, which boots the kernel and nothing else.  SeaBIOS
# would drive the NVMe function first and identify each of the 1024 namespace IDs nvmet
# reports (Identify Controller's NN): ~30 s of commands under TCG before the kernel starts.
RC_FIRMWARE = ("-bios", "qboot.rom")
FILES: dict[str, Path | bytes] = {"nvme_suite.sh": NVME_SUITE, "tap_lib.sh": TAP_LIB}


def run_nvme(run: EpGuestRun, assets: GuestAssets, top: Path, facts: dict[str, Any], *,
             timeout: float, options: GuestOptions = DEFAULT_OPTIONS) -> int:
    """The EP guest's target, then the RC guest's two boots; 0 only if every test passed."""
    progress = Progress(top, run.target(), "ep-nvme", facts,
                        running=[top / "rc", top / "rc2"])
    with keeping(progress.keep):
        rc_options = dataclasses.replace(options, qemu_args=(*options.qemu_args, *RC_FIRMWARE))
        pair = boot_ep_pair(run, assets, top, f"sh /nvme_suite.sh first {NVME_MIB}",
                            timeout=timeout, options=options, rc_options=rc_options,
                            rc_files=FILES,
                            rc_again=(f"sh /nvme_suite.sh again {NVME_MIB}",))
        progress.running = []
        progress.facts |= ep_facts(pair.ep, run.setup_script())
        if pair.rc is None:
            progress.failed.append(pair.error or "the RC guest never booted")
        else:
            rc = dataclasses.replace(pair.rc, server_log=pair.server_log)
            progress.finished(rc, "rc")
            again = {f"rc{boot}": r for boot, r in enumerate(pair.rc_again, 2)}
            for label, result in again.items():
                progress.finished(result, label)
            write_trace(rc, {"ep": pair.ep} | again, top)
            if pair.error:
                progress.failed.append(pair.error)
        return finish_suite(progress)
