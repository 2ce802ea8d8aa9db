"""``vfio-ep run``: boot a guest against a fresh vfio-ep and run the function's suite.

pci-epf-test gets the upstream pci_endpoint_test kselftest; pci-epf-vntb gets the NTB suite
(``ntb_suite.sh``): one guest per EP-side client (tool, pingpong, netdev), each phase's TAP
merged into one report.  Either way TAP, JUnit and JSON land in the run directory.
"""

from __future__ import annotations

import itertools
import re
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

from vfio_ep import cmdline
from vfio_ep.composition import Composition
from vfio_ep.config import ConfigError
from vfio_ep.epc.core import EpcError
from vfio_ep.guest.assets import KSELFTEST, NTB_PAIR, NTB_SUITE, TAP_LIB
from vfio_ep.guest.children import LaunchError
from vfio_ep.guest.guests import Cue, GuestSpec, boot_guests
from vfio_ep.guest.initramfs import parse_console
from vfio_ep.guest.interrupt import Interrupted, keeping
from vfio_ep.guest.kernel_build import DEFAULT_LINUX
from vfio_ep.guest.launcher import KSELFTEST_NAME, GuestBoot, GuestResult, boot_guest
from vfio_ep.guest.provision import GuestAssets, ProvisionError, provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions
from vfio_ep.guest.results import (
    Report,
    TestCase,
    expect_failures,
    load_results,
    merge_reports,
    metrics_table,
    parse_tap,
    summary_table,
    write_junit,
    write_results,
)
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.guest.server import Facts
from vfio_ep.guest.trace import write_trace

PAIR_ROLES = ("a", "b")
NTB_PHASES = ("tool", "pingpong", "netdev")
PAIR_PHASES = ("tool", "pingpong", "perf", "netdev", "rejoin")
PINGPONG_DELAY_MS = 20  # the guest's ntb_pingpong is loaded with the same delay_ms
# What ntb_pair.sh prints once its guest has loaded ntb_transport, and its phases that do.
TRANSPORT_LOADED = "# ntb_transport loaded"
TRANSPORT_PHASES = ("netdev", "bench", "ping")


def pair_cue(role: str, phase: str) -> Cue | None:
    """When guest ``role`` of an NTB pair boots in ``phase``: b after a has loaded
    ntb_transport, if the phase loads it (two hosts that enable its link at once can lose
    it: ntb_pair.sh's transport_up says how); else with the other."""
    return ("a", TRANSPORT_LOADED) if role == "b" and phase in TRANSPORT_PHASES else None


@dataclass(frozen=True)
class Target:
    """What ``vfio-ep serve`` is asked to serve, as the command line said it."""

    function: str | None
    config_file: Path | None
    configfs: Path | None
    sets: tuple[str, ...]
    preset: str | None = None
    xfail: tuple[str, ...] = ()  # tests whose failure is known upstream behaviour

    def report(self, output: str, line_times: list[tuple[float, str]] | None = None) -> Report:
        """A boot's TAP, with this run's expected failures applied."""
        return expect_failures(parse_tap(output, line_times), self.expected_failures())

    def expected_failures(self) -> tuple[str, ...]:
        """The --xfail tests that apply here: ``TEST`` always, ``KEY=VALUE:TEST`` only when
        this run sets KEY=VALUE (a matrix cell's value, a ``--set``, or ``preset=BOARD``)."""
        here = {*self.sets, *([f"preset={self.preset}"] if self.preset else [])}
        names = []
        for entry in self.xfail:
            scope, sep, name = entry.rpartition(":")
            if sep and "=" not in scope:
                raise ConfigError(f"--xfail {entry}: the scope is KEY=VALUE (a matrix axis, "
                                  "a --set or preset=BOARD), as in "
                                  "controller=rk3588:pci_ep_basic.LEGACY_IRQ_TEST")
            if not sep or scope in here:
                names.append(name)
        return tuple(names)

    def exit_status(self, result: GuestResult, report: Report) -> int | None:
        """The guest's exit status, 0 when its only failures were expected ones (the tools
        exit 1 on any failure; --xfail turned those into xfail)."""
        if result.exit_status == 1 and report.passed and report.counts()["xfail"]:
            return 0
        return result.exit_status

    def server_args(self, *extra_sets: str) -> list[str]:
        args = ["--function", self.function] if self.function else []
        if self.preset:
            args += ["--preset", self.preset]
        if self.config_file:
            args += ["--config", str(self.config_file.resolve())]
        if self.configfs:
            args += ["--configfs", str(self.configfs.resolve())]
        for item in (*self.sets, *extra_sets):
            args += ["--set", item]
        return args


@dataclass(frozen=True)
class RunSpec:
    """One ``vfio-ep run`` as its command line asks: what the server serves (``target``),
    the guest (its kernel line, images and options), and what it runs (the function's suite
    with ``guest_args``, or ``exec_cmd``) within ``timeout`` seconds."""

    target: Target
    linux: str = DEFAULT_LINUX
    kernel: Path | None = None
    kselftest: Path | None = None
    qemu: Path | None = None
    guest_args: tuple[str, ...] = ()
    exec_cmd: str | None = None
    options: GuestOptions = DEFAULT_OPTIONS
    timeout: float = 600.0


def run_suite(spec: RunSpec, run_dir: Path | None = None) -> int:
    """Run the suite of the configured function; 0 only if every test passed.  With
    ``exec_cmd``, the guest (both guests of a pci-epf-ntb pair) runs that instead.

    Returns 1 when a test failed, none ran or the guest never finished, 2 when the
    configuration, provisioning or launching failed; with ``exec_cmd``, the command's exit
    status (124 when the run timed out).
    """
    target = spec.target
    try:
        target.expected_failures()  # a malformed --xfail fails here, before any boot
        comp = cmdline.load(target.config_file, target.function, list(target.sets),
                            target.configfs, preset=target.preset)
        if len(comp.functions) != 1:
            raise ConfigError(f"vfio-ep run boots one guest against one function; this "
                              f"composition has {len(comp.functions)} "
                              f"({', '.join(comp.functions)})")
        func = next(iter(comp.functions.values()))
        if spec.exec_cmd is not None and spec.guest_args:
            raise ConfigError(f"--exec runs its command alone: put "
                              f"{shlex.join(spec.guest_args)} into it")
        if spec.options.interactive:
            if func.secondary is not None:
                raise ConfigError("--shell gives one guest the terminal; a pci-epf-ntb pair "
                                  "has two: use --exec")
            spec = replace(spec, exec_cmd=SHELL)
        assets = provision_all(qemu=spec.qemu, kernel=spec.kernel, linux=spec.linux,
                               kselftest=spec.kselftest)
        facts = guest_facts(assets)
        if spec.exec_cmd is not None:
            controllers = [c for c in (func.primary, func.secondary) if c is not None]
            return _run_exec(spec, assets, controllers, run_dir)
        if func.driver == "pci_epf_vntb":
            return _run_ntb_suite(spec, assets, run_dir, facts)
        if func.driver == "pci_epf_ntb":
            assert func.primary is not None and func.secondary is not None
            return _run_ntb_pair(spec, assets, (func.primary, func.secondary), run_dir, facts)
        if assets.test_kind == "pcitest":
            return _run_pcitest(spec, assets, comp, run_dir, facts)
        return _run_kselftest(spec, assets, run_dir, facts)
    except (ConfigError, ValueError, EpcError, ProvisionError, LaunchError) as exc:
        print(f"vfio-ep run: {exc}", file=sys.stderr)
        return 2


# The interactive guest: a shell with the console as its controlling terminal (job control,
# Ctrl-C reaching its foreground job); its exit status ends the run.
SHELL = ("echo 'vfio-ep: a shell in the guest (the kselftest is /pci_endpoint_test, modules "
         "are in /lib/modules); exit ends the run with its status, Ctrl-A X stops QEMU'\n"
         "setsid cttyhack sh")


def run_suite_matrix(axes: list[str], spec: RunSpec, run_dir: Path | None = None) -> int:
    """``--matrix KEY=V1,V2,...`` (repeatable): the suite once per combination of the values,
    each an extra ``--set KEY=V`` after ``sets``; every cell's tests in one JUnit file (a
    test suite per cell) and a table.  0 only if every cell passed, 2 for a bad axis."""
    try:
        values = []
        for axis in axes:
            key, sep, listed = axis.partition("=")
            choices = [f"{key}={v}" for v in listed.split(",") if v]
            if not sep or not key or not choices:
                raise ConfigError(f"--matrix {axis}: KEY=VALUE,VALUE,... it is")
            values.append(choices)
    except ConfigError as exc:
        print(f"vfio-ep run: {exc}", file=sys.stderr)
        return 2
    top = new_run_dir(run_dir)
    cells: list[tuple[str, int, Path]] = []  # (name, exit status, run directory)
    running: list[tuple[str, Path]] = []

    def keep(interruption: Interrupted) -> None:
        """The cell that was running has kept its own results: the matrix's, with it."""
        cells.extend((name, interruption.status, cell_dir) for name, cell_dir in running)
        _matrix_results(cells, top)

    with keeping(keep):
        for combo in itertools.product(*values):
            name = " ".join(combo)
            cell_dir = top / re.sub(r"[^A-Za-z0-9.=-]+", "_", name)
            print(f"\n# === {name} ===", flush=True)
            running[:] = [(name, cell_dir)]
            status = run_suite(replace(spec, target=replace(
                spec.target, sets=(*spec.target.sets, *combo))), cell_dir)
            running.clear()
            cells.append((name, status, cell_dir))
    _matrix_results(cells, top)
    return 0 if all(status == 0 for _, status, _ in cells) else 1


def _matrix_results(cells: list[tuple[str, int, Path]], top: Path) -> None:
    """Every cell's tests in one results.xml, the cell table, the directory."""
    suites = []
    for name, status, cell_dir in cells:
        if (cell_dir / "results.json").is_file():
            report, endpoint = load_results(cell_dir)
        else:  # it never got to run (configuration, provisioning): one error says so
            report, endpoint = Report([TestCase(1, name, "error", f"exit {status} before any "
                                                "test ran")], None, None, ""), None
        suites.append((name, report, endpoint))
    write_junit(suites, top / "results.xml")
    print("\n| cell | result | pass | fail | skip |\n|---|---|---:|---:|---:|")
    for (name, status, _), (_, report, _) in zip(cells, suites, strict=True):
        counts = report.counts()
        print(f"| {name} | {'ok' if status == 0 else 'FAILED'} | {counts['pass']} | "
              f"{counts['fail'] + counts['error'] + counts['xpass']} | "
              f"{counts['skip'] + counts['xfail']} |")
    if measured := metrics_table([(name, report) for name, report, _ in suites]):
        print(f"\n{measured}")
    print(f"run directory: {top} (results.xml: every cell)", flush=True)


def _run_exec(spec: RunSpec, assets: GuestAssets, controllers: list[str],
              run_dir: Path | None) -> int:
    """Boot a guest per controller (``VFIO_EP_ROLE`` a, b, ... in its environment) that
    runs ``spec.exec_cmd`` with the suites' files at hand; the first failing status is ours."""
    top = new_run_dir(run_dir)
    guests = [GuestSpec(role, ctrl, f"export VFIO_EP_ROLE={role}\n{spec.exec_cmd}")
              for role, ctrl in zip(PAIR_ROLES, controllers, strict=False)]
    several = len(guests) > 1
    with keeping(Progress(top, spec.target, None, {}).keep):
        results = boot_guests(guests, server_args=spec.target.server_args(), assets=assets,
                              timeout=spec.timeout, run_dir=top, options=spec.options,
                              files={"ntb_suite.sh": NTB_SUITE, "ntb_pair.sh": NTB_PAIR,
                                     "tap_lib.sh": TAP_LIB},
                              live=lambda label, line: _echo(f"{label}: {line}" if several
                                                             else line))
    status = 0
    for guest, result in zip(guests, results, strict=True):
        where = f"guest {guest.label}: " if several else ""
        if result.exit_status is None:
            print(f"vfio-ep run: {where}{result.error}", file=sys.stderr)
            status = status or (124 if "timed out" in (result.error or "") else 2)
        else:
            status = status or result.exit_status
    print(f"run directory: {top}", file=sys.stderr)
    return status


def _run_kselftest(spec: RunSpec, assets: GuestAssets, run_dir: Path | None,
                   facts: dict[str, Any]) -> int:
    target, guest_args = spec.target, spec.guest_args
    top = new_run_dir(run_dir)
    progress = Progress(top, target, KSELFTEST_NAME, facts, running=[top])

    with keeping(progress.keep):
        result = boot_guest(GuestBoot(progress.recording(partial(kselftest_script, guest_args)),
                                      serve=target.server_args(), assets=assets,
                                      run_dir=top, files={"kselftest.sh": KSELFTEST},
                                      options=spec.options, live=_echo), spec.timeout)
        report = target.report(result.output, result.line_times)
        write_trace(result)
        unbound = next((line for line in result.output.splitlines()
                        if line.startswith("vfio-ep: ")), None)
        error = result.error
        if error and (running := _running_test(result.output)):
            error += f"; {running} was running"
        write_results(report, result.run_dir, exit_status=target.exit_status(result, report),
                      error=error, suite=KSELFTEST_NAME, endpoint=progress.facts)
        print(f"\n{summary_table(report)}")
        if error:
            print(f"vfio-ep run: {error}", file=sys.stderr)
        elif unbound:
            print(unbound.replace("vfio-ep: ", "vfio-ep run: ", 1), file=sys.stderr)
        elif report.ran_nothing:
            print(_nothing_selected(guest_args, assets, result.run_dir / "list"),
                  file=sys.stderr)
    print(f"run directory: {result.run_dir}")
    return 0 if target.exit_status(result, report) == 0 and report.passed else 1


def _run_pcitest(spec: RunSpec, assets: GuestAssets, comp: Composition,
                 run_dir: Path | None, facts: dict[str, Any]) -> int:
    """Linux before 6.14: pcitest.sh's cases (``pcitest_tap.sh``), with the vectors the
    function advertises."""
    target = spec.target
    if spec.guest_args:
        raise ConfigError(f"Linux {assets.linux} has pcitest, not the kselftest: "
                          f"{shlex.join(spec.guest_args)} selects nothing there")
    attrs = comp.function_attributes(next(iter(comp.functions)))
    msi, msix = attrs.msi_interrupts, attrs.msix_interrupts
    top = new_run_dir(run_dir)
    progress = Progress(top, target, "pcitest", facts, running=[top])
    with keeping(progress.keep):
        result = boot_guest(GuestBoot(progress.recording(f"sh /pcitest_tap.sh {msi} {msix}"),
                                      serve=target.server_args(), assets=assets, run_dir=top,
                                      options=spec.options, live=_echo), spec.timeout)
        report = target.report(result.output, result.line_times)
        write_trace(result)
        write_results(report, result.run_dir, exit_status=target.exit_status(result, report),
                      error=result.error, suite="pcitest", endpoint=progress.facts)
        print(f"\n{summary_table(report)}")
        if result.error:
            print(f"vfio-ep run: {result.error}", file=sys.stderr)
    print(f"run directory: {result.run_dir}")
    return 0 if target.exit_status(result, report) == 0 and report.passed else 1


@dataclass
class Progress:
    """What a run has finished so far, and the run directories of the guests still running:
    an interrupted run's results hold both (the running guests' TAP read from their console
    logs, the tests they planned and never reached counted as missing).  ``suite`` None: a
    command's own output (--exec), no results to write."""

    top: Path
    target: Target
    suite: str | None
    facts: dict[str, Any]
    running: list[Path] = field(default_factory=list)
    reports: list[Report] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)

    def served(self, facts: Facts) -> None:
        """What the run's server reported it serves, into the results' record of the
        endpoint (:func:`endpoint_record`)."""
        self.facts = self.facts | endpoint_record(facts)

    def recording(self, script: str | Callable[[Facts], str]) -> Callable[[Facts], str]:
        """A boot's ``script`` (or the function of its server's facts that makes it) that
        records those facts first (:meth:`served`): an interrupted run's results say what
        it tested too."""
        def script_of(facts: Facts) -> str:
            self.served(facts)
            return script(facts) if callable(script) else script
        return script_of

    def finished(self, result: GuestResult, label: str) -> None:
        """A guest's result: its report and trace.log, and its failure if it failed."""
        if result.facts:
            self.served(result.facts)
        report = self.target.report(result.output, result.line_times)
        self.reports.append(report)
        write_trace(result)
        if result.error or self.target.exit_status(result, report) != 0:
            self.failed.append(f"{label}: {result.error or f'exit {result.exit_status}'}")

    def keep(self, interruption: Interrupted) -> None:
        """Results of what finished and of what was running, the summary, the directory."""
        outputs = [parse_console(_read(d / "console.log"))[0] for d in self.running]
        running = next(filter(None, map(_running_test, outputs)), None)
        why = ("interrupted" + (f" while {running} ran" if running else "")
               + f" ({interruption})")
        summary = ""
        if self.suite is not None:
            report = merge_reports([*self.reports, *map(self.target.report, outputs)])
            write_results(report, self.top, exit_status=None, error=why, suite=self.suite,
                          endpoint=self.facts)
            summary = f"\n{summary_table(report)}\n"
        print(f"{summary}vfio-ep run: {why}\nrun directory: {self.top}", file=sys.stderr,
              flush=True)


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def _running_test(output: str) -> str | None:
    """The kselftest's ``#  RUN`` line without its verdict yet, if any."""
    running = None
    for line in output.splitlines():
        if line.startswith("#  RUN"):
            running = line.split(None, 2)[2].removesuffix("...").strip()
        elif line.startswith(("#            OK", "#          FAIL", "#            SKIP")) \
                or line.startswith(("ok ", "not ok ")):
            running = None
    return running


def _nothing_selected(guest_args: Sequence[str], assets: GuestAssets, run_dir: Path) -> str:
    """Why a run that ran no test fails: the selection, and the tests that exist (``-l``)."""
    selection = shlex.join(guest_args) or "(no arguments)"
    listing = boot_guest(GuestBoot(f"/{KSELFTEST_NAME} -l", assets=assets, run_dir=run_dir),
                         timeout=120)
    return (f"vfio-ep run: the kselftest selection {selection} matched no test, so the run "
            f"fails.\nThe kselftest's tests (its -l; select with -- -f FIXTURE, -v VARIANT, "
            f"-t TEST, -r FIXTURE.VARIANT.TEST; -T TEST leaves one out):\n"
            f"{listing.output.rstrip()}")


def guest_facts(assets: GuestAssets) -> dict[str, Any]:
    """What a run's results record of its guest: the kernel line and image."""
    return {"linux": assets.linux, "kernel": str(assets.kernel)}


def endpoint_record(served: Facts) -> dict[str, Any]:
    """What a run's results record of the endpoint, from what its server reported serving
    (``vfio-ep serve --facts``): the function, its IDs, each controller's profile, and the
    doorbell backend the function got."""
    first = next(iter(served.values()), {})
    return {"function": first.get("function"), "device": first.get("device"),
            "controllers": ", ".join(f"{name}: {entry.get('profile')}"
                                     for name, entry in served.items()),
            "doorbell": first.get("doorbell")}


def kselftest_script(guest_args: Sequence[str], served: Facts) -> str:
    """kselftest.sh with ``guest_args``, bound to the device the server says it serves."""
    ids = next(iter(served.values()))["device"]
    vendor, device = (f"{int(x, 16):#06x}" for x in ids.split(":"))
    return f"sh /kselftest.sh {vendor} {device} {shlex.join(guest_args)}"


def ntb_suite_script(phase: str, served: Facts) -> str:
    """``ntb_suite.sh`` for ``phase``, expecting the doorbells the server's pci-epf-vntb
    reports: how many the peer can ring, and whether they share one register."""
    vntb = next(iter(served.values()))
    return f"sh /ntb_suite.sh {phase} {vntb['doorbells']} {int(vntb['db_shared'])}"


def _run_ntb_suite(spec: RunSpec, assets: GuestAssets, run_dir: Path | None,
                   facts: dict[str, Any]) -> int:
    """One guest per phase, the EP running the matching client; the guest arguments select
    some phases."""
    target = spec.target
    progress = Progress(new_run_dir(run_dir), target, "ntb", facts)
    with keeping(progress.keep):
        for phase in select_phases("NTB suite", spec.guest_args, NTB_PHASES):
            print(f"# --- {phase}: the EP runs its {phase} client ---", flush=True)
            progress.running = [progress.top / phase]

            result = boot_guest(GuestBoot(
                progress.recording(partial(ntb_suite_script, phase)),
                serve=target.server_args(f"ntb_client={phase}",
                                         f"pingpong_delay_ms={PINGPONG_DELAY_MS}"),
                assets=assets, run_dir=progress.top / phase,
                files={"ntb_suite.sh": NTB_SUITE, "tap_lib.sh": TAP_LIB}, options=spec.options,
                live=_echo), spec.timeout)
            progress.running = []
            progress.finished(result, phase)
        return finish_suite(progress)


def _run_ntb_pair(spec: RunSpec, assets: GuestAssets, controllers: tuple[str, str],
                  run_dir: Path | None, facts: dict[str, Any]) -> int:
    """Two guests on one pci-epf-ntb (guest a on the primary, b on the secondary), booted
    together once per phase (rejoin: b boots twice); the guest arguments select some
    phases."""
    progress = Progress(new_run_dir(run_dir), spec.target, "ntb-pair", facts)
    with keeping(progress.keep):
        for phase in select_phases("NTB pair phase", spec.guest_args, PAIR_PHASES):
            print(f"# --- {phase}: both guests run {phase} ---", flush=True)
            guests = [GuestSpec(role, ctrl, f"sh /ntb_pair.sh {role} {phase}",
                                cue=pair_cue(role, phase))
                      for role, ctrl in zip(PAIR_ROLES, controllers, strict=True)]
            if phase == "rejoin":  # b's QEMU is gone, and b boots again
                guests.append(GuestSpec("b2", controllers[1],
                                        f"sh /ntb_pair.sh b {phase} 2", after="b"))
            progress.running = [progress.top / phase / g.label for g in guests]
            results = boot_guests(guests, server_args=spec.target.server_args(),
                                  assets=assets, timeout=spec.timeout,
                                  run_dir=progress.top / phase,
                                  files={"ntb_pair.sh": NTB_PAIR, "tap_lib.sh": TAP_LIB},
                                  live=lambda label, line: _echo(f"{label}: {line}"),
                                  options=spec.options)
            progress.running = []
            for guest, result in zip(guests, results, strict=True):
                progress.finished(result, f"{phase}/{guest.label}")
        return finish_suite(progress)


def select_phases(what: str, chosen: Sequence[str], known: tuple[str, ...]) -> list[str]:
    """The phases to run: those named after ``--`` (checked), else all."""
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise ConfigError(f"no {what} {', '.join(unknown)}; the phases are "
                          f"{', '.join(known)}")
    return list(chosen or known)


def finish_suite(progress: Progress) -> int:
    """Merge the boots' reports into one result, print it; 0 only if all passed."""
    report = merge_reports(progress.reports)
    assert progress.suite is not None
    write_results(report, progress.top, exit_status=1 if progress.failed else 0,
                  error="; ".join(progress.failed) or None, suite=progress.suite,
                  endpoint=progress.facts)
    print(f"\n{summary_table(report)}")
    for line in progress.failed:
        print(f"vfio-ep run: {line}", file=sys.stderr)
    print(f"run directory: {progress.top}")
    return 0 if report.passed and not progress.failed else 1


def _echo(line: str) -> None:
    print(line, flush=True)
