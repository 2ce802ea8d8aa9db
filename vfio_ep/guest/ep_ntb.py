"""``vfio-ep run --ep-guest --function pci-epf-vntb``: the kernel's NTB on both sides.

The EP guest's own pci-epf-vntb makes its virtual NTB device (``pci-vntb`` binds it on the
virtual bus ``vbus_number`` names); the RC guest's ntb_hw_epf drives the function's BARs.
Both then run the same NTB clients against each other, in step, as two RC guests do on
pci-epf-ntb: ``ntb_pair.sh`` in each, the RC as ``a`` (at 10.0.0.10), the EP guest as ``b``
(at the seeds' 10.0.0.11).  One pair of guests boots per phase (tool, pingpong, netdev):
each client module binds the first NTB device it sees, as on a board.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path
from typing import Any

from vfio_ep.guest.assets import NTB_PAIR, TAP_LIB
from vfio_ep.guest.ep_guest import (
    EP_EXITED,
    EpGuestRun,
    PairResult,
    boot_ep_pair,
    ep_facts,
)
from vfio_ep.guest.interrupt import keeping
from vfio_ep.guest.launcher import GuestResult
from vfio_ep.guest.provision import GuestAssets
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.runner import NTB_PHASES, Progress, finish_suite, select_phases
from vfio_ep.guest.trace import write_trace

RC_IP, EP_IP = "10.0.0.10", "10.0.0.11"  # the seeds' vNTB ping: the EP at 10.0.0.11
# Once the RC guest's phase has ended, what the EP guest's may take to end too (its last
# barrier, its TAP's last lines).
EP_FINISH = 60
FILES: dict[str, Path | bytes] = {"ntb_pair.sh": NTB_PAIR, "tap_lib.sh": TAP_LIB}


def run_vntb(run: EpGuestRun, assets: GuestAssets, top: Path, facts: dict[str, Any], *,
             timeout: float, options: GuestOptions = DEFAULT_OPTIONS) -> int:
    """One pair of guests per phase (``run.guest_args`` selects some); 0 only if every test
    of both sides passed."""
    progress = Progress(top, run.target(), "ep-vntb", facts)
    with keeping(progress.keep):
        phases = select_phases("vNTB phase", list(run.guest_args), NTB_PHASES)
        for phase in phases:
            print(f"# --- {phase}: the RC guest and the EP guest run {phase} ---", flush=True)
            progress.running = [top / phase / "rc", top / phase / "ep"]
            pair = boot_vntb_phase(run, assets, top / phase, phase, timeout=timeout,
                                   options=options)
            progress.running = []
            if phase == phases[0]:  # each phase's EP guest runs the same script
                progress.facts |= ep_facts(pair.ep, run.setup_script())
            _finished(progress, pair, top / phase, phase)
        return finish_suite(progress)


def boot_vntb_phase(run: EpGuestRun, assets: GuestAssets, top: Path, phase: str, *,
                    timeout: float, options: GuestOptions = DEFAULT_OPTIONS,
                    env: tuple[str, ...] = ()) -> PairResult:
    """The EP guest as ``run`` sets it up, the RC guest, both running ntb_pair.sh's
    ``phase`` (``env``: more of its variables for both, BENCH_PINGS say), records in
    ``top``."""
    rc_env, ep_env = _sides(run, env)
    ep_side = f"{ep_env} sh /ntb_pair.sh b {phase}"
    phase_run = dataclasses.replace(
        run, ep_exec=f"{run.ep_exec}; {ep_side}" if run.ep_exec else ep_side)
    top.mkdir(exist_ok=True)
    return boot_ep_pair(phase_run, assets, top, f"{rc_env} sh /ntb_pair.sh a {phase}",
                        timeout=timeout, options=options, rc_files=FILES, ep_files=FILES,
                        ep_finish=EP_FINISH)


def vntb_shell_sides(run: EpGuestRun, bound: str) -> tuple[str, str]:
    """``--ep-shell`` on vNTB: the RC guest's script (ntb_hw_epf bound, the line ``bound``
    starts said, then ntb_netdev up at 10.0.0.10, then idle) and what the EP guest runs
    before its shell (ntb_netdev up at the seeds' 10.0.0.11): ``ping 10.0.0.10`` works in
    the shell."""
    rc_env, ep_env = _sides(run, (f"BOUND_LINE={bound}",))
    return (f"{rc_env} sh /ntb_pair.sh a up || exit 3\n"
            "dmesg -n 8\nwhile :; do sleep 3600; done",
            f"{ep_env} sh /ntb_pair.sh b up")


def _sides(run: EpGuestRun, env: tuple[str, ...]) -> tuple[str, str]:
    """ntb_pair.sh's environment for the RC guest (ntb_hw_epf on the function) and the EP
    guest (pci-vntb's virtual device), from the setup's attributes."""
    values = run.values()
    # pci-epf-vntb's first two doorbell slots are the link's and a reserved one
    db_bits = int(str(values["db_count"]), 0) - 2
    common = [f"DB_BITS={db_bits}",
              # the EP's window is its MW BAR, translated whole (pci_epc_set_bar() takes
              # a resizable BAR's size only, 1 MiB at least)
              f"MW_SIZE={int(str(values['mw1']), 0)}", *env]
    return (_env("ntb_hw_epf", pci_id(values, "vendorid", "deviceid"), RC_IP, EP_IP, "rc",
                 common),
            _env("pci-vntb", pci_id(values, "vntb_vid", "vntb_pid"), EP_IP, RC_IP, "ep",
                 common))


def _env(driver: str, pci_id: str, self_ip: str, peer_ip: str, label: str,
         common: list[str]) -> str:
    """ntb_pair.sh's environment for one side: NAME=VALUE words, each value quoted."""
    items = [f"NTB_DRIVER={driver}", f"NTB_ID={pci_id}", f"SELF_IP={self_ip}",
             f"PEER_IP={peer_ip}", f"LABEL={label}", *common]
    return " ".join(f"{name}={shlex.quote(value)}"
                    for name, _, value in (item.partition("=") for item in items))


def pci_id(values: dict[str, object], vendor: str, device: str) -> str:
    """``vendor:device`` as sysfs spells them (``0x1912:0x0030``)."""
    return ":".join(f"{int(str(values[k]), 0):#06x}" for k in (vendor, device))


def _finished(progress: Progress, pair: PairResult, phase_dir: Path, phase: str) -> None:
    """Both sides' reports; the EP side's exit status is its command's, as ep_guest.sh
    reported it (the EP guest itself serves until stopped)."""
    if pair.rc is None:
        progress.failed.append(f"{phase}: {pair.error}")
        progress.finished(pair.ep, f"{phase}/ep")
        return
    rc = dataclasses.replace(pair.rc, server_log=pair.server_log)
    progress.finished(rc, f"{phase}/rc")
    progress.finished(_ep_side(pair.ep), f"{phase}/ep")
    write_trace(rc, {"ep": pair.ep}, phase_dir)


def _ep_side(ep: GuestResult) -> GuestResult:
    """The EP guest's result as its phase's: the command's exit status, or an error when
    the command never ended."""
    found = re.search(rf"^{re.escape(EP_EXITED)}(\d+)$", ep.output, re.MULTILINE)
    if found is None:
        return dataclasses.replace(ep, exit_status=None, error=ep.error or
                                   "the EP guest's side of the phase never ended")
    return dataclasses.replace(ep, exit_status=int(found.group(1)))
