"""``make test-matrix``: the suites against each kernel line kernel developers run.

Every cell is a ``vfio-ep run`` as a user types it, on one kernel line: pci-epf-test with
each doorbell backend (the kselftest; 6.12 has ``pcitest`` and no doorbell test, so one run
of pcitest.sh's cases), the vNTB suite (6.12's ntb_hw_epf knows the i.MX8 IDs, not the
R-Car ones: the i.MX8 preset there), the NTB pair, and, where the line can be one, an EP
guest running Linux's own pci-epf-test, pci-epf-vntb, nvmet-pci-epf and pci-epf-ntb on
vfio-ep's controllers; 6.12's RC guest also meets a 7.3 EP guest's pci-epf-vntb (old and new peers,
seed 003).  The table
(kernel x suite x result) is printed and written as markdown to ``out``; the exit status is 0
only when every cell passed.  ``vfio-ep matrix`` runs it.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from vfio_ep.guest.ep_guest import EpGuestRun
from vfio_ep.guest.ep_run import run_ep_guest
from vfio_ep.guest.interrupt import keeping
from vfio_ep.guest.kernel_build import DEFAULT_LINUX, EP_GUEST_LINES
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.guest.runner import RunSpec, Target, run_suite

NO_KSELFTEST = ("6.12",)  # pcitest only: no doorbell test, one run
# RK3588 has no INTx: the kselftest's INTx test fails there, as on the board.
RK3588_XFAIL = ("pci_ep_basic.LEGACY_IRQ_TEST",)
# With an EP guest, BARs are trapped (served from the EP guest's RAM, each access a vfio-user
# round trip): the consecutive test's 4 MiB of 4-byte reads over RK3588's 1 MiB BARs take
# about as long as the kselftest gives a test (30 s) under TCG, so it is left out there.
RK3588_EP_GUEST_ARGS = ("-T", "CONSECUTIVE_BAR_TEST")
OLD_NTB_IDS = ("6.12",)  # ntb_hw_epf without the R-Car vNTB IDs


@dataclass(frozen=True)
class Cell:
    linux: str
    suite: str
    function: str | None
    sets: tuple[str, ...] = ()
    preset: str | None = None  # vfio_ep.presets
    ep_guest: bool = False  # run --ep-guest: the function is the EP guest kernel's
    xfail: tuple[str, ...] = ()  # known behaviour (run --xfail)
    args: tuple[str, ...] = ()  # the kselftest's own (after --)
    ep_linux: str | None = None  # the EP guest's line, where it is not the RC's


@dataclass
class Outcome:
    cell: Cell
    status: int
    passed: int
    failed: int
    skipped: int
    seconds: float
    run_dir: Path

    @property
    def ok(self) -> bool:
        return self.status == 0


def cells(lines: tuple[str, ...]) -> list[Cell]:
    out = []
    for linux in lines:
        if linux in NO_KSELFTEST:
            out.append(Cell(linux, "pcitest", None))
        else:
            out += [Cell(linux, f"kselftest, {db} doorbell", None, (f"doorbell={db}",))
                    for db in ("msi", "embedded", "poll")]
        imx = linux in OLD_NTB_IDS
        out.append(Cell(linux, "vNTB" + (" (i.MX8 preset)" if imx else ""), "pci-epf-vntb",
                        preset="imx8" if imx else None))
        out.append(Cell(linux, "NTB pair", "pci-epf-ntb"))
        if linux in EP_GUEST_LINES:  # make test runs the generic one on the newest line
            out.append(Cell(linux, "EP guest: Linux's pci-epf-test, RK3588", None,
                            preset="rk3588", ep_guest=True, xfail=RK3588_XFAIL,
                            args=RK3588_EP_GUEST_ARGS) if linux == DEFAULT_LINUX else
                       Cell(linux, "EP guest: Linux's pci-epf-test", None, ep_guest=True))
            if linux != DEFAULT_LINUX:  # make test runs it on the newest line
                out.append(Cell(linux, "EP guest: Linux's pci-epf-test on Linux's dw-edma",
                                None, ("dma_channels=dw-edma",), ep_guest=True,
                                xfail=("pci_ep_data_transfer.dma.COPY_TEST",)))
            out += [Cell(linux, "EP guest: Linux's vNTB", "pci-epf-vntb", ep_guest=True),
                    Cell(linux, "EP guest: Linux's nvmet-pci-epf", "nvmet-pci-epf",
                         ep_guest=True),
                    Cell(linux, "EP guest: Linux's pci-epf-ntb, two RC guests",
                         "pci-epf-ntb", ep_guest=True)]
        elif linux in OLD_NTB_IDS:
            out.append(Cell(linux, f"EP guest: {EP_GUEST_LINES[-1]}'s vNTB (i.MX8 preset)",
                            "pci-epf-vntb", preset="imx8", ep_guest=True,
                            ep_linux=EP_GUEST_LINES[-1]))
    return out


def run_cell(cell: Cell, run_dir: Path) -> Outcome:
    started = time.monotonic()
    if cell.ep_guest:
        status = run_ep_guest(EpGuestRun(cell.sets, cell.preset, guest_args=cell.args,
                                         xfail=cell.xfail, function=cell.function,
                                         ep_linux=cell.ep_linux),
                              linux=cell.linux, run_dir=run_dir)
    else:
        status = run_suite(RunSpec(Target(cell.function, None, None, cell.sets, cell.preset,
                                          cell.xfail), linux=cell.linux,
                                   guest_args=cell.args), run_dir)
    counts = {"pass": 0, "fail": 0, "skip": 0}
    results = run_dir / "results.json"
    if results.is_file():
        for t in json.loads(results.read_text())["tests"]:
            counts[t["status"] if t["status"] in counts else "fail"] += 1
    return Outcome(cell, status, counts["pass"], counts["fail"], counts["skip"],
                   time.monotonic() - started, run_dir)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| kernel | suite | result | pass | fail | skip |", "|---|---|---|---:|---:|---:|"]
    for o in outcomes:
        rows.append(f"| {o.cell.linux} | {o.cell.suite} | {'ok' if o.ok else 'FAILED'} | "
                    f"{o.passed} | {o.failed} | {o.skipped} |")
    return "\n".join(rows)


def run_matrix(lines: tuple[str, ...], out: Path, run_dir: Path | None) -> int:
    """Every cell of ``lines``; the table on stdout and in ``out``; 0 when all passed."""
    top = new_run_dir(run_dir)
    outcomes: list[Outcome] = []
    with keeping(lambda interruption: print(f"\n{table(outcomes)}\n\nmatrix: interrupted "
                                            f"({interruption}); run directories under {top}",
                                            flush=True)):
        for i, cell in enumerate(cells(lines), 1):
            print(f"\n# === Linux {cell.linux}: {cell.suite} ===", flush=True)
            slug = "-".join(cell.suite.replace(",", "").replace("(", "").replace(")", "")
                            .replace(".", "").replace(":", "").replace("'", "").split()).lower()
            outcomes.append(run_cell(cell, top / f"{i:02d}-{cell.linux}-{slug}"))
    text = table(outcomes)
    print(f"\n{text}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Kernel matrix (`make test-matrix`), {time.strftime('%Y-%m-%d')}: each "
                   f"cell a `vfio-ep run`.\n\n{text}\n")
    print(f"\nmatrix: {out}; run directories under {top}")
    failed = [o for o in outcomes if not o.ok]
    for o in failed:
        print(f"FAILED Linux {o.cell.linux} {o.cell.suite}: {o.run_dir}", file=sys.stderr)
    return 1 if failed else 0
