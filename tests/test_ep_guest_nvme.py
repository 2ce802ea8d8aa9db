"""Acceptance: the kernel's NVMe endpoint target, nvmet-pci-epf, in the EP guest.

The EP guest sets up an nvmet subsystem on a memory-backed null_blk and a ``pci`` port and
binds nvmet-pci-epf to vfio-ep's controller (the kernel's documented steps); the RC guest's
stock nvme driver binds the function, 64 MiB go through it both ways, and after the RC's
reboot (a new RC guest: PERST# and link down for the EP) the data is still there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from vfio_ep_cli import assert_passed, readme_example, vfio_ep_run

pytestmark = pytest.mark.guest

TESTS = ["nvme.first.bound", "nvme.first.model", "nvme.first.write_64mib",
         "nvme.first.read_back_64mib", "nvme.again.bound", "nvme.again.survives_reboot"]


def test_the_rcs_nvme_driver_uses_linux_nvmet_pci_epf_in_the_ep_guest(tmp_path: Path) -> None:
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --function nvmet-pci-epf")[1:])
    assert_passed(proc, results, TESTS)
    metrics = {t["name"]: t["metrics"] for t in results["tests"]}
    assert metrics["nvme.first.write_64mib"]["write_mb_s"] > 0, metrics
    assert metrics["nvme.first.read_back_64mib"]["read_mb_s"] > 0, metrics
    ep_dmesg = (tmp_path / "run" / "ep" / "dmesg.txt").read_text()
    for line in ('New PCI ctrl "nvmepf.0.nqn"', "Enabling controller", "PCI link down"):
        assert line in ep_dmesg, ep_dmesg[-3000:]
    assert "falling back to MMIO" not in ep_dmesg  # DMA: the eDMA's slave channels
    rc_dmesg = (tmp_path / "run" / "rc" / "dmesg.txt").read_text()
    assert "nvme nvme0: pci function" in rc_dmesg
    trace = (tmp_path / "run" / "trace.log").read_text()
    assert re.search(r"ep-guest *\|", trace) and re.search(r"rc2-guest *\|", trace)
