"""``vfio-ep run --ep-guest``: the EP guest's function picks the suite.

pci-epf-test's is the RC guest's kselftest, here; pci-epf-vntb's (``ep_ntb``), pci-epf-ntb's
(``ep_bridge``) and nvmet-pci-epf's (``ep_nvme``) are their modules', all built on
``ep_guest``'s EP guest and its pair of guests.  ``--ep-shell`` runs no suite: a shell in
the EP guest, the RC guest's pci_endpoint_test bound and idle meanwhile.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, Protocol

from vfio_ep.composition import DEFAULT_FUNCTION, Composition
from vfio_ep.config import ConfigError
from vfio_ep.guest.children import LaunchError
from vfio_ep.guest.ep_bridge import run_ntb_bridge
from vfio_ep.guest.ep_guest import (
    RC_BOUND,
    EpGuestRun,
    PairResult,
    boot_ep_pair,
    boot_ep_shell,
    ep_facts,
)
from vfio_ep.guest.ep_ntb import FILES as VNTB_FILES
from vfio_ep.guest.ep_ntb import run_vntb, vntb_shell_sides
from vfio_ep.guest.ep_nvme import run_nvme
from vfio_ep.guest.interrupt import keeping
from vfio_ep.guest.kernel_build import EP_GUEST_LINES
from vfio_ep.guest.launcher import KSELFTEST_NAME
from vfio_ep.guest.provision import GuestAssets, ProvisionError, provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.results import expect_failures, parse_tap, summary_table, write_results
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.guest.runner import Progress
from vfio_ep.guest.trace import write_trace


class Suite(Protocol):
    """A function's suite: its guests booted and its results written; 0 only if all passed."""

    def __call__(self, run: EpGuestRun, assets: GuestAssets, top: Path,
                 facts: dict[str, Any], *, timeout: float,
                 options: GuestOptions = DEFAULT_OPTIONS) -> int: ...


SUITES: dict[str, Suite] = {"pci_epf_vntb": run_vntb, "nvmet_pci_epf": run_nvme,
                            "pci_epf_ntb": run_ntb_bridge}
# The RC guest of --ep-shell: kselftest.sh's check that pci_endpoint_test has the function
# (its line why not, if not), the device it has, then the RC kernel's messages onto its
# console (rc/console.log: `tail -f` it to watch the RC react to what the EP shell does)
# until the shell's exit stops the guest.
RC_IDLE = """sh /kselftest.sh {vendor} {device} --bound || exit 3
for d in /sys/bus/pci/drivers/pci-endpoint-test/*:*; do
	echo "{bound}pci-endpoint-test ${{d##*/}}"
done
dmesg -n 8
while :; do sleep 3600; done
"""


def run_ep_guest(run: EpGuestRun, *, kernel: Path | None = None, qemu: Path | None = None,
                 linux: str, timeout: float = 600, run_dir: Path | None = None,
                 options: GuestOptions = DEFAULT_OPTIONS) -> int:
    """Boot the EP guest, then the RC guest's suite against it (pci-epf-test's kselftest,
    or the function's own: SUITES); 0 only if every test passed (1 when one failed or a guest
    never finished, 2 when setting up failed).  With ``run.ep_shell``, the EP shell's exit
    status instead (:func:`_ep_shell`)."""
    try:
        ep_linux = run.ep_linux or linux
        if ep_linux not in EP_GUEST_LINES:
            raise ConfigError(f"an EP guest runs Linux {', '.join(EP_GUEST_LINES)} (its "
                              f"endpoint doorbells and functions), not {ep_linux}"
                              + ("" if run.ep_linux else "; --ep-linux picks its line apart "
                                 "from the RC guest's --linux"))
        comp = run.controller()
        run.setup_script()  # a preset or --configfs it refuses fails here, before any boot
        driver = run.driver()
        if run.ep_shell and driver not in (DEFAULT_FUNCTION, "pci_epf_vntb"):
            raise ConfigError(f"--ep-shell comes with pci-epf-test's and pci-epf-vntb's EP "
                              f"guest (the RC guest's driver bound meanwhile), not {driver}'s "
                              "yet")
        assets = provision_all(qemu=qemu, kernel=kernel, linux=linux)
        run.expected_failures()  # a malformed --xfail fails here, before any boot
        top = new_run_dir(run_dir)
        if run.ep_shell:
            return _ep_shell(run, assets, top, timeout=timeout, options=options)
        facts = _facts(comp, assets, driver) | {"ep_linux": ep_linux}
        suite = SUITES.get(driver)
        if suite is not None:
            return suite(run, assets, top, facts, timeout=timeout, options=options)
        vendor, device = run.device()
        progress = Progress(top, run.target(), KSELFTEST_NAME, facts, running=[top / "rc"])
        with keeping(progress.keep):  # Ctrl-C, SIGTERM: the RC's TAP so far is the result
            result = boot_ep_pair(
                run, assets, top,
                f"sh /kselftest.sh {vendor} {device} {shlex.join(run.guest_args)}",
                timeout=timeout, options=options)
    except (ConfigError, ValueError, ProvisionError, LaunchError) as exc:
        print(f"vfio-ep run: {exc}", file=sys.stderr)
        return 2
    return _report(result, top, progress.facts, run.expected_failures(), run.setup_script())


def _facts(comp: Composition, assets: GuestAssets, driver: str) -> dict[str, Any]:
    """What the run tests, for its results."""
    ctrl = next(iter(comp.controllers.values()))
    return {"function": f"{driver} (the EP guest's kernel)",
            "controllers": f"{ctrl.name}: {ctrl.values.get('profile', 'generic')}",
            "linux": assets.linux, "kernel": str(assets.kernel)}



def _ep_shell(run: EpGuestRun, assets: GuestAssets, top: Path, *, timeout: float,
              options: GuestOptions) -> int:
    """``--ep-shell``: the EP guest's shell on the terminal, the RC guest idle with its driver
    bound meanwhile (RC_IDLE); the shell's exit status, or 124 when the run timed out, 2
    when there was no shell or QEMU was stopped under it (Ctrl-A X), as ``--shell``.  On
    vNTB both sides' ntb_netdev are up first (:func:`vntb_shell_sides`)."""
    files: dict[str, Path | bytes] = {}
    if run.driver() == "pci_epf_vntb":
        rc_script, ep_prep = vntb_shell_sides(run, RC_BOUND)
        run, files = dataclasses.replace(run, ep_exec=ep_prep), VNTB_FILES
    else:
        vendor, device = run.device()
        rc_script = RC_IDLE.format(vendor=vendor, device=device, bound=RC_BOUND)
    with keeping(Progress(top, run.target(), None, {}).keep):
        result = boot_ep_shell(run, assets, top, rc_script, timeout=timeout, options=options,
                               files=files)
    # The RC guest's lines are its kernel's messages, which its dmesg.txt has, timed.
    _write_trace(result, top, rc_lines=False)
    status = result.ep.exit_status
    if result.rc is None or status is None:
        print(f"vfio-ep run: {result.error}", file=sys.stderr)
        status = 124 if "timed out" in (result.error or "") else 2
    print(f"run directory: {top}", file=sys.stderr)
    return status


def _write_trace(result: PairResult, top: Path, *, rc_lines: bool = True) -> None:
    """trace.log: the RC guest (the EP guest alone when the RC never booted), the EP
    guest's, and the server's lines on one time line."""
    rc = result.rc
    if rc is not None and not rc_lines:
        rc = dataclasses.replace(rc, line_times=[])
    main = dataclasses.replace(rc or result.ep, server_log=result.server_log)
    write_trace(main, {"ep": result.ep} if rc else None, top)


def _report(result: PairResult, top: Path, facts: dict[str, Any],
            xfail: tuple[str, ...], run_script: str) -> int:
    rc = result.rc
    report = expect_failures(parse_tap(rc.output if rc else "", rc.line_times if rc else None),
                             xfail)
    _write_trace(result, top)
    error = result.error or (rc.error if rc else None)
    status = rc.exit_status if rc else None
    if status == 1 and report.passed and report.counts()["xfail"]:
        status = 0  # the kselftest exits 1 on a failure; its failures were expected
    facts = facts | ep_facts(result.ep, run_script)
    write_results(report, top, exit_status=status, error=error, suite=KSELFTEST_NAME,
                  endpoint=facts)
    print(f"\n{summary_table(report)}")
    if error:
        print(f"vfio-ep run: {error}", file=sys.stderr)
    print(f"run directory: {top}")
    return 0 if status == 0 and report.passed and not error else 1
