"""Acceptance: Ctrl-C (SIGINT) and a CI job's timeout (SIGTERM) in every mode of `vfio-ep
run` (the EP guest's too) and in `vfio-ep soak`, sent to a real run once its first phase
has printed its TAP.

Each mode exits 128 + the signal, keeps what finished in its run directory (results.json,
results.xml and results.tap with the phases done and the one cut short; the soak's
summary), prints that directory, and leaves none of its QEMUs and servers behind: every
process it started (each in a process group of its own), found by pid while it ran, is
gone with its group when it has exited.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.guest


def _kselftest(run_dir: Path, printed: str) -> None:
    """The kselftest's own detail: the test the signal cut short is named."""
    results = json.loads((run_dir / "results.json").read_text())
    assert " while " in results["error"], results["error"]
    assert results["counts"]["pass"] + results["counts"]["skip"] >= 2


def _matrix(run_dir: Path, printed: str) -> None:
    """One results.xml of the finished cell and the one cut short, and the table of both."""
    assert "| doorbell=msi | ok | 2 | 0 | 0 |" in printed, printed[-3000:]
    assert re.search(r"\| doorbell=poll \| FAILED \| \d+ \| [1-9]", printed), printed[-3000:]
    assert (run_dir / "results.xml").read_text().count("<testsuite ") == 2
    assert json.loads((run_dir / "doorbell=msi" / "results.json").read_text())["passed"]
    cut = json.loads((run_dir / "doorbell=poll" / "results.json").read_text())
    assert re.fullmatch(r"interrupted.* \(SIGINT\)", cut["error"]), cut


def _soak(run_dir: Path, printed: str) -> None:
    assert re.search(r"soak: [1-9]\d* runs .*; interrupted \(SIGINT\)", printed), printed
    assert (run_dir / "run0001" / "console.log").is_file()


@dataclass(frozen=True)
class Mode:
    args: tuple[str, ...]  # after `vfio-ep`; the test adds --run-dir
    ready: tuple[str, ...]  # stdout lines starting so, in order: then the signal goes
    signum: int
    finished: tuple[str, ...] = ()  # the first tests in results.json, passed before it
    results: bool = True  # results.json, .xml and .tap in the run directory
    check: Callable[[Path, str], None] | None = None  # the mode's own (run dir, output)


MODES = {
    "vntb": Mode(("run", "--function", "pci-epf-vntb", "--", "tool", "pingpong"),
                 ("ok 1 pingpong.",), signal.SIGINT,
                 tuple(f"tool.{t}" for t in ("hw_epf_bound", "tool_bound", "link_up",
                                             "spads_both_ways", "doorbell_0", "doorbell_1",
                                             "mw_both_ways"))),
    "ntb-pair": Mode(("run", "--topology", "ntb-pair", "--", "tool", "pingpong"),
                     ("a: ok 1 a.pingpong.",), signal.SIGTERM,
                     tuple(f"{r}.tool.{t}" for r in "ab" for t in (
                         "driver_bound", "link_up", "spads_both_ways",
                         "doorbells_14_both_ways", "mw_both_ways"))),
    "kselftest": Mode(("run",), ("ok 1 ", "ok 2 ", "#  RUN"), signal.SIGTERM,
                      check=_kselftest),
    "matrix": Mode(("run", "--matrix", "doorbell=msi,poll", "--", "-t", "READ_TEST"),
                   ("# === doorbell=poll ===", "ok 1 "), signal.SIGINT, results=False,
                   check=_matrix),
    "ep-guest": Mode(("run", "--ep-guest"), ("rc: ok 1 ", "rc: ok 2 ", "rc: #  RUN"),
                     signal.SIGINT, check=_kselftest),
    "exec": Mode(("run", "--exec", "echo started; sleep 600"), ("started",), signal.SIGTERM,
                 results=False),  # the command's output is all there is: console.log
    "soak": Mode(("soak", "--minutes", "10", "--seed", "1"), ("run 1:",), signal.SIGINT,
                 results=False, check=_soak),
}


@pytest.mark.parametrize("name", MODES)
def test_a_signal_keeps_what_finished_and_leaves_no_process(tmp_path: Path, name: str) -> None:
    mode = MODES[name]
    run_dir = tmp_path / "run"
    command, *args = mode.args
    with (tmp_path / "stderr").open("w+") as err:
        proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", command, "--run-dir",
                                 str(run_dir), *args], stdout=subprocess.PIPE, stderr=err,
                                text=True)
        try:
            seen = _until(proc, mode.ready, deadline=600)
            started = _started_by(proc.pid, deadline=60)
            proc.send_signal(mode.signum)
            out, _ = proc.communicate(timeout=120)
        finally:
            proc.kill()
        err.seek(0)
        printed = seen + out + err.read()
    assert proc.returncode == 128 + mode.signum, printed[-3000:]
    assert f"run directory: {run_dir}" in printed, printed[-3000:]
    _assert_gone(started)
    assert any(run_dir.rglob("console.log"))
    if mode.check is not None:
        mode.check(run_dir, printed)
    if mode.results:
        _assert_results(run_dir, mode)


def _assert_results(run_dir: Path, mode: Mode) -> None:
    """The tests that finished passed, the ones cut short are errors, the run failed."""
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "results.xml").is_file() and (run_dir / "results.tap").is_file()
    passed = [t["name"] for t in results["tests"] if t["status"] == "pass"]
    assert list(mode.finished) == passed[:len(mode.finished)], results["tests"]
    assert not results["passed"] and results["exit_status"] is None
    signame = signal.Signals(mode.signum).name
    assert re.fullmatch(rf"interrupted( while \S+ ran)? \({signame}\)", results["error"]), \
        results["error"]
    assert results["counts"]["error"] >= 1  # the phase cut short: planned, never reported


def _until(proc: subprocess.Popen[str], prefixes: tuple[str, ...], deadline: float) -> str:
    """Read the run's stdout until lines starting with each of ``prefixes`` came, in order;
    what was read."""
    assert proc.stdout is not None
    seen, wanted = [], list(prefixes)
    end = time.monotonic() + deadline
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while wanted:
            assert time.monotonic() < end and proc.poll() is None, "".join(seen)[-3000:]
            if sel.select(timeout=1):
                line = proc.stdout.readline()
                seen.append(line)
                if line.startswith(wanted[0]):
                    wanted.pop(0)
    return "".join(seen)


def _processes() -> dict[int, tuple[int, int, int, str]]:
    """Every process: pid -> (parent, process group, start time, command line)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # gone meanwhile
            continue
        found[int(entry.name)] = (int(stat[1]), int(stat[2]), int(stat[19]), cmdline)
    return found


def _started_by(pid: int, deadline: float) -> dict[int, tuple[int, int, int, str]]:
    """The run's descendants once a QEMU and a server are among them (the signal must
    find both running)."""
    end = time.monotonic() + deadline
    while True:
        procs = _processes()
        family, grew = {pid}, True
        while grew:
            more = {p for p, (parent, *_) in procs.items() if parent in family} - family
            family |= more
            grew = bool(more)
        started = {p: procs[p] for p in family - {pid} if p in procs}
        commands = " ".join(c for *_, c in started.values())
        if "qemu-system" in commands and " serve " in commands:
            return started
        assert time.monotonic() < end, f"no QEMU and server under {pid}: {commands}"
        time.sleep(0.2)


def _assert_gone(started: dict[int, tuple[int, int, int, str]]) -> None:
    """None of ``started`` (the same pid and start time) nor anything in their process
    groups still runs (allowing a few seconds for orphans to be reaped)."""
    groups = {group for _, group, _, _ in started.values()}
    end = time.monotonic() + 10
    while True:
        procs = _processes()
        left = {p: c for p, (_, group, start, c) in procs.items()
                if (p in started and started[p][2] == start) or group in groups}
        if not left or time.monotonic() > end:
            break
        time.sleep(0.2)
    assert not left, left
    assert os.getpid() not in groups  # the run's children had groups of their own
