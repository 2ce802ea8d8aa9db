"""Acceptance: a real QEMU guest (the RC) with the real upstream drivers and kselftest.

Each test boots a guest (TCG) against vfio-ep and checks, from inside the
guest, what a kernel developer would check on hardware.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vfio_ep_cli import (
    KSELFTEST_CASES,
    readme_block,
    readme_example,
    shell_session,
    vfio_ep_run,
)
from vfio_user_client import ServerThread

from vfio_ep.composition import Composition
from vfio_ep.guest.launcher import KSELFTEST_NAME, GuestBoot, GuestResult, GuestRun, boot_guest
from vfio_ep.guest.provision import cache_dir, linux_tree, provision_all
from vfio_ep.guest.qemu_cmdline import vfio_user_device
from vfio_ep.guest.results import Report, parse_tap
from vfio_ep.pci import testdev

pytestmark = pytest.mark.guest



def kselftest(*sets: str, args: str = "", tmp_path: Path) -> tuple[Report, GuestResult]:
    server = ["--function", "pci-epf-test"]
    for s in sets:
        server += ["--set", s]
    result = boot_guest(GuestBoot(f"/{KSELFTEST_NAME} {args}", serve=server,
                                  run_dir=tmp_path / "run"), timeout=600)
    return parse_tap(result.output), result


def assert_all_ok(report: Report, count: int = KSELFTEST_CASES) -> None:
    failed = [f"{t.name}: {' / '.join(t.diagnostics[-3:])}" for t in report.tests if t.failed]
    assert not failed, failed
    assert len(report.tests) == count, [t.name for t in report.tests]


def statuses(report: Report) -> dict[str, str]:
    return {t.name: t.status for t in report.tests}


def test_testdev_in_guest(tmp_path: Path) -> None:
    """The transport alone: enumeration, BAR sizes, register and RAM BARs, an MSI-X."""
    device = testdev.build({})
    script = r"""
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor)" = 0x16c3 ] && D=$d; done
echo "ids $(cat $D/vendor) $(cat $D/device)"
while read start end flags; do
    echo "bar $(( end > start ? end - start + 1 : 0 ))"
done < $D/resource
B0=$(awk 'NR==1{print $1}' $D/resource)
B2=$(awk 'NR==3{print $1}' $D/resource)
devmem $((B0 + 0x40)) 32 0x12345678
echo "reg $(devmem $((B0 + 0x40)) 32)"
devmem $((B2 + 0x1000)) 32 0xcafef00d
/pci_endpoint_test -t MSIX_TEST
grep pci-endpoint-test /proc/interrupts | awk '{ s += $2 } END { print "msix", s }'
"""
    with ServerThread(device, tmp_path / "ep.sock") as srv:
        result = boot_guest(GuestBoot(script, socket=srv.path, run_dir=tmp_path / "run"),
                            timeout=300)
        bar2 = next(w.target for w in device.windows.of_bar(2))
        server_side = bytes(bar2.view[0x1000:0x1004])
    out = result.output
    assert "ids 0x16c3 0xedda" in out
    bars = [int(line.split()[1]) for line in out.splitlines() if line.startswith("bar ")]
    assert bars[:6] == [16 << 10, 64 << 10, 1 << 20, 0, 0, 0]
    assert "reg 0x12345678" in out
    assert server_side == (0xCAFEF00D).to_bytes(4, "little")
    assert "ok 1 pci_ep_basic.MSIX_TEST" in out
    msix = next(line for line in out.splitlines() if line.startswith("msix "))
    assert int(msix.split()[1]) >= 32


@pytest.mark.parametrize("doorbell", ["msi", "embedded", "poll"])
def test_kselftest_passes_with_each_doorbell(tmp_path: Path, doorbell: str) -> None:
    report, result = kselftest(f"doorbell={doorbell}", tmp_path=tmp_path)
    assert_all_ok(report)
    s = statuses(report)
    assert s["pcie_ep_doorbell.DOORBELL_TEST"] == "pass"
    assert all(s[f"pci_ep_data_transfer.{v}.{t}_TEST"] == "pass"
               for v in ("memcpy", "dma") for t in ("READ", "WRITE", "COPY"))
    assert all(s[f"pci_ep_bar.BAR{b}.BAR_TEST"] == "pass" for b in range(6))
    assert all(s[f"pci_ep_bar.BAR{b}.BAR_SUBRANGE_TEST"] == "pass" for b in range(1, 6))
    assert s["pci_ep_basic.MSI_TEST"] == "pass"  # all 32 vectors (interrupt remapping)
    using = {"msi": "Using MSI doorbell", "embedded": "Using embedded (DMA) doorbell fallback",
             "poll": "Using poll-mode doorbell fallback"}[doorbell]
    assert using in result.server_log


@pytest.mark.parametrize(("preset", "skipped"), [
    # RK3588: BAR4 is reserved (the eDMA registers): its two BAR tests skip
    ("rk3588", {"pci_ep_bar.BAR4.BAR_TEST", "pci_ep_bar.BAR4.BAR_SUBRANGE_TEST"}),
])
def test_preset_looks_like_the_board(tmp_path: Path, preset: str, skipped: set[str]) -> None:
    """--preset: the board's IDs, profile and BARs; the board's INTx limit shows as on the
    board: the header keeps INTA (as pci-epf-test's does), the controller refuses to raise
    it, and LEGACY_IRQ_TEST times out."""
    proc, results = vfio_ep_run(tmp_path, "--preset", preset)
    s = {t["name"]: t for t in results["tests"]}
    assert {n for n, t in s.items() if t["status"] == "fail"} == {
        "pci_ep_basic.LEGACY_IRQ_TEST"}, proc.stdout[-3000:]
    assert "ret (-110)" in " ".join(s["pci_ep_basic.LEGACY_IRQ_TEST"]["diagnostics"])
    assert skipped <= {n for n, t in s.items() if t["status"] == "skip"}
    assert results["endpoint"]["controllers"] == f"ep0: {preset}"
    transfer = s["pci_ep_data_transfer.dma.READ_TEST"]["metrics"]  # what it measured
    assert transfer["bytes"] == 2050051 and transfer["mbytes_s"] > 0
    assert proc.returncode == 1


def test_register_bar_moved_to_bar2_as_on_am654(tmp_path: Path) -> None:
    """The README's `vfio-ep run --preset am654`: AM654's driver data puts the test
    registers in BAR2.

    The upstream driver also refuses every BAR0 test on AM654 (-EINVAL, whatever the
    endpoint does), so exactly those two fail, as they do on the real board.
    """
    proc, results = vfio_ep_run(tmp_path, *readme_example("vfio-ep run --preset am654")[1:])
    assert proc.returncode == 1
    s = {t["name"]: t["status"] for t in results["tests"]}
    refused = {"pci_ep_bar.BAR0.BAR_TEST", "pci_ep_bar.BAR0.BAR_SUBRANGE_TEST"}
    assert {name for name, status in s.items() if status == "fail"} == refused
    assert len(s) == KSELFTEST_CASES
    assert s["pci_ep_bar.BAR1.BAR_TEST"] == "skip"  # reserved
    assert s["pci_ep_bar.BAR2.BAR_SUBRANGE_TEST"] == "skip"  # the register BAR
    assert s["pci_ep_bar.BAR3.BAR_SUBRANGE_TEST"] == "pass"
    assert s["pcie_ep_doorbell.DOORBELL_TEST"] == "pass"


def test_other_bar_sizes(tmp_path: Path) -> None:
    report, _ = kselftest("bar1_size=4096", "bar3_size=2M", "bar4_size=256",
                          "bar5_size=64K", args="-f pci_ep_bar -f pcie_ep_doorbell",
                          tmp_path=tmp_path)
    assert_all_ok(report, count=13)
    assert all(t.status == "pass" for t in report.tests if "BAR0.BAR_SUB" not in t.name)


@pytest.mark.parametrize(("controller", "doorbell", "using"), [
    ("rcar-s4", "auto", "Using embedded (DMA) doorbell fallback"),  # no MSI controller
    ("rk3588", "auto", "Using embedded (DMA) doorbell fallback"),  # pre-exposed in BAR4
])
def test_doorbell_follows_the_controller(tmp_path: Path, controller: str, doorbell: str,
                                         using: str) -> None:
    report, result = kselftest(f"controller={controller}", f"doorbell={doorbell}",
                               args="-f pcie_ep_doorbell -f pci_ep_data_transfer",
                               tmp_path=tmp_path)
    assert_all_ok(report, count=7)
    assert statuses(report)["pcie_ep_doorbell.DOORBELL_TEST"] == "pass"
    assert using in result.server_log


GUEST_REBOOTS = 50


def test_the_guest_reboots_50_times_then_the_kselftest_passes(tmp_path: Path) -> None:
    """`reboot -f` in the guest, 50 times against the same server and QEMU: each boot resets
    the device (DEVICE_RESET) and binds pci_endpoint_test again; the count lives in BAR5,
    EP memory that survives the RC's reboots as on a board.  Then the whole kselftest
    passes, on the connection the first boot opened, and the server holds no more fds than
    after the first boot."""
    comp = Composition.single("pci-epf-test", {})
    comp.assign_sockets([str(tmp_path / "ep.sock")])
    endpoint = comp.build()[0]
    script = r"""
find() { for d in /sys/bus/pci/devices/*; do
    [ "$(cat $d/vendor):$(cat $d/device)" = 0x16c3:0xedda ] && echo $d; done; }
COUNT=$(( $(awk 'NR==6{print $1}' $(find)/resource) + 0x1000 ))  # BAR5 + 4 KiB
n=$(( $(devmem $COUNT 32) ))
if [ $n -lt REBOOTS ]; then echo "boot $n"; devmem $COUNT 32 $((n + 1)); reboot -f; sleep 30; fi
echo "rebooted $n times"
/pci_endpoint_test
""".replace("REBOOTS", str(GUEST_REBOOTS))
    fds: list[int] = []

    def live(line: str) -> None:
        if line in ("boot 1", f"rebooted {GUEST_REBOOTS} times"):
            fds.append(len(os.listdir("/proc/self/fd")))

    with ServerThread(endpoint.device, tmp_path / "ep.sock") as srv:
        run = GuestRun(GuestBoot(script, socket=srv.path, run_dir=tmp_path / "run",
                                 qemu_args=("-action", "reboot=reset"), live=live))
        result = asyncio.run(run.run(900))
        connections = srv.listener.connections
    assert result.ok, result.error or result.output[-3000:]
    assert f"boot {GUEST_REBOOTS - 1}\n" in result.output
    assert_all_ok(parse_tap(result.output))
    assert connections == 1
    assert fds[1] <= fds[0], fds


HOTPLUG_CYCLES = 20


def test_hot_unplug_and_replug_cycles_are_fresh_connections(tmp_path: Path) -> None:
    """20 device_del / device_add cycles: each time the server sees the client go and serves
    the new one, the device keeps its memory, and the server (in this process) holds as many
    fds after the last cycle as after the first.  (testdev without MSI-X: QEMU 11.1 aborts
    when unplugging a vfio-user device whose MSI-X PBA it overlays -- a
    memory_region_del_subregion assertion; see the README.)"""
    device = testdev.build({"msix_interrupts": 0})
    script = r"""
find() { for d in /sys/bus/pci/devices/*; do [ "$(cat $d/vendor)" = 0x16c3 ] && echo $d; done; }
bar2() { awk 'NR==3{print $1}' $1/resource; }
D=$(find)
devmem $(( $(bar2 $D) + 0x80 )) 32 0xfeedbeef
echo ready
i=0
while [ $i -lt CYCLES ]; do
    while [ -n "$(find)" ]; do sleep 0.1; done
    while [ -z "$(find)" ]; do sleep 0.1; done
    i=$((i + 1)); echo "cycle $i"
done
sleep 1; D=$(find)
echo "ram $(devmem $(( $(bar2 $D) + 0x80 )) 32)"
""".replace("CYCLES", str(HOTPLUG_CYCLES))

    async def scenario(sock: Path) -> GuestResult:
        lines: asyncio.Queue[str] = asyncio.Queue()
        run = GuestRun(GuestBoot(script, socket=sock, run_dir=tmp_path / "run",
                                 live=lines.put_nowait))

        async def expect(line: str) -> None:
            while (got := await asyncio.wait_for(lines.get(), 120)) != line:
                assert not got.startswith("cycle"), got

        async with run:
            await expect("ready")
            for cycle in range(1, HOTPLUG_CYCLES + 1):
                await run.device_del()
                await run.device_add(vfio_user_device(sock))
                await expect(f"cycle {cycle}")
                if cycle in (1, HOTPLUG_CYCLES):  # a client attached, as it was after cycle 1
                    fds.append(len(os.listdir("/proc/self/fd")))
            return await run.wait(120)

    fds: list[int] = []
    with ServerThread(device, tmp_path / "ep.sock") as srv:
        result = asyncio.run(scenario(srv.path))
        connections = srv.listener.connections
    assert f"cycle {HOTPLUG_CYCLES}" in result.output
    assert "ram 0xFEEDBEEF" in result.output
    assert connections == HOTPLUG_CYCLES + 1
    assert fds[1] <= fds[0], fds  # nothing left behind by 19 clients


def test_run_verbose_after_the_subcommand_selects_one_test(tmp_path: Path) -> None:
    """`run -v -t DOORBELL_TEST`: -v is vfio-ep's, -t the kselftest's; one test runs.  The
    results say what was tested (rk3588: the eDMA doorbell) and how long the test took."""
    proc, results = vfio_ep_run(tmp_path, "--set", "controller=rk3588", "-v", "-t",
                                "DOORBELL_TEST")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [t["name"] for t in results["tests"]] == ["pcie_ep_doorbell.DOORBELL_TEST"]
    assert results["passed"]
    endpoint = results["endpoint"]
    assert (endpoint["function"], endpoint["controllers"], endpoint["doorbell"],
            endpoint["linux"]) == ("pci_epf_test", "ep0: rk3588", "embedded", "7.3")
    assert 0 < results["tests"][0]["seconds"] < 60
    junit = (tmp_path / "run" / "results.xml").read_text()
    assert '<property name="doorbell" value="embedded" />' in junit
    assert re.search(r'name="DOORBELL_TEST" time="\d+\.\d{3}"', junit)
    # trace.log: what the EP did, under the test that made it do it
    trace = (tmp_path / "run" / "trace.log").read_text()
    assert re.search(r"guest\| #  RUN +pcie_ep_doorbell\.DOORBELL_TEST.*\n(.*\n)*?.*ep   \| "
                     r".*ENABLE_DOORBELL: STATUS .*DOORBELL_ENABLE_SUCCESS", trace), trace


def test_a_device_no_driver_binds_is_named_not_23_failures(tmp_path: Path) -> None:
    """IDs pci_endpoint_test does not know: the run fails saying which device has no
    driver, instead of every test failing on a missing /dev/pci-endpoint-test.0."""
    proc, results = vfio_ep_run(tmp_path, "--set", "deviceid=0x1234")
    assert proc.returncode == 1 and results["tests"] == []
    assert re.search(r"vfio-ep run: no driver bound to [0-9a-f:.]+ \[16c3:1234\]: is "
                     r"CONFIG_PCI_ENDPOINT_TEST set", proc.stderr), proc.stderr
    assert "matched no test" not in proc.stderr


def test_kselftest_from_your_tree(tmp_path: Path) -> None:
    """--kselftest PATH runs that binary (static: the guest has no libc); a dynamic one is
    refused before anything boots."""
    mine = tmp_path / "my_pci_endpoint_test"
    mine.write_bytes(provision_all().test.read_bytes())
    mine.chmod(0o755)
    proc, results = vfio_ep_run(tmp_path, "--kselftest", str(mine), "--", "-t", "BAR_TEST")
    assert proc.returncode == 0 and len(results["tests"]) == 6, proc.stderr
    bad = _run("--kselftest", "/bin/true")
    assert bad.returncode == 2 and "not a static executable" in bad.stderr


def test_matrix_of_cells_into_one_junit_with_expected_failures(tmp_path: Path) -> None:
    """--matrix: a cell per value, one results.xml; --xfail: LEGACY_IRQ_TEST fails on
    RK3588 as on the board (xfail: that cell is ok) and passes on the generic controller
    (xpass: the stale expectation fails that cell and the run)."""
    proc = _run("--run-dir", str(tmp_path / "r"), "--matrix", "controller=generic,rk3588",
                "--xfail", "pci_ep_basic.LEGACY_IRQ_TEST", "--", "-t", "LEGACY_IRQ_TEST")
    assert proc.returncode == 1, proc.stderr
    assert "| controller=generic | FAILED | 0 | 1 | 0 |" in proc.stdout
    assert "| controller=rk3588 | ok | 0 | 0 | 1 |" in proc.stdout
    junit = (tmp_path / "r" / "results.xml").read_text()
    assert junit.count("<testsuite ") == 2
    assert '<property name="controllers" value="ep0: rk3588" />' in junit


def test_the_readme_matrix_with_a_scoped_expected_failure(tmp_path: Path) -> None:
    """Four cells; RK3588's LEGACY_IRQ_TEST fails as on the board (xfail there), the generic
    controller's passes: every cell ok."""
    proc = _run(*readme_example(
        "vfio-ep run --matrix doorbell=embedded,poll --matrix controller=generic,rk3588 --xfail "
        "controller=rk3588:pci_ep_basic.LEGACY_IRQ_TEST")[1:], "--run-dir", str(tmp_path / "r"),
        timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr
    for cell in ("doorbell=embedded controller=generic", "doorbell=embedded controller=rk3588",
                 "doorbell=poll controller=generic", "doorbell=poll controller=rk3588"):
        assert re.search(rf"\| {cell} \| ok \| \d+ \| 0 \|", proc.stdout), proc.stdout[-3000:]
    junit = (tmp_path / "r" / "results.xml").read_text()
    assert junit.count("<testsuite ") == 4 and junit.count("failed, as expected") == 2


def test_run_that_selects_no_test_fails_and_lists_the_tests(tmp_path: Path) -> None:
    proc, results = vfio_ep_run(tmp_path, "--", "-t", "NOPE")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "no test ran" in proc.stdout
    assert "selection -t NOPE matched no test" in proc.stderr
    assert "DOORBELL_TEST" in proc.stderr and "pci_ep_data_transfer" in proc.stderr
    assert not results["passed"] and results["tests"] == []


def test_soak_runs_resets_and_kills_and_reports_the_server(tmp_path: Path) -> None:
    """`vfio-ep soak`: a few runs against one server (seed 3: a reset first, then a kill)."""
    proc = subprocess.run([sys.executable, "-m", "vfio_ep", "soak", "--minutes", "0.3",
                           "--seed", "3", "--run-dir", str(tmp_path / "soak")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{KSELFTEST_CASES}/{KSELFTEST_CASES} ok" in proc.stdout
    assert re.search(r"soak: \d+ runs \(\d+ with a reset first, \d+ with QEMU killed\), "
                     r"\d+ tests, 0 failed", proc.stdout)
    assert re.search(r"open fds (\d+) -> \1\b", proc.stdout), proc.stdout  # none leaked


def _run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfio_ep", "run", *args], capture_output=True,
                          text=True, timeout=timeout)


def test_exec_runs_any_command_and_returns_its_status(tmp_path: Path) -> None:
    proc = _run("--run-dir", str(tmp_path / "r"), "--append", "vfio_ep_marker=1", "--exec",
                "grep -o vfio_ep_marker=1 /proc/cmdline; /pci_endpoint_test -t BAR_TEST "
                "| grep -c '^ok'; exit 7")
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout.split() == ["vfio_ep_marker=1", "6"]  # six BARs tested


def test_the_kselftest_selection_example(tmp_path: Path) -> None:
    """Arguments after -- go to the kselftest: its BAR tests alone."""
    proc, results = vfio_ep_run(tmp_path, *readme_example("vfio-ep run -- -f pci_ep_bar")[1:])
    assert proc.returncode == 0, proc.stderr
    names = [t["name"] for t in results["tests"]]
    assert names and all(n.startswith("pci_ep_bar.") for n in names), names
    assert results["passed"]


def test_a_command_in_both_guests_of_the_pair(tmp_path: Path) -> None:
    """The README's pair example: each guest finds its side of the NTB (104c:b00d)."""
    proc = _run(*readme_example(
        "vfio-ep run --function pci-epf-ntb --exec "
        "'grep -l 0xb00d /sys/bus/pci/devices/*/device'")[1:], "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = sorted(proc.stdout.splitlines())
    assert [line.split(": ")[0] for line in lines] == ["a", "b"], lines
    assert all(line.endswith("/device") for line in lines)


def test_exec_in_both_guests_of_a_pair(tmp_path: Path) -> None:
    """--topology ntb-pair: the two guests of pci-epf-ntb, each running the command."""
    proc = _run("--topology", "ntb-pair", "--run-dir", str(tmp_path / "r"), "--exec",
                "echo role $VFIO_EP_ROLE; [ $VFIO_EP_ROLE = a ]")
    assert proc.returncode == 1, proc.stderr  # b's status
    assert sorted(proc.stdout.splitlines()) == ["a: role a", "b: role b"]


def test_cpus_qemu_args_and_a_live_gdbstub(tmp_path: Path) -> None:
    """--cpus reaches the guest, --qemu-arg QEMU's command line, and --gdb a gdbstub that
    answers the remote protocol while the guest runs (on loopback)."""
    port = _free_loopback_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vfio_ep", "run", "--run-dir", str(tmp_path / "r"), "--cpus",
         "2", "--qemu-arg=-name", "--qemu-arg=vfio-ep-test", "--gdb", str(port), "--exec",
         "grep -c ^processor /proc/cpuinfo; sleep 5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        reply = _gdb_halt_reason(port, deadline=60)
    finally:
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert out.split() == ["2"]
    assert f"gdbstub on 127.0.0.1:{port}" in err
    assert reply.startswith("$T") or reply.startswith("$S"), reply  # a stop reply
    argv = json.loads(next((tmp_path / "r").rglob("run.json")).read_text())["qemu_argv"]
    assert argv[-6:] == ["-smp", "2", "-gdb", f"tcp:127.0.0.1:{port}", "-name", "vfio-ep-test"]


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _gdb_halt_reason(port: int, deadline: float) -> str:
    """Connect to QEMU's gdbstub and ask '?' (why stopped): its reply packet."""
    end = time.monotonic() + deadline
    while True:
        try:
            conn = socket.create_connection(("127.0.0.1", port), timeout=5)
            break
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.2)
    with conn:
        conn.sendall(b"$?#3f")
        data = b""
        while b"#" not in data.lstrip(b"+"):
            data += conn.recv(4096)
        conn.sendall(b"+$D#44")  # ack, detach: the guest runs on
        return data.lstrip(b"+").decode()


def test_shell_on_a_terminal(tmp_path: Path) -> None:
    """--shell: the guest's shell on our terminal (a pty here), with the console as its
    controlling tty; what it prints reaches us, the vfio-ep markers and dmesg do not, and its
    exit status is the run's."""
    status, text = shell_session(
        [*readme_example("vfio-ep run --shell"), "--run-dir", str(tmp_path / "r")],
        "echo answer=$((6*7)); tty; exit 5", 120)
    assert status == 5, text
    assert "answer=42" in text and "/dev/ttyS0" in text
    assert "@@vfio-ep" not in text and "--- dmesg ---" not in text


def test_exec_timeout_is_124_and_says_so(tmp_path: Path) -> None:
    """A fractional timeout is honoured; the stuck guest's tasks (sysrq-t) land in the run's
    console.log, its whole dmesg in dmesg.txt and its interrupt counts in interrupts.txt
    (taken through the rescue console while the command still hangs), and the message says
    where."""
    proc = _run("--run-dir", str(tmp_path / "r"), "--timeout", "12.5", "--exec",
                "echo hung > /dev/kmsg; sleep 60")
    assert proc.returncode == 124
    assert re.search(r"timed out after 12\.\d s \(the guest's tasks, sysrq-t, are at the end "
                     r"of console\.log\); its dmesg\.txt and interrupts\.txt are in the run "
                     r"directory",
                     proc.stderr), proc.stderr
    console = (next((tmp_path / "r").rglob("console.log"))).read_text(errors="replace")
    assert "sysrq: Show State" in console and re.search(r"task:sleep\s", console)
    dmesg = (next((tmp_path / "r").rglob("dmesg.txt"))).read_text()
    assert "Linux version" in dmesg and "hung" in dmesg
    assert "sysrq: Show State" in dmesg  # taken after the task dump
    interrupts = (next((tmp_path / "r").rglob("interrupts.txt"))).read_text()
    assert "ttyS0" in interrupts and "CPU0" in interrupts


def test_kernel_build_directory_brings_its_modules(tmp_path: Path) -> None:
    """--kernel O=DIR: its bzImage boots, its modules are in /lib/modules."""
    assets = provision_all()
    build = tmp_path / "O"
    (build / "arch/x86/boot").mkdir(parents=True)
    (build / "drivers/ntb").mkdir(parents=True)
    (build / "arch/x86/boot/bzImage").write_bytes(assets.kernel.read_bytes())
    tool = next(m for m in assets.modules if m.name == "ntb_tool.ko")
    (build / "drivers/ntb/ntb_tool.ko").write_bytes(tool.read_bytes())
    proc = _run("--kernel", str(build), "--run-dir", str(tmp_path / "r"), "--exec",
                "ls /lib/modules")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ntb_tool.ko"]


@pytest.mark.kernel_build
@pytest.mark.timeout(3600)
def test_the_readme_recipe_builds_your_own_kernel(tmp_path: Path) -> None:
    """The README's own-kernel recipe, pasted into a shell as written, in the kernel tree
    vfio-ep unpacked (its two lines naming the tree and the build directory set to those):
    the .config is the one vfio-ep's kernel is built with, and the kselftest and the NTB
    suite pass on what it built.  The build directory stays in the cache, one per tree,
    options and compiler (locked: two test runs share it), so only the first run compiles
    (5-10 minutes on 2 cores) and later ones are make's no-op (~40 s).  The compiler is in its
    name because make's dependency files name the compiler's own headers: a tree the host's
    gcc 12 built cannot be rebuilt by the container suite's gcc 14."""
    readme_example("vfio-ep kernel-config > $B/vfio-ep.config")  # both in the recipe
    readme_example("vfio-ep run --kernel $B")
    ntb = readme_example("vfio-ep run --kernel $B --function pci-epf-vntb")[1:]
    recipe = readme_block("merge_config.sh")
    assert recipe[:2] == ["cd ~/src/linux", "B=/tmp/kbuild"]
    assert recipe[3] == "vfio-ep kernel-config > $B/vfio-ep.config"
    assert recipe[-1] == "vfio-ep run --kernel $B"
    assets = provision_all()
    built_as = assets.kernel.parent  # <linux-source version>-<options' digest>
    source = linux_tree(assets)
    gcc = subprocess.run(["gcc", "-dumpfullversion"], capture_output=True, text=True,
                         check=True).stdout.strip()
    build = cache_dir() / "readme-kernel" / f"{built_as.name}-gcc{gcc}"
    build.mkdir(parents=True, exist_ok=True)
    script = "\n".join(["set -e", f"cd {source}", f"B={build}", *recipe[2:-1],
                        f"{recipe[-1]} --run-dir {tmp_path / 'kselftest'}"])
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    with (build.parent / f"{build.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with (tmp_path / "recipe.log").open("w+") as log:
            status = subprocess.run(["bash", "-c", script], stdout=log,
                                    stderr=subprocess.STDOUT, env=env).returncode
            log.seek(0)
            assert status == 0, log.read()[-5000:]
        proc, results = vfio_ep_run(tmp_path, *(str(build) if a == "$B" else a for a in ntb))
    assert _settings(build / ".config") == _settings(built_as / "config")
    kselftest = json.loads((tmp_path / "kselftest" / "results.json").read_text())
    assert kselftest["passed"] and kselftest["counts"]["pass"] == 21, kselftest["counts"]
    assert kselftest["endpoint"]["kernel"] == str(build / "arch/x86/boot/bzImage")
    assert proc.returncode == 0 and results["passed"] and len(results["tests"]) == 18


# What Kconfig finds out about the toolchain rather than what anyone chose: versions and
# cc-option/as-option probes.  They differ between the host's gcc 12 (and its rustc) and the
# container's gcc 14 with the same options (a user's CONFIG_CC_OPTIMIZE_* is still compared).
TOOLCHAIN_FINDINGS = re.compile(
    r"CONFIG_(?:(?:AS|LD|GCC|CLANG|PAHOLE)_VERSION|CC_VERSION_TEXT|RUSTC_\w+|"
    r"(?:CC|AS|LD)_(?:HAS|IS|CAN)_\w+|CC_OPT_\w+|GCC_ASM_\w+|TOOLS_SUPPORT_\w+)=")


def _settings(config: Path) -> set[str]:
    return {line for line in config.read_text().splitlines()
            if line and line[0] != "#" and not TOOLCHAIN_FINDINGS.match(line)}


def test_share_mounts_a_host_directory_at_its_own_path(tmp_path: Path) -> None:
    """--share: the guest runs a script from the host's directory by the host's path, writes
    a file back; read-only shares refuse writes."""
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "hello.sh").write_text("echo hello from $(pwd)\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    proc = _run("--run-dir", str(tmp_path / "r"), "--share", str(tree), "--share",
                f"{ro}:/mnt/ro:ro", "--exec",
                f"sh {tree}/hello.sh && echo back > {tree}/out && "
                "! touch /mnt/ro/x 2>/dev/null && echo refused")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["hello from /", "refused"]
    assert (tree / "out").read_text() == "back\n" and not (ro / "x").exists()


def test_the_kselftest_of_your_tree_through_a_share(tmp_path: Path) -> None:
    """The README's example, run in a kernel tree (here one holding just the built kselftest):
    the guest starts in the same directory, and runs the tree's binary."""
    tree = tmp_path / "linux"
    built = tree / "tools/testing/selftests/pci_endpoint/pci_endpoint_test"
    built.parent.mkdir(parents=True)
    shutil.copy(provision_all().test, built)
    proc = subprocess.run([sys.executable, "-m", "vfio_ep", *readme_example(
        "vfio-ep run --share . --exec "
        "'tools/testing/selftests/pci_endpoint/pci_endpoint_test -t MSI_TEST'"),
        "--run-dir", str(tmp_path / "r")], cwd=tree, capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok 1 pci_ep_basic.MSI_TEST" in proc.stdout


def test_dynamic_debug_queries_reach_builtins_and_modules_loaded_later(tmp_path: Path) -> None:
    """--dyndbg: a file's query applies at boot, a module's when the module loads."""
    proc = _run("--run-dir", str(tmp_path / "r"), "--dyndbg", "module ntb_transport +p",
                "--dyndbg", "file drivers/misc/pci_endpoint_test.c +p", "--exec",
                "insmod /lib/modules/ntb_transport.ko && C=/proc/dynamic_debug/control && "
                "grep -c 'ntb_transport.c.* =p ' $C; grep -c 'pci_endpoint_test.c.* =p ' $C")
    assert proc.returncode == 0, proc.stderr
    modules, builtin = map(int, proc.stdout.split())
    assert modules > 0 and builtin > 0


def test_boot_tracing_lands_in_the_run_directory(tmp_path: Path) -> None:
    """--trace-event and --ftrace trace from boot: the kselftest's MSI interrupts and
    pci_endpoint_test's functions are in ftrace.txt; the dmesg in dmesg.txt."""
    run_dir = tmp_path / "r"
    proc = _run("--run-dir", str(run_dir), "--trace-event", "irq:irq_handler_entry",
                "--ftrace", "pci_endpoint_test_*", "-t", "MSI_TEST")
    assert proc.returncode == 0, proc.stderr
    trace = (run_dir / "ftrace.txt").read_text()
    assert "# tracer: function" in trace
    assert re.search(r"irq_handler_entry: irq=\d+ name=pci-endpoint-test", trace), trace[-2000:]
    assert "pci_endpoint_test_ioctl" in trace
    assert "Linux version" in (run_dir / "dmesg.txt").read_text()


def test_the_printed_qemu_command_runs_as_printed_and_the_guest_sees_the_device(
        tmp_path: Path) -> None:
    """Bring your own QEMU: `serve --print-qemu-args` prints a command that runs as it is
    (`vfio-ep qemu`, the provisioned QEMU through its loader; -m as big as the memory
    backend); with a kernel added, the guest enumerates 16c3:edda behind the root port.
    No initramfs: the kernel panics once PCI is up, and -no-reboot ends QEMU there."""
    sock = tmp_path / "ep.sock"
    server = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                               "--print-qemu-args"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        assert server.stdout.readline() == "# ep0:\n"
        command = shlex.split(server.stdout.readline())
        kernel = provision_all().kernel
        guest = subprocess.run([*command, "-kernel", str(kernel), "-append",
                                "console=ttyS0 panic=-1", "-nographic", "-no-reboot"],
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
    finally:
        server.send_signal(signal.SIGTERM)
        _, log = server.communicate(timeout=10)
    assert "pci 0000:01:00.0: [16c3:edda] type 00 class 0xff0000 PCIe Endpoint" in \
        guest.stdout, guest.stdout[-3000:] + guest.stderr
    assert "Machine memory size does not match" not in guest.stderr
    assert "connected" in log and "Traceback" not in log


def test_vfio_ep_qemu_is_the_qemu_runs_use() -> None:
    """`vfio-ep qemu -- ARGS` runs the QEMU a run would use, with exactly those arguments."""
    proc = subprocess.run([sys.executable, "-m", "vfio_ep",
                           *readme_example("vfio-ep qemu -- --version")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"QEMU emulator version {provision_all().qemu.version}")


def test_accel_kvm_reaches_qemu_with_the_irqchip_split(tmp_path: Path) -> None:
    """--accel kvm as far as this machine can take it (its /dev/kvm starts no guest): QEMU's
    command line, which an unknown option of ours makes QEMU refuse at once."""
    proc = _run("--accel", "kvm", "--exec", "true", "--qemu-arg=-vfio-ep-stop-here",
                "--run-dir", str(tmp_path / "r"))
    assert proc.returncode == 2 and "-vfio-ep-stop-here: invalid option" in proc.stderr
    argv = json.loads((tmp_path / "r" / "a" / "run.json").read_text())["qemu_argv"]
    assert argv[argv.index("-accel") + 1] == "kvm,kernel-irqchip=split"
