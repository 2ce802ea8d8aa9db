"""``vfio-ep run --ep-guest --function pci-epf-ntb``: the kernel's pci-epf-ntb in one EP guest,
between two RC guests.

The EP guest holds two of vfio-ep's controllers (two vfio-user devices: pci-ntb-howto.rst's
``2900000.pcie-ep`` and ``2910000.pcie-ep``, or the two its ``--configfs`` script links) and
its own pci-epf-ntb binds them as primary and secondary.  It runs no client: the function is
a bridge.  Once the setup script has started both controllers the RC guests boot at once,
``a`` on the primary's RC side and ``b`` on the secondary's, and run the NTB pair suite
against each other through it (``ntb_pair.sh``, as on vfio-ep's own pci-epf-ntb); the EP
guest is stopped after them.  All three boot again for each phase.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

from vfio_ep.config import ConfigError
from vfio_ep.guest.ep_guest import (
    SCRIPT_CONTROLLERS,
    EpGuestRun,
    PairResult,
    RcGuest,
    boot_ep_guests,
    ep_facts,
)
from vfio_ep.guest.ep_ntb import FILES, pci_id
from vfio_ep.guest.interrupt import keeping
from vfio_ep.guest.provision import GuestAssets
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.runner import (
    PAIR_PHASES,
    PAIR_ROLES,
    Progress,
    finish_suite,
    pair_cue,
    select_phases,
)
from vfio_ep.guest.trace import write_trace

# The NTB pair's phases but rejoin, whose b leaves and boots again while a stays: here
# every phase boots its three guests together.
BRIDGE_PHASES = tuple(p for p in PAIR_PHASES if p != "rejoin")
# pci-epf-ntb takes the link down only when a host's driver says so (COMMAND_LINK_DOWN sets
# both interfaces' link_status down); a host whose QEMU just goes leaves it up for the other
# (the EP guest's EPC driver passes no event to a secondary interface): perf's a unloads
# ntb_perf, as a host that leaves cleanly, for b to see it go.
PERF_LEAVE = "PERF_LEAVE=driver"


def bridge_controllers(run: EpGuestRun) -> tuple[str, str]:
    """pci-epf-ntb's primary and secondary, as the setup script links them (the howto's
    two when vfio-ep cannot read it)."""
    with contextlib.suppress(ConfigError, StopIteration):
        func = next(iter(run.script_composition().functions.values()))
        if func.primary is not None and func.secondary is not None:
            return func.primary, func.secondary
    primary, secondary = SCRIPT_CONTROLLERS["pci_epf_ntb"]
    return primary, secondary


def run_ntb_bridge(run: EpGuestRun, assets: GuestAssets, top: Path, facts: dict[str, Any], *,
                   timeout: float, options: GuestOptions = DEFAULT_OPTIONS) -> int:
    """One boot of the three guests per phase (``run.guest_args`` selects some); 0 only if
    every test of both RC guests passed and the EP guest kept serving."""
    controllers = bridge_controllers(run)
    profile = facts["controllers"].partition(": ")[2]
    progress = Progress(top, run.target(), "ep-ntb", facts | {
        "controllers": ", ".join(f"{c}: {profile}" for c in controllers)})
    ntb_id = f"NTB_ID={pci_id(run.values(), 'vendorid', 'deviceid')}"
    with keeping(progress.keep):
        phases = select_phases("NTB pair phase", list(run.guest_args), BRIDGE_PHASES)
        for phase in phases:
            print(f"# --- {phase}: a and b run {phase} through the EP guest's pci-epf-ntb ---",
                  flush=True)
            (top / phase).mkdir(exist_ok=True)  # --run-dir may be an earlier run's
            progress.running = [top / phase / role for role in PAIR_ROLES]
            rcs = [RcGuest(role, ctrl, f"{ntb_id} {PERF_LEAVE} sh /ntb_pair.sh {role} {phase}",
                           cue=pair_cue(role, phase))
                   for role, ctrl in zip(PAIR_ROLES, controllers, strict=True)]
            result = boot_ep_guests(run, assets, top / phase, controllers, rcs,
                                    timeout=timeout, options=options, rc_files=FILES)
            progress.running = []
            if phase == phases[0]:  # each phase's EP guest runs the same script
                progress.facts |= ep_facts(result.ep, run.setup_script())
            _finished(progress, result, top / phase, phase)
            if not result.rcs:  # the EP guest never started its controller: nor would the
                break  # next phase's, which runs the same setup
        return finish_suite(progress)


def _finished(progress: Progress, result: PairResult, phase_dir: Path, phase: str) -> None:
    """Both RC guests' reports and the phase's trace.log (the three guests and the server);
    the EP guest fails the phase only if it stopped serving."""
    if result.error:
        progress.failed.append(f"{phase}: {result.error}")
    if not result.rcs:
        return
    rcs = [dataclasses.replace(rc, server_log=result.server_log) for rc in result.rcs]
    for role, rc in zip(PAIR_ROLES, rcs, strict=True):
        progress.finished(rc, f"{phase}/{role}")
    write_trace(rcs[0], {"b": rcs[1], "ep": result.ep}, phase_dir, label="a")
