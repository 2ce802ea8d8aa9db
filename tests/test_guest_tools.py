"""Guest tooling: cpio, console markers, TAP, kconfig merge (pure), and one plain boot."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from vfio_ep_cli import KSELFTEST_CASES

from vfio_ep.guest import (
    ep_guest,
    guests,
    initramfs,
    kernel_build,
    launcher,
    provision,
    qemu_cmdline,
    results,
)
from vfio_ep.guest.assets import TAP_LIB
from vfio_ep.guest.run_dir import new_run_dir

TAP = """TAP version 13
1..4
# Starting 4 tests from 2 test cases.
#  RUN           pci_ep_bar.BAR0.BAR_TEST ...
#            OK  pci_ep_bar.BAR0.BAR_TEST
ok 1 pci_ep_bar.BAR0.BAR_TEST
#  RUN           pci_ep_bar.BAR1.BAR_TEST ...
# pci_endpoint_test.c:93:BAR_TEST:Expected 0 (0) == ret (-5)
#          FAIL  pci_ep_bar.BAR1.BAR_TEST
not ok 2 pci_ep_bar.BAR1.BAR_TEST
#  RUN           pci_ep_bar.BAR2.BAR_TEST ...
#      SKIP      BAR is disabled
#            OK  pci_ep_bar.BAR2.BAR_TEST
ok 3 pci_ep_bar.BAR2.BAR_TEST # SKIP BAR is disabled
# Totals: pass:1 fail:1 xfail:0 xpass:0 skip:1 error:0
"""


def _cpio_members(data: bytes) -> dict[str, tuple[int, bytes]]:
    """Minimal newc reader: {name: (mode, data)}."""
    members, pos = {}, 0
    while True:
        fields = [int(data[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members[name] = (mode, data[pos:pos + size])
        pos = (pos + size + 3) & ~3


def test_initramfs_holds_init_files_links_and_console(tmp_path: Path) -> None:
    busybox = provision.static_busybox()  # installs busybox-static if missing
    init, script = initramfs.guest_init("echo hi")
    out = initramfs.build_initramfs(tmp_path / "i.gz", {**script, "etc/x": b"x"}, init, busybox)
    members = _cpio_members(gzip.decompress(out.read_bytes()))
    assert members["init"] == (0o100755, init.encode())
    assert members["guest.sh"][1] == b"echo hi"
    assert members["bin/sh"] == (0o120777, b"/bin/busybox")
    assert members["dev/console"][0] == 0o020600
    assert members["etc"][0] == 0o040755


def test_parse_console_cuts_between_markers() -> None:
    console = ("SeaBIOS\r\n\x1b[2J" + initramfs.BEGIN + "\r\nline\r\n"
               + initramfs.END + "3@@\r\n--- dmesg ---\r\n")
    assert initramfs.parse_console(console) == ("line\n", 3)
    assert initramfs.parse_console(initramfs.BEGIN + "\npartial\n") == ("partial\n", None)
    assert initramfs.parse_console("kernel panic") == ("", None)


def test_records_after_the_command_become_files() -> None:
    """dmesg, the interrupt counts and the trace buffer, from the console after the exit
    status or from the rescue console (where the tty echoes the command line first)."""
    console = (initramfs.BEGIN + "\r\nout\r\n" + initramfs.END + "0@@\r\n"
               "--- dmesg ---\r\n[    0.1] one\r\n[    0.2] two\r\n"
               "--- interrupts ---\r\n 25:  3  dw-edma-emul\r\n"
               "--- trace ---\r\n# tracer: nop\r\n  sh-1 [000] irq_handler_entry\r\n")
    assert initramfs.console_sections(console) == {
        "dmesg.txt": "[    0.1] one\n[    0.2] two\n",
        "interrupts.txt": " 25:  3  dw-edma-emul\n",
        "ftrace.txt": "# tracer: nop\n  sh-1 [000] irq_handler_entry\n"}
    rescue = (initramfs.sections_script() + "; echo done\r\n--- dmesg ---\r\n[ 9.0] hung\r\n"
              + launcher.RESCUE_DONE.decode())
    assert initramfs.console_sections(rescue) == {
        "dmesg.txt": "[ 9.0] hung\n" + launcher.RESCUE_DONE.decode()}
    assert "$((6*7))" in launcher.RESCUE_DONE_CMD  # its echo never matches RESCUE_DONE
    assert launcher.RESCUE_DONE.decode() not in launcher.RESCUE_DONE_CMD


def test_debug_options_become_kernel_arguments() -> None:
    options = qemu_cmdline.GuestOptions(
        append="foo=1", dyndbg=("module ntb_transport +p", "file drivers/misc/x.c +pf"),
        trace_events=("irq:irq_handler_entry", "irq_vectors:*"), ftrace_filter=("ntb_epf_*",))
    assert options.cmdline == (
        f"{qemu_cmdline.DEFAULT_APPEND} ntb_transport.dyndbg=\"+p\" "
        'dyndbg="file drivers/misc/x.c +pf" trace_event=irq:irq_handler_entry,irq_vectors:* '
        "ftrace=function ftrace_filter=ntb_epf_* foo=1")  # the user's own arguments last
    assert qemu_cmdline.GuestOptions().cmdline == qemu_cmdline.DEFAULT_APPEND


@pytest.mark.parametrize(("accel", "memory", "expected"), [
    ("tcg", 256, "tcg"), ("kvm", 512, "kvm,kernel-irqchip=split")])
def test_qemus_command_line_per_accelerator(tmp_path: Path, accel: str, memory: int,
                                            expected: str) -> None:
    """--accel: KVM with the irqchip split, as interrupt remapping needs there; -m always the
    memory backend's size, and the IOMMU's interrupt remapping either way."""
    argv = qemu_cmdline.qemu_command(
        provision.Qemu(["qemu-system-x86_64"]), kernel=tmp_path / "bzImage",
        initrd=tmp_path / "initrd", qmp=tmp_path / "qmp", device=None,
        options=qemu_cmdline.GuestOptions(accel=accel, memory_mb=memory))
    assert argv[argv.index("-accel") + 1] == expected
    assert argv.count("-accel") == 1
    assert argv[argv.index("-m") + 1] == str(memory)
    assert f"memory-backend-memfd,id=mem,size={memory}M,share=on" in argv
    assert "intel-iommu,intremap=on,dma-translation=off" in argv


def test_shares_parse_and_mount(tmp_path: Path) -> None:
    d = tmp_path / "a,b"
    d.mkdir()
    same = qemu_cmdline.Share.parse(str(d))
    assert (same.host, same.guest, same.readonly) == (d, str(d), False)
    ro = qemu_cmdline.Share.parse(f"{d}:/mnt/tree:ro")
    assert (ro.guest, ro.readonly) == ("/mnt/tree", True)
    options = qemu_cmdline.GuestOptions(shares=(same, ro))
    argv = options.qemu_argv()
    assert argv[argv.index("-virtfs") + 1] == (
        f"local,path={tmp_path}/a,,b,mount_tag=vfio-ep-share0,security_model=none")
    assert argv[-1].endswith("mount_tag=vfio-ep-share1,security_model=none,readonly=on")
    setup = options.guest_setup()
    assert f"mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 vfio-ep-share0 '{d}'" \
        in setup and "msize=262144,ro vfio-ep-share1 '/mnt/tree'" in setup
    assert "exit 125" in setup
    assert same.guest_path(d / "sub") == f"{d}/sub" and same.guest_path(d) == str(d)
    assert ro.guest_path(d / "x") == "/mnt/tree/x" and ro.guest_path(tmp_path) is None
    assert qemu_cmdline.GuestOptions(shares=(ro,), workdir="/mnt/tree/x").guest_setup().endswith(
        "cd '/mnt/tree/x' || exit 125\n")
    for bad in (str(tmp_path / "missing"), f"{d}:relative", f"{d}:/", "", f"{d}:/a:/b:ro"):
        with pytest.raises(ValueError, match="--share"):
            qemu_cmdline.Share.parse(bad)


def test_tap_report_and_files(tmp_path: Path) -> None:
    report = results.parse_tap(TAP)
    statuses = [(t.number, t.status) for t in report.tests]
    assert statuses == [(1, "pass"), (2, "fail"), (3, "skip"), (4, "error")]
    assert report.tests[1].diagnostics == [
        "pci_endpoint_test.c:93:BAR_TEST:Expected 0 (0) == ret (-5)"]
    assert report.tests[2].reason == "BAR is disabled"
    assert not report.passed
    assert "4 tests: 1 pass, 1 fail, 1 skip, 1 error" in results.summary_table(report)
    results.write_results(report, tmp_path, exit_status=1, error=None, suite="t")
    assert json.loads((tmp_path / "results.json").read_text())["counts"]["error"] == 1
    assert 'failures="1" errors="1"' in (tmp_path / "results.xml").read_text()
    assert (tmp_path / "results.tap").read_text() == TAP


def test_a_suite_that_bails_out_reports_the_rest_not_run() -> None:
    """tap_lib.sh's ``need``: a prerequisite that fails ends the suite with "Bail out!" at
    once, and the tests it planned after it are errors that say why they never ran."""
    script = (f". {TAP_LIB}; TAP_PREFIX=pair.; echo 1..3; need driver_bound 'no driver' true; "
              "need link_up 'no carrier' false; check ping 'no reply' true")
    run = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=False)
    assert run.returncode == 1
    assert run.stdout.splitlines()[-1] == "Bail out! pair.link_up: no carrier"
    report = results.parse_tap(run.stdout)
    assert [(t.number, t.status) for t in report.tests] == [(1, "pass"), (2, "fail"),
                                                            (3, "error")]
    assert report.tests[2].reason == "not run: Bail out! pair.link_up: no carrier"


class _Boot:
    """A guest's boot for guests.Cues, as the scheduler sees one: started, then ended."""

    def __init__(self) -> None:
        self.started, self.ends = asyncio.Event(), asyncio.Event()

    async def run(self, timeout: float) -> None:
        self.started.set()
        await self.ends.wait()


def test_a_cued_guest_waits_for_the_line_or_the_guests_end() -> None:
    """guests.Cues: a guest cued on ("a", LINE) boots once a has printed LINE (another
    guest's line, or another line of a's, is no cue), or once a has ended without it."""
    async def scenario() -> None:
        cues = guests.Cues([("a", "# loaded"), ("a", "never"), None])
        a, b, c = _Boot(), _Boot(), _Boot()
        booting = [cues.boot("a", a, 1), cues.boot("b", b, 1, cue=("a", "# loaded")),
                   cues.boot("c", c, 1, cue=("a", "never"))]
        await asyncio.wait_for(a.started.wait(), 1)
        for label, line in (("b", "# loaded"), ("a", "# loaded later")):
            cues.heard(label, line)
            await asyncio.sleep(0.01)
            assert not b.started.is_set()
        cues.heard("a", "# loaded")
        await asyncio.wait_for(b.started.wait(), 1)
        assert not c.started.is_set()
        a.ends.set()
        await asyncio.wait_for(c.started.wait(), 1)
        b.ends.set()
        c.ends.set()
        await asyncio.gather(*booting)

    asyncio.run(scenario())


def test_tap_all_passing() -> None:
    report = results.parse_tap("1..1\nok 1 a.b.c\n# Totals: pass:1 fail:0 xfail:0 xpass:0 "
                               "skip:0 error:0\n")
    assert report.passed


def test_tap_with_no_test_is_not_a_pass() -> None:
    """A selection that matched nothing (the harness plans 0 and exits 0) must not pass."""
    report = results.parse_tap("TAP version 13\n1..0\n# Starting 0 tests from 0 test cases.\n"
                               "# Totals: pass:0 fail:0 xfail:0 xpass:0 skip:0 error:0\n")
    assert report.ran_nothing and not report.passed
    assert results.summary_table(report) == "no test ran (plan: 0)"
    assert not results.parse_tap("garbage\n").passed


def test_fragment_has_the_drivers_under_test() -> None:
    fragment = kernel_build.parse_config(kernel_build.FRAGMENT.read_text())
    for symbol in ("PCI_ENDPOINT_TEST", "NTB_EPF", "HOTPLUG_PCI_PCIE", "DEVMEM", "MODULES"):
        assert fragment[f"CONFIG_{symbol}"] == "y"
    for client in ("NTB_TRANSPORT", "NTB_NETDEV", "NTB_TOOL", "NTB_PINGPONG", "NTB_PERF"):
        assert fragment[f"CONFIG_{client}"] == "m"


def test_each_kernel_line_has_its_fragments() -> None:
    """6.12's ntb_hw_epf can only be a module: its own fragment says so, after the common;
    the lines an EP guest runs get the endpoint framework and functions as well."""
    for line in kernel_build.EP_GUEST_LINES:
        assert kernel_build.fragments(line) == [kernel_build.FRAGMENT,
                                                kernel_build.EP_GUEST_FRAGMENT]
    ep = kernel_build.parse_config(kernel_build.EP_GUEST_FRAGMENT.read_text())
    assert ep["CONFIG_PCI_ENDPOINT_MSI_DOORBELL"] == "y" and ep["CONFIG_PCI_EPF_TEST"] == "m"
    common, own = kernel_build.fragments("6.12")
    assert common == kernel_build.FRAGMENT
    assert kernel_build.parse_config(own.read_text()) == {"CONFIG_NTB_EPF": "m"}
    with pytest.raises(provision.ProvisionError, match=r"no kernel line 5\.10"):
        kernel_build.source_package("5.10")


@pytest.mark.guest
def test_plain_guest_boots_with_drivers_and_kselftest(tmp_path: Path) -> None:
    from vfio_ep.guest.launcher import GuestBoot, boot_guest

    # Without an endpoint every kselftest case fails fast, but all must run and report.
    result = boot_guest(GuestBoot("ls /sys/bus/pci/drivers; /pci_endpoint_test; echo status=$?",
                                  run_dir=tmp_path), timeout=120)
    assert result.exit_status == 0, result.error
    assert "pci-endpoint-test" in result.output
    assert "ntb_hw_epf" in result.output
    report = results.parse_tap(result.output)
    assert (report.planned, len(report.tests)) == (KSELFTEST_CASES, KSELFTEST_CASES)
    assert "status=1" in result.output


@pytest.mark.parametrize(("content", "number"), [
    (b"0x1f\n", "0x1f"), (b"0\n", "0"), (b"4096\n", "4096"), (b"0x1000\n", "0x1000"),
    # ntb_tool formats again on each read(): cat's second read could append a newer value's tail
    (b"0\n1000\n", None), (b"0x\n", None), (b"0x1g\n", None), (b"", None), (b"012\n", None),
    (b"-1\n", None), (b"1x2\n", None),
])
def test_hex_of_accepts_only_one_number(tmp_path: Path, content: bytes, number: str | None) -> None:
    """The guest suites' hex_of, under the guest's busybox: a non-number never reaches $(( ))."""
    (tmp_path / "value").write_bytes(content)
    run = subprocess.run([str(provision.static_busybox()), "sh", "-c",
                          f'. {TAP_LIB}; hex_of {tmp_path / "value"}'],
                         capture_output=True, text=True, check=False)
    assert (run.stdout.strip() if run.returncode == 0 else None) == number, run.stderr


def test_tests_are_timed_from_their_run_line_or_the_previous_result(tmp_path: Path) -> None:
    """Each line's arrival on the host times the tests: kselftest's from its ``#  RUN`` line,
    plain TAP (the NTB suites) from the previous result; JUnit carries them as ``time``."""
    lines = TAP.splitlines()
    arrival = {i: float(i) for i in range(len(lines))}
    arrival[lines.index("#  RUN           pci_ep_bar.BAR1.BAR_TEST ...")] = 10.0
    arrival[lines.index("not ok 2 pci_ep_bar.BAR1.BAR_TEST")] = 12.5
    times = [(arrival[i], line) for i, line in enumerate(lines)]
    report = results.parse_tap(TAP, times)
    # RUN at 3 -> ok at 5; RUN at 10 -> not ok at 12.5; RUN at 10 -> ok at 13; 4 never ran
    assert [t.seconds for t in report.tests] == [2.0, 2.5, 3.0, None]
    results.write_results(report, tmp_path, exit_status=1, error=None, suite="s")
    junit = (tmp_path / "results.xml").read_text()
    assert 'name="BAR_TEST" time="2.500"' in junit
    assert json.loads((tmp_path / "results.json").read_text())["tests"][2]["seconds"] == 3.0

    plain = "1..2\nok 1 a\n# between\nok 2 b\n"
    timed = list(zip([0.0, 1.0, 2.0, 4.0], plain.splitlines(), strict=True))
    assert [t.seconds for t in results.parse_tap(plain, timed).tests] == [1.0, 3.0]
    assert [t.seconds for t in results.parse_tap(plain).tests] == [None, None]


def test_expected_failures_become_xfail_and_a_pass_of_one_xpass() -> None:
    report = results.expect_failures(results.parse_tap(TAP), ("pci_ep_bar.BAR1.BAR_TEST",
                                                              "pci_ep_bar.BAR0.BAR_TEST"))
    s = {t.name: t.status for t in report.tests}
    assert s["pci_ep_bar.BAR1.BAR_TEST"] == "xfail" and s["pci_ep_bar.BAR0.BAR_TEST"] == "xpass"
    assert report.totals is None  # the harness's totals counted the failure
    assert not report.passed  # the stale expectation (BAR0 passed) fails the run
    only_fail = results.expect_failures(results.parse_tap(TAP), ("pci_ep_bar.BAR1.BAR_TEST",))
    assert [t for t in only_fail.tests if t.failed] == [only_fail.tests[3]]  # 4: never ran


def test_an_expected_failure_can_be_scoped_to_a_value() -> None:
    """--xfail KEY=VALUE:TEST applies only where KEY=VALUE is set (a matrix cell, --set, or
    preset=BOARD); a bare TEST everywhere."""
    from vfio_ep.config import ConfigError
    from vfio_ep.guest.runner import Target

    xfail = ("controller=rk3588:pci_ep_basic.LEGACY_IRQ_TEST", "preset=imx8:X", "Y")
    cell = Target(None, None, None, ("doorbell=poll", "controller=rk3588"), xfail=xfail)
    assert cell.expected_failures() == ("pci_ep_basic.LEGACY_IRQ_TEST", "Y")
    other = Target(None, None, None, ("controller=generic",), preset="imx8", xfail=xfail)
    assert other.expected_failures() == ("X", "Y")
    with pytest.raises(ConfigError, match="the scope is KEY=VALUE"):
        Target(None, None, None, (), xfail=("rk3588:X",)).expected_failures()


def test_run_directories_are_pruned_but_never_a_live_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond $VFIO_EP_KEEP_RUNS the oldest runs go, except one whose process still runs."""
    monkeypatch.setenv("VFIO_EP_CACHE", str(tmp_path))
    monkeypatch.setenv("VFIO_EP_KEEP_RUNS", "2")
    runs = tmp_path / "runs"
    gone = subprocess.Popen(["true"])
    gone.wait()
    for name, pid in (("00-alive", os.getpid()), ("01-old", gone.pid), ("02-old", gone.pid),
                      ("03-recent", gone.pid), ("04-recent", gone.pid)):
        (runs / name).mkdir(parents=True)
        (runs / name / "owner").write_text(f"{pid}\n")
    new = new_run_dir(None)
    assert sorted(p.name for p in runs.iterdir()) == sorted(
        ["00-alive", "03-recent", "04-recent", new.name])
    assert (new / "owner").read_text() == f"{os.getpid()}\n"


@pytest.mark.parametrize(("function", "sets", "expected"), [
    ("pci-epf-vntb", ["doorbell=embedded"],
     {"function": "pci_epf_vntb", "doorbell": "embedded", "doorbells": 2, "db_shared": True}),
    ("pci-epf-vntb", ["profile=rcar-s4", "edma=0"],  # no MSI controller, no eDMA
     {"function": "pci_epf_vntb", "doorbell": "poll", "doorbells": 2, "db_shared": False}),
    ("pci-epf-test", ["doorbell=embedded"], {"function": "pci_epf_test",
                                             "doorbell": "embedded"}),
])
def test_serve_reports_what_it_serves(tmp_path: Path, function: str, sets: list[str],
                                      expected: dict[str, object]) -> None:
    """`vfio-ep serve --facts` writes what each controller serves before its socket exists:
    what `vfio-ep run` tells the guest's suite to expect (the doorbells pci-epf-vntb
    answers, and whether they share a register) and records, so the runner never builds
    the model itself.  The real command, stopped by SIGTERM."""
    from vfio_ep.guest.runner import ntb_suite_script

    sock, facts = tmp_path / "ep.sock", tmp_path / "endpoint.json"
    cmd = [sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock), "--facts",
           str(facts), "--function", function, *(a for s in sets for a in ("--set", s))]
    server = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert server.poll() is None, server.communicate()[1].decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        served = json.loads(facts.read_text())
    finally:
        server.terminate()
        server.wait(10)
    profile = "rcar-s4" if "profile=rcar-s4" in sets else "generic"
    assert served["ep0"] == {"profile": profile, "device": served["ep0"]["device"], **expected}
    if function == "pci-epf-vntb":
        assert ntb_suite_script("tool", served) == (
            f"sh /ntb_suite.sh tool 2 {int(expected['db_shared'] is True)}")


def test_a_bad_facts_path_is_refused(tmp_path: Path) -> None:
    """A --facts file that cannot be written stops the server with the reason."""
    run = subprocess.run([sys.executable, "-m", "vfio_ep", "serve", "--socket",
                          str(tmp_path / "ep.sock"), "--facts", str(tmp_path / "no/such"),
                          "--function", "pci-epf-test"], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 1
    assert f"--facts {tmp_path / 'no/such'}: No such file or directory" in run.stderr
    assert not (tmp_path / "ep.sock").exists()


PING = """PING 10.0.0.11 (10.0.0.11): 56 data bytes
64 bytes from 10.0.0.11: seq=0 ttl=64 time=12.500 ms
64 bytes from 10.0.0.11: seq=1 ttl=64 time=2.000 ms
64 bytes from 10.0.0.11: seq=2 ttl=64 time=4.000 ms
64 bytes from 10.0.0.11: seq=3 ttl=64 time=9.000 ms
round-trip min/avg/max = 2.000/6.875/12.500 ms
"""


def test_ping_round_trips_become_metrics_under_the_guests_busybox(tmp_path: Path) -> None:
    """rtt_metrics, as the guest suites run it: the first reply apart, min/avg/max/mdev (as
    iputils computes it) of the others, only the COUNT judged; nothing when none came."""
    (tmp_path / "ping").write_text(PING)
    run = subprocess.run([str(provision.static_busybox()), "sh", "-c",
                          f". {TAP_LIB}; rtt_metrics 3 < {tmp_path / 'ping'}; "
                          f"rtt_metrics 1 < {tmp_path / 'ping'}; rtt_metrics 3 < /dev/null"],
                         capture_output=True, text=True, check=True)
    assert run.stdout.splitlines() == [
        "# metrics: rtt_first_ms=12.500 rtt_min_ms=2.000 rtt_avg_ms=3.000 rtt_max_ms=4.000 "
        "rtt_mdev_ms=1.000 replies=3",
        "# metrics: rtt_first_ms=12.500 replies=1"], run.stderr


def test_metrics_go_with_their_test_into_json_junit_and_a_table(tmp_path: Path) -> None:
    """A suite's "# metrics:" lines belong to the next result; a passing transfer test gets
    its bytes and throughput from its time; all land in results.json, as JUnit properties
    of the test case, and in tables (a matrix's cells side by side)."""
    tap = ("1..3\n# metrics: rtt_first_ms=3.5 rtt_avg_ms=1.25\n# metrics: replies=100\n"
           "ok 1 netdev.ping_100\nok 2 netdev.rebind\n"
           "#  RUN           pci_ep_data_transfer.dma.READ_TEST ...\n"
           "#            OK  pci_ep_data_transfer.dma.READ_TEST\n"
           "ok 3 pci_ep_data_transfer.dma.READ_TEST\n")
    lines = tap.splitlines()
    times = [(0.0 if i < 5 else 1.0 if i < 7 else 3.0, line) for i, line in enumerate(lines)]
    report = results.parse_tap(tap, times)
    assert [t.metrics for t in report.tests] == [
        {"rtt_first_ms": 3.5, "rtt_avg_ms": 1.25, "replies": 100}, {},
        {"bytes": results.KSELFTEST_TRANSFER_BYTES, "mbytes_s": 1.025}]
    assert report.tests[2].diagnostics == []
    results.write_results(report, tmp_path, exit_status=0, error=None, suite="s")
    saved = json.loads((tmp_path / "results.json").read_text())["tests"]
    assert saved[0]["metrics"]["rtt_avg_ms"] == 1.25
    assert results.load_results(tmp_path)[0].tests[0].metrics == report.tests[0].metrics
    junit = (tmp_path / "results.xml").read_text()
    assert re.search(r'<testcase classname="netdev" name="ping_100" time="[\d.]+"><properties>'
                     r'<property name="rtt_first_ms" value="3.5" />', junit), junit
    slower = results.parse_tap(tap.replace("rtt_avg_ms=1.25", "rtt_avg_ms=5"))
    table = results.metrics_table([("doorbell=msi", report), ("doorbell=poll", slower)])
    assert "| test | measure | doorbell=msi | doorbell=poll |" in table
    assert "| netdev.ping_100 | rtt_avg_ms | 1.25 | 5 |" in table
    assert "| pci_ep_data_transfer.dma.READ_TEST | mbytes_s | 1.025 |  |" in table
    assert "| netdev.ping_100 | rtt_avg_ms | 1.25 |" in results.summary_table(report)
    assert results.metrics_table([("x", results.parse_tap("1..1\nok 1 a\n"))]) == ""



def test_dmesg_joins_the_trace_on_the_hosts_clock(tmp_path: Path) -> None:
    """dmesg.txt's lines are placed by the marker /init writes to the kernel's log as the
    command begins (the moment its BEGIN line reached the host): a driver's line 1.5 s after
    the marker lands between the guest lines around it, a continuation line stays with its
    line, and the server's lines keep their place."""
    from vfio_ep.guest.trace import write_trace

    began = time.monotonic() - 10
    (tmp_path / "dmesg.txt").write_text(
        f"[    0.000000] Linux version 7.3.4\n[    2.000000] {initramfs.KMSG_BEGIN}\n"
        "[    3.500000] ntb_hw_epf 0000:01:00.0: eth0 created with 1 queue pairs\n"
        " continued\n")
    wall = datetime.fromtimestamp(time.time() - 9)  # began + 1 s, for the server's line
    server = f"{wall:%Y-%m-%d %H:%M:%S},{wall.microsecond // 1000:03d} vfio_ep INFO: link up\n"
    result = launcher.GuestResult(0, "", tmp_path, server, None,
                                  [(began + 1.2, "ok 1 a"), (began + 1.8, "ok 2 b")], began)
    lines = [line.split(" ", 1)[1] for line in write_trace(result).read_text().splitlines()]
    assert lines == ["dmesg| Linux version 7.3.4", f"dmesg| {initramfs.KMSG_BEGIN}",
                     "ep   | vfio_ep INFO: link up", "guest| ok 1 a",
                     "dmesg| ntb_hw_epf 0000:01:00.0: eth0 created with 1 queue pairs",
                     "dmesg|  continued", "guest| ok 2 b"]
    no_marker = launcher.GuestResult(0, "", tmp_path, "", None, [], None)
    assert "dmesg|" not in write_trace(no_marker).read_text()


def test_an_ep_guest_whose_kernel_crashed_is_told_by_where() -> None:
    """An EP guest that never started its controller because its kernel crashed (a real
    console: 7.3.4's pci-epf-ntb on the RK3588 profile, its bind error path freeing the
    config BAR twice) is reported by the crash, its RIP and the call trace's first frames,
    not by the shell's last words after it."""
    console = (Path(__file__).parent / "data" / "ep-guest-oops-console.txt").read_text()
    assert ep_guest.last_words(console) == (
        "BUG: unable to handle page fault for address: ffffea0000400000 (RIP "
        "__free_pages_ok+0x16b/0x1f1; pci_epf_free_space+0x52/0x6a <- "
        "epf_ntb_config_spad_bar_free+0x2b/0x50 [pci_epf_ntb] <- pci_epf_unbind+0x9a/0xbc "
        "<- pci_epf_bind+0x1bd/0x1c9)")
    assert ep_guest.last_words("booting\nvfio-ep: setup: echo 1 > start\n") == (
        "vfio-ep: setup: echo 1 > start")

