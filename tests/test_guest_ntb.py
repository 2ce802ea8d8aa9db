"""Acceptance: a guest's ntb_hw_epf, ntb_tool, ntb_pingpong, ntb_transport and ntb_netdev
against pci-epf-vntb, with `vfio-ep run` exactly as a user runs it.

Each run boots one guest per EP-side client (tool, pingpong, netdev) and checks, from the
guest: ntb_hw_epf bound with the seeds' IDs, link up, scratchpads and every doorbell both
ways, memory-window data both ways byte for byte, ntb_pingpong counting, ntb_netdev
``ping -c 100`` with no loss, 16 MiB echoed over TCP with equal checksums, and the link
going down and up again across an unbind/rebind of ntb_hw_epf.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from vfio_ep_cli import REPO, assert_passed, readme_example, vfio_ep_run

from vfio_ep.guest.host import ensure_host_packages

pytestmark = pytest.mark.guest

SUITE = [f"tool.{t}" for t in ("hw_epf_bound", "tool_bound", "link_up", "spads_both_ways",
                               "doorbell_0", "doorbell_1", "mw_both_ways")] + [
    f"pingpong.{t}" for t in ("hw_epf_bound", "pingpong_bound", "pingpong_counts")] + [
    f"netdev.{t}" for t in ("hw_epf_bound", "netdev_link_up", "ping_100", "tcp_16mib_echo",
                            "unbind_takes_link_down", "rebind", "relink_up",
                            "ping_after_rebind")]


@pytest.mark.parametrize("sets", [
    ("doorbell=msi",),
    ("doorbell=embedded",),
    ("doorbell=poll",),
    ("controller=rk3588",),  # the eDMA doorbell pre-exposed in BAR4 = db_bar
    ("controller=rcar-s4",),  # no MSI controller: the embedded doorbell, BAR4 fixed 256 B
    # the i.MX8 preset: ntb_hw_epf's i.MX8 map (ctrl/db/mw1 in BARs 0/2/4), BARs 1/3/5 off
    ("--preset=imx8",),
], ids=lambda s: s[0])
def test_vntb_suite(tmp_path: Path, sets: tuple[str, ...]) -> None:
    args = [a for s in sets for a in ((s,) if s.startswith("--") else ("--set", s))]
    proc, results = vfio_ep_run(tmp_path, "--function", "pci-epf-vntb", *args)
    assert_passed(proc, results, SUITE)
    assert " INFO: " not in proc.stdout + proc.stderr  # the server's lines are in its log
    logs = "".join(p.read_text() for p in (tmp_path / "run").glob("*/server.log"))
    if sets == ("doorbell=poll",):
        assert "doorbell = poll: polling the doorbell BAR every 5000 us" in logs  # the kernel's
    else:  # an interrupt doorbell, in the BAR ntb_hw_epf's map rings
        assert f"doorbells in BAR{2 if '--preset=imx8' in sets else 4}" in logs


def test_the_seeds_configfs_setup_as_written(tmp_path: Path) -> None:
    """The seeds' configfs block, unmodified (the README's example, run from the checkout):
    the guest binds ntb_hw_epf to the result and the whole suite passes."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --configfs tests/data/seed-vntb-setup.sh")[1:], cwd=REPO)
    assert_passed(proc, results, SUITE)
    log = (tmp_path / "run" / "netdev" / "server.log").read_text()
    assert "serving controller e65d0000.pcie-ep: func1 (pci_epf_vntb) 1912:0030" in log


ECHO_SERVER = textwrap.dedent("""
    import socket, threading
    def echo(c):
        while data := c.recv(1 << 16):
            c.sendall(data)
        c.close()
    s = socket.create_server(("10.0.0.11", 7))
    while True:
        threading.Thread(target=echo, args=(s.accept()[0],), daemon=True).start()
""")


def test_netdev_bridged_to_a_tap_device_in_a_private_network_namespace(tmp_path: Path) -> None:
    """netdev = tap:NAME: the host kernel in a namespace of the test's own answers ping and
    TCP; no address is configured anywhere else."""
    ensure_host_packages(("iproute2", "util-linux"))  # ip, unshare
    (tmp_path / "echo.py").write_text(ECHO_SERVER)
    setup = (f"set -e; ip link set lo up; ip tuntap add dev ntb0 mode tap; "
             f"ip addr add 10.0.0.11/24 dev ntb0; ip link set ntb0 up; "
             f"{sys.executable} {tmp_path / 'echo.py'} & echo=$!; set +e; "
             f"\"$@\"; status=$?; kill $echo; exit $status")
    proc, results = vfio_ep_run(tmp_path, "--function", "pci-epf-vntb",
                                "--set", "netdev=tap:ntb0", "--", "netdev",
                                prefix=("unshare", "-rn", "sh", "-c", setup, "sh"))
    assert_passed(proc, results, [n for n in SUITE if n.startswith("netdev.")])
    log = (tmp_path / "run" / "netdev" / "server.log").read_text()
    assert "ntb_netdev bridged to TAP device ntb0" in log


def test_a_matrix_prints_each_cells_round_trips_side_by_side(tmp_path: Path) -> None:
    """The README's doorbell matrix of the netdev phase: each cell's ping round trips in
    its results.json and results.xml, and one table with a column per cell, where polling
    at the kernel's 5 ms costs more than the MSI doorbell, as the seeds measured on R-Car."""
    run, *args = readme_example(
        "vfio-ep run --function pci-epf-vntb --matrix doorbell=msi,embedded,poll -- netdev")
    proc = subprocess.run([sys.executable, "-m", "vfio_ep", run, "--run-dir",
                           str(tmp_path / "r"), *args], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| test | measure | doorbell=msi | doorbell=embedded | doorbell=poll |" in proc.stdout
    avg = re.search(r"\| netdev\.ping_100 \| rtt_avg_ms \| ([\d.]+) \| ([\d.]+) \| "
                    r"([\d.]+) \|", proc.stdout)
    assert avg, proc.stdout[-3000:]
    msi, _, poll = map(float, avg.groups())
    assert poll > msi, proc.stdout[-3000:]
    cell = json.loads((tmp_path / "r" / "doorbell=poll" / "results.json").read_text())
    ping = next(t for t in cell["tests"] if t["name"] == "netdev.ping_100")
    assert set(ping["metrics"]) == {"rtt_first_ms", "rtt_min_ms", "rtt_avg_ms", "rtt_max_ms",
                                    "rtt_mdev_ms", "replies"}
    assert ping["metrics"]["replies"] == 100
    junit = (tmp_path / "r" / "results.xml").read_text()
    assert junit.count('<property name="rtt_mdev_ms"') == 6  # two pings in each of 3 cells


def test_the_guest_kernels_lines_join_the_trace_where_they_happened(tmp_path: Path) -> None:
    """trace.log holds dmesg's lines on the host's clock: ntb_transport's "eth0 created"
    (a driver's dev_info, in dmesg.txt) lies between the test before ntb_netdev loads and
    the one that waited for its carrier."""
    proc, results = vfio_ep_run(tmp_path, "--function", "pci-epf-vntb", "--", "netdev")
    assert proc.returncode == 0 and results["passed"], proc.stderr[-3000:]
    run = tmp_path / "run" / "netdev"
    assert "eth0 created with 1 queue pairs" in (run / "dmesg.txt").read_text()
    trace = (run / "trace.log").read_text()
    assert re.search(r"guest\| ok 1 netdev\.hw_epf_bound\n(.*\n)*?.* dmesg\| .*eth0 created "
                     r"with 1 queue pairs\n(.*\n)*?.* guest\| ok 2 netdev\.netdev_link_up\n",
                     trace), trace[-5000:]
    assert re.search(r"dmesg\| Linux version .*\n(.*\n)*.*guest\| 1\.\.8", trace)
