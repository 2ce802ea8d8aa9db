"""Acceptance: the kernel's own endpoint code in an EP guest on vfio-ep's controller.

The EP guest loads vfio-ep's EPC driver (qemu/kernel/epc) and Linux's pci-epf-test, runs a
board's configfs script and starts the controller; the RC guest's upstream kselftest then
runs against that function, as it would against a board.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from vfio_ep_cli import KSELFTEST_CASES, readme_example, shell_session, vfio_ep_run

from vfio_ep.composition import EP_GUEST_CONTROLLER
from vfio_ep.guest.assets import EP_GUEST
from vfio_ep.guest.ep_guest import EP_READY, SETUP, EpGuestRun
from vfio_ep.guest.kernel_build import EPC_MODULE
from vfio_ep.guest.launcher import GuestBoot, GuestResult, GuestRun
from vfio_ep.guest.provision import GuestAssets, linux_tree, provision_all
from vfio_ep.guest.server import running_server

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


def test_linux_dw_edma_drives_the_edma_and_rings_the_seeds_doorbell(tmp_path: Path) -> None:
    """dma_channels=dw-edma: the EPC driver hands the eDMA block to Linux's own dw-edma, as
    pcie-designware.c does on a SoC.  pci-epf-test's DMA READ and WRITE go through dw-edma's
    linked lists; its COPY fails as on DesignWare boards (dw-edma has no MEMCPY); and
    DOORBELL_TEST rings dw-edma's interrupt-emulation doorbell (the seeds' dw-edma patch):
    the eDMA's one interrupt, handed by dw-edma's handler to its dw-edma-emul IRQ.  Each
    run's guests leave their interrupt counts in interrupts.txt."""
    proc, results = vfio_ep_run(tmp_path, *readme_example(
        "vfio-ep run --ep-guest --set dma_channels=dw-edma --xfail "
        "pci_ep_data_transfer.dma.COPY_TEST")[1:])
    statuses = _statuses(results)
    assert statuses.pop("pci_ep_data_transfer.dma.COPY_TEST") == "xfail", proc.stdout[-4000:]
    failed = {n: s for n, s in statuses.items() if s not in ("pass", "skip")}
    assert not failed, f"{failed}\n{proc.stdout[-5000:]}"
    assert {n for n, s in statuses.items() if s == "skip"} <= UPSTREAM_SKIPS
    assert proc.returncode == 0, proc.stderr[-3000:]
    ep = tmp_path / "run" / "ep"
    dmesg = (ep / "dmesg.txt").read_text()
    for line in ("eDMA channels per direction (dw-edma)", "DMA: YES",
                 "DMA controller doesn't support MEMCPY", *SEED_DOORBELL_LINES):
        assert line in dmesg, dmesg[-3000:]
    interrupts = (ep / "interrupts.txt").read_text()
    # dw-edma's handler took the eDMA's interrupt.  (The doorbell's dw-edma-emul IRQ is
    # gone by now: pci-epf-test frees it after the test.  In this mode the aux resource's
    # IRQ is dw-edma's db_irq, so DOORBELL_TEST passing is that path.)
    assert _irq_count(interrupts, "dw-edma-core:") > 0, interrupts


def _irq_count(interrupts: str, what: str) -> int:
    """How often the /proc/interrupts lines naming ``what`` fired, on every CPU."""
    total = 0
    for line in interrupts.splitlines():
        words = line.split()
        if what in line and words and words[0].endswith(":"):
            for word in words[1:]:
                if not word.isdigit():
                    break
                total += int(word)
    return total


def test_ep_shell_on_a_terminal(tmp_path: Path) -> None:
    """--ep-shell: the EP guest's shell on our terminal (a pty here) once its controller is
    started and the RC guest's driver has the function; what is typed there runs in the EP
    guest, the RC guest's lines stay in its console.log, and the shell's exit status is the
    run's, both guests stopped."""
    run_dir = tmp_path / "r"
    status, text = shell_session(
        [*readme_example("vfio-ep run --ep-guest --ep-shell"), "--run-dir", str(run_dir)],
        f"cat /sys/kernel/config/pci_ep/controllers/{EP_GUEST_CONTROLLER}/start; tty; exit 3",
        300)
    assert status == 3, text
    assert "vfio-ep: the RC guest's driver has the function (pci-endpoint-test 0000:01:00.0)" \
        in text
    assert re.search(r"\n1\r*\n/dev/ttyS0\r*\n", text), text  # started; the shell's tty
    rc_console = (run_dir / "rc" / "console.log").read_text(errors="replace")
    assert "vfio-ep: bound: pci-endpoint-test 0000:01:00.0" in rc_console
    assert "vfio-ep: bound:" not in text and "@@vfio-ep" not in text
    # Both guests ended: the EP guest by itself (its dmesg after its exit status), the RC
    # guest stopped by the run (its dmesg through the rescue console).
    assert "exit status 3@@" in (run_dir / "ep" / "console.log").read_text(errors="replace")
    for guest in ("ep", "rc"):
        assert "Linux version" in (run_dir / guest / "dmesg.txt").read_text(), guest


# The RC guest's side of the fault story: a BAR test, then its BAR1 watched until it reads
# all ones (the EP guest gone), then until it does not (the next one up), then the test again.
RC_WATCHING = r"""
D=$(grep -l 0xedda /sys/bus/pci/devices/*/device | head -1); D=${D%/device}
B1=$(awk 'NR==2{print $1}' $D/resource)
/pci_endpoint_test -r pci_ep_bar.BAR1.BAR_TEST >/dev/null; echo "first $?"
while [ "$(devmem $B1 32)" != 0xFFFFFFFF ]; do sleep 0.2; done; echo "link down"
while [ "$(devmem $B1 32)" = 0xFFFFFFFF ]; do sleep 0.2; done; echo "back"
/pci_endpoint_test -r pci_ep_bar.BAR1.BAR_TEST >/dev/null; echo "again $?"
"""


def test_either_guest_can_go_and_the_other_carries_on(tmp_path: Path) -> None:
    """RC guest a runs a test and its QEMU goes (the EP guest hears link down and serves on);
    RC guest b comes; the EP guest's QEMU goes and b reads all ones, not a hang; a second EP
    guest starts the same controller and b's test passes against it."""
    assets = provision_all()
    setup = EpGuestRun().setup_script()
    log = tmp_path / "server.log"
    ep_socket = tmp_path / "cpu.sock"

    async def story() -> tuple[GuestResult, list[str], str]:
        async with running_server([EP_GUEST_CONTROLLER], ["--ep-socket", str(ep_socket)],
                                  log) as served:
            rc_socket = served.sockets[EP_GUEST_CONTROLLER]
            first = await _ep_guest(assets, setup, ep_socket, tmp_path / "ep1")
            a = await GuestRun(GuestBoot("/pci_endpoint_test -r pci_ep_bar.BAR1.BAR_TEST",
                                         socket=rc_socket, assets=assets,
                                         run_dir=tmp_path / "a")).run(300)
            assert a.ok, a.output
            lines: list[str] = []
            seen = {word: asyncio.Event() for word in ("first", "link down", "back")}

            def heard(line: str) -> None:
                lines.append(line)
                for word, event in seen.items():
                    if line.startswith(word):
                        event.set()

            b = GuestRun(GuestBoot(RC_WATCHING, socket=rc_socket, assets=assets,
                                   run_dir=tmp_path / "b", live=heard))
            async with b:
                await asyncio.wait_for(seen["first"].wait(), 300)
                await first.collect()
                await first.__aexit__(None, None, None)
                await asyncio.wait_for(seen["link down"].wait(), 60)
                second = await _ep_guest(assets, setup, ep_socket, tmp_path / "ep2")
                result = await b.wait(300)
                await second.collect()
                await second.__aexit__(None, None, None)
        return result, lines, log.read_text()

    result, lines, server_log = asyncio.run(story())
    assert lines[:3] == ["first 0", "link down", "back"], lines
    assert result.ok and lines[-1] == "again 0", (lines, result.error)
    assert "the EP guest is told link down" in server_log


async def _ep_guest(assets: GuestAssets, setup: str, socket: Path, run_dir: Path) -> GuestRun:
    """An EP guest up, its controller started."""
    ready = asyncio.Event()
    assert assets.epc_driver is not None
    run = GuestRun(GuestBoot(f"sh /ep_guest.sh {EP_GUEST_CONTROLLER} /{SETUP}", socket=socket,
                             assets=assets, run_dir=run_dir,
                             files={"ep_guest.sh": EP_GUEST, SETUP: setup.encode(),
                                    f"lib/modules/{EPC_MODULE}": assets.epc_driver},
                             live=lambda line: line == EP_READY and ready.set()))
    await run.__aenter__()
    await asyncio.wait_for(ready.wait(), 120)
    return run


PROBE = "static int pci_epf_test_probe(struct pci_epf *epf,\n"
MY_LINE = "vfio-ep test: my own pci-epf-test probes"


def test_the_ep_sides_own_tree_runs_with_its_change(tmp_path: Path) -> None:
    """--ep-kernel BUILD_DIR: an EP developer's tree, here pci-epf-test.c with a pr_info
    added and rebuilt (make M=) in a build directory of the provisioned kernel (its config,
    headers, Module.symvers, bzImage, modules); the EPC driver is built against it and the
    EP guest's dmesg shows the line."""
    assets = provision_all()
    built = assets.kernel.parent / "build"
    tree = tmp_path / "O"
    shutil.copytree(built, tree, symlinks=True)
    makefile = tree / "Makefile"  # make O= wrote its own directory there: the copy's now
    makefile.write_text(makefile.read_text().replace(str(built), str(tree)))
    (tree / "arch/x86/boot").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(assets.kernel, tree / "arch/x86/boot/bzImage")
    functions = tree / "drivers/pci/endpoint/functions"
    functions.mkdir(parents=True, exist_ok=True)
    for ko in assets.modules:
        if ko.name != "pci-epf-test.ko":  # the developer's own, built below
            shutil.copyfile(ko, functions / ko.name)
    source = linux_tree(assets) / "drivers/pci/endpoint/functions/pci-epf-test.c"
    patched = source.read_text().replace(
        PROBE, f'static int __pci_epf_test_probe(struct pci_epf *epf,\n'
        f'                                const struct pci_epf_device_id *id);\n'
        f'{PROBE}                              const struct pci_epf_device_id *id)\n'
        f'{{\n\tpr_info("{MY_LINE}\\n");\n\treturn __pci_epf_test_probe(epf, id);\n}}\n\n'
        f'static int __pci_epf_test_probe(struct pci_epf *epf,\n', 1)
    module = tmp_path / "module"
    module.mkdir()
    (module / "pci-epf-test.c").write_text(patched)
    (module / "Kbuild").write_text("obj-m := pci-epf-test.o\n")
    subprocess.run(["make", "-C", str(tree), f"M={module}", "modules"], check=True,
                   capture_output=True)
    assert len(list(tree.rglob("pci-epf-test.ko")) + list(module.rglob("*.ko"))) == 1
    if (ko := module / "pci-epf-test.ko").is_file():  # the output stays beside the source
        shutil.move(ko, functions / ko.name)
    proc, results = vfio_ep_run(tmp_path, "--ep-guest", "--ep-kernel", str(tree), "--",
                                "-r", "pcie_ep_doorbell.DOORBELL_TEST")
    assert proc.returncode == 0 and results["passed"], proc.stdout[-3000:] + proc.stderr
    assert MY_LINE in (tmp_path / "run" / "ep" / "dmesg.txt").read_text()
