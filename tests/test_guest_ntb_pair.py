"""Acceptance: two guests joined by one pci-epf-ntb, with `vfio-ep run` as a user runs it.

One vfio-ep serves both controllers of the function; each guest binds its unmodified
ntb_hw_epf to its side and runs the same NTB client against the other guest, in step
(vfio_ep/guest/ntb_pair.sh): ntb_tool (link, scratchpads, every doorbell and the memory
window, both ways), ntb_pingpong (both counting), ntb_transport + ntb_netdev (ping -c 100
with no loss each way, 64 MiB with equal checksums, one guest unbinding and rebinding
ntb_hw_epf: both links go down and come back, ping again), ntb_perf a -> b (b's link goes
down when a's QEMU is gone), and b's QEMU going away mid-session and b booting again (a's
link goes down, not hung, and comes back; both carry on).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vfio_ep_cli import REPO, assert_passed, readme_example, vfio_ep_run

from vfio_ep.guest.runner import TRANSPORT_LOADED

pytestmark = pytest.mark.guest

TOOL = ("driver_bound", "link_up")
SUITE = {  # phase: the tests of a, b (and b booting again), in order
    "tool": {r: (*TOOL, "spads_both_ways", "doorbells_14_both_ways", "mw_both_ways")
             for r in "ab"},
    "pingpong": {r: ("driver_bound", "pingpong_counts") for r in "ab"},
    "perf": {"a": ("driver_bound", "perf_run"), "b": ("driver_bound", "peer_left")},
    "netdev": {r: ("driver_bound", "netdev_link_up", "ping_100", "transfer_64mib",
                   "link_down", "relink_up", "ping_after_relink") for r in "ab"},
    "rejoin": {"a": (*TOOL, "spads_both_ways", "peer_gone", "peer_back",
                     "spads_after_rejoin"),
               "b": (*TOOL, "spads_both_ways"), "b2": (*TOOL, "spads_after_rejoin")},
}


def names(phase: str, suite: dict[str, dict[str, tuple[str, ...]]] = SUITE) -> list[str]:
    return [f"{label}.{phase}.{t}" for label, tests in suite[phase].items() for t in tests]


def test_ntb_pair_suite(tmp_path: Path) -> None:
    proc, results = vfio_ep_run(tmp_path, *readme_example("vfio-ep run --topology ntb-pair")[1:])
    assert_passed(proc, results, [n for phase in SUITE for n in names(phase)])
    measured = {t["name"]: t["metrics"] for t in results["tests"]}
    assert measured["a.perf.perf_run"]["bytes"] == 1 << 22  # ntb_perf's total_order 22
    assert measured["a.perf.perf_run"]["mbytes_s"] > 0
    for label in "ab":  # each pinged the other
        assert {"rtt_first_ms", "rtt_avg_ms", "rtt_mdev_ms"} <= set(
            measured[f"{label}.netdev.ping_100"])
    log = (tmp_path / "run" / "netdev" / "server.log").read_text()
    assert "serving controller ep0: func1 (pci_epf_ntb) 104c:b00d" in log
    # b boots once a has loaded ntb_transport (runner.pair_cue): a's trace (its lines and
    # the server's, in time order) has b's QEMU connect after it.
    trace = (tmp_path / "run" / "netdev" / "a" / "trace.log").read_text().splitlines()
    loaded = next(i for i, line in enumerate(trace)
                  if line.endswith(f"guest| {TRANSPORT_LOADED}"))
    connected = [i for i, line in enumerate(trace) if line.endswith(" connected")]
    assert len(connected) == 2 and connected[0] < loaded < connected[1]
    assert "serving controller ep1: func1 (pci_epf_ntb) 104c:b00d" in log


def test_the_kernels_ntb_howto(tmp_path: Path) -> None:
    """pci-ntb-howto.rst's configfs steps (db_count 4: two doorbells, two 1 MiB windows)."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --configfs tests/data/howto-ntb-setup.sh -- tool")[1:], cwd=REPO)
    tool = (*TOOL, "spads_both_ways", "doorbells_2_both_ways", "mw_both_ways")
    assert_passed(proc, results, names("tool", {"tool": {r: tool for r in "ab"}}))
