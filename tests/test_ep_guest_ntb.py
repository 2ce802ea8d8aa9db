"""Acceptance: the kernel's NTB on both sides, pci-epf-vntb in the EP guest.

The EP guest runs Linux's own pci-epf-vntb on vfio-ep's controller; the RC guest's
ntb_hw_epf drives it.  Both run ntb_tool, ntb_pingpong and ntb_transport + ntb_netdev
against each other (ntb_pair.sh), and the RC pings the EP at the seeds' 10.0.0.11.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from vfio_ep_cli import assert_passed, readme_example, shell_session, vfio_ep_run

pytestmark = pytest.mark.guest

PHASES = {  # each side's tests, in order: the RC's (rc), then the EP guest's (ep)
    "tool": ("driver_bound", "link_up", "spads_both_ways", "doorbells_2_both_ways",
             "mw_both_ways"),
    "pingpong": ("driver_bound", "pingpong_counts"),
    "netdev": ("driver_bound", "netdev_link_up", "ping_100", "transfer_64mib", "link_down",
               "relink_up", "ping_after_relink"),
}


def names(*phases: str) -> list[str]:
    return [f"{side}.{phase}.{t}" for phase in phases for side in ("rc", "ep")
            for t in PHASES[phase]]


def test_the_seeds_vntb_block_runs_verbatim_in_the_ep_guest(tmp_path: Path) -> None:
    """The seeds' configfs block in the EP guest's shell, as written: its stray ``[*]``
    makes the shell write ``4 [*]`` to db_bar, which the kernel refuses, as a board's would;
    the run names that line and goes on, and every phase passes on both sides."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --configfs tests/data/seed-vntb-setup.sh --preset rcar-s4")[1:])
    assert_passed(proc, results, names(*PHASES))
    facts = results["endpoint"]
    assert facts["setup_refused"] == [
        "line 14: echo 4 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/db_bar [*]: "
        "sh: write error: Invalid argument"], facts
    assert "line 14: echo 4 > " in proc.stderr
    assert facts["doorbell"] == "embedded (the eDMA's)", facts
    ping = next(t for t in results["tests"] if t["name"] == "rc.netdev.ping_100")
    assert ping["metrics"]["replies"] == 100 and ping["metrics"]["rtt_avg_ms"] > 0, ping
    rc = (tmp_path / "run" / "netdev" / "rc" / "console.log").read_text()
    assert "# 100 of 100 answered by 10.0.0.11" in rc  # the seeds' address of the EP
    ep_dmesg = (tmp_path / "run" / "netdev" / "ep" / "dmesg.txt").read_text()
    assert "pci-vntb" in ep_dmesg and "eth0 created" in ep_dmesg, ep_dmesg[-3000:]
    trace = (tmp_path / "run" / "netdev" / "trace.log").read_text()
    assert "ep-guest|" in trace and "guest" in trace


def test_vntb_polls_where_the_soc_has_no_embedded_doorbell(tmp_path: Path) -> None:
    """Without the eDMA there is no doorbell to allocate: pci-epf-vntb polls its doorbell
    BAR every 5 ms (epf_ntb_cmd_handler), and the netdev still carries everything."""
    proc, results = vfio_ep_run(tmp_path, "--ep-guest", "--function", "pci-epf-vntb",
                                "--set", "edma=0", "--", "netdev")
    assert_passed(proc, results, names("netdev"))
    assert results["endpoint"]["doorbell"] == "none: the function polls", results["endpoint"]
    assert "setup_refused" not in results["endpoint"]


def test_an_old_rc_meets_a_new_ep(tmp_path: Path) -> None:
    """Seed 003's old and new peers: 6.12's ntb_hw_epf (a module there, with the i.MX8 IDs
    and not R-Car's) in the RC guest, 7.3's pci-epf-vntb in the EP guest."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --linux 6.12 --ep-linux 7.3 --function pci-epf-vntb "
        "--preset imx8")[1:])
    assert_passed(proc, results, names(*PHASES))
    assert (results["endpoint"]["linux"], results["endpoint"]["ep_linux"]) == ("6.12", "7.3")
    rc_dmesg = (tmp_path / "run" / "netdev" / "rc" / "dmesg.txt").read_text()
    assert "Linux version 6.12" in rc_dmesg and "ntb_hw_epf" in rc_dmesg, rc_dmesg[-2000:]


BRIDGE_PHASES = {  # pci-epf-ntb between two RC guests: each phase's a tests, then b's
    "tool": {r: PHASES["tool"] for r in "ab"},
    "pingpong": {r: PHASES["pingpong"] for r in "ab"},
    "perf": {"a": ("driver_bound", "perf_run"), "b": ("driver_bound", "peer_left")},
    "netdev": {r: PHASES["netdev"] for r in "ab"},
}


def test_linux_pci_epf_ntb_in_the_ep_guest_joins_two_rc_guests(tmp_path: Path) -> None:
    """pci-ntb-howto.rst's setup in one EP guest holding two of vfio-ep's controllers (on
    the J721E profile the function is TI's for: its MSI-X doorbells need the nonzero align),
    pci-epf-ntb bound primary and secondary, two RC guests' ntb_hw_epf talking through it:
    doorbells ring the other host's MSI-X vectors, every phase passes on both."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --function pci-epf-ntb")[1:])
    assert_passed(proc, results, [f"{role}.{phase}.{t}" for phase, roles in BRIDGE_PHASES.items()
                                  for role, tests in roles.items() for t in tests])
    facts = results["endpoint"]
    assert "2900000.pcie-ep: j721e" in facts["controllers"], facts
    assert "2910000.pcie-ep: j721e" in facts["controllers"], facts
    perf = next(t for t in results["tests"] if t["name"] == "a.perf.perf_run")
    assert perf["metrics"]["mbytes_s"] > 0, perf
    ep_dmesg = (tmp_path / "run" / "tool" / "ep" / "dmesg.txt").read_text()
    assert "Oops" not in ep_dmesg and "BUG" not in ep_dmesg, ep_dmesg[-3000:]
    server_log = (tmp_path / "run" / "tool" / "server.log").read_text()
    assert "raises no MSI-X vector" not in server_log
    trace = (tmp_path / "run" / "netdev" / "trace.log").read_text()
    for label in ("a", "b", "ep"):
        assert f"{label}-guest" in trace, trace[:2000]


def test_an_ep_kernel_crash_in_pci_epf_ntb_bind_is_told_by_where(tmp_path: Path) -> None:
    """7.3.4's pci-epf-ntb on RK3588's controller: its bind fails (the peer-SPAD BAR under
    the 1 MiB a resizable BAR needs) and its error path frees the config BAR twice, an oops
    (README, Upstream bugs found).  The run says where the EP kernel crashed, and stops
    there rather than boot the same crash for every phase."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --function pci-epf-ntb --set profile=rk3588")[1:])
    assert proc.returncode == 1 and not results["passed"]
    said = " ".join(proc.stderr.split())
    assert ("the EP guest did not start its controller: BUG: unable to handle page fault"
            in said), proc.stderr[-3000:]
    assert "epf_ntb_config_spad_bar_free" in said and "pci_epf_unbind" in said
    assert [d.name for d in (tmp_path / "run").iterdir() if d.is_dir()] == ["tool"]


def test_an_ep_shell_on_vntb_pings_the_rc(tmp_path: Path) -> None:
    """--ep-shell on vNTB: before the shell, the RC guest's ntb_hw_epf has the function and
    both sides' ntb_netdev are up, so the EP guest's shell reaches the RC at 10.0.0.10
    through the kernel's own pci-epf-vntb; its exit status is the run's."""
    status, text = shell_session(
        [*readme_example("vfio-ep run --ep-guest --function pci-epf-vntb --ep-shell"),
         "--run-dir", str(tmp_path / "r")], "ping -c 3 10.0.0.10 && exit 4", 300)
    assert status == 4, text
    assert "the RC guest's driver has the function (ntb_hw_epf 0000:01:00.0, ntb_netdev at " \
        "10.0.0.10)" in text, text
    assert "3 packets received" in text, text
