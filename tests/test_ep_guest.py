"""Acceptance: the kernel's own endpoint code in an EP guest on vfio-ep's controller.

The EP guest loads vfio-ep's EPC driver (qemu/kernel/epc) and Linux's pci-epf-test, runs a
board's configfs script and starts the controller; the RC guest's upstream kselftest then
runs against that function, as it would against a board.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vfio_ep_cli import KSELFTEST_CASES, readme_example, vfio_ep_run

pytestmark = pytest.mark.guest

# The kselftest's own skips on this function: BAR0 is its register space (no subrange test
# there), and MSI-X vector 33 is beyond the 32 the setup script asks for.
UPSTREAM_SKIPS = {"pci_ep_bar.BAR0.BAR_SUBRANGE_TEST", "pci_ep_basic.MSIX_TEST"}
# pci-ep-msi.c on an EPC without a platform MSI domain (an x86 guest has no DT), then the
# embedded doorbell: the two lines the seeds' RK3588 and R-Car logs show.
SEED_DOORBELL_LINES = ("Can't find MSI domain for EPC",
                       "Using embedded (DMA) doorbell fallback")


def _statuses(results: dict) -> dict[str, str]:
    return {t["name"]: t["status"] for t in results["tests"]}


def test_linux_pci_epf_test_in_the_ep_guest_passes_the_kselftest(tmp_path: Path) -> None:
    proc, results = vfio_ep_run(tmp_path, *readme_example("vfio-ep run --ep-guest")[1:])
    statuses = _statuses(results)
    failed = {n: s for n, s in statuses.items() if s not in ("pass", "skip")}
    assert not failed, f"{failed}\n{proc.stdout[-5000:]}"
    assert len(statuses) == KSELFTEST_CASES, statuses
    assert {n for n, s in statuses.items() if s == "skip"} <= UPSTREAM_SKIPS
    assert proc.returncode == 0, proc.stderr[-3000:]
    dmesg = (tmp_path / "run" / "ep" / "dmesg.txt").read_text()
    for line in SEED_DOORBELL_LINES:
        assert line in dmesg, dmesg[-3000:]
    assert "vfio-ep-epc" in dmesg and "e65d0000.pcie-ep" in dmesg
    trace = (tmp_path / "run" / "trace.log").read_text()
    assert "ep-guest|" in trace and "guest" in trace and "ep   " in trace
