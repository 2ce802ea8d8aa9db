"""`vfio-ep run` as a user types it, for the guest acceptance tests, and the README's
examples (each run by a test exactly as written: :func:`readme_example`)."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent
_PLACEHOLDER = re.compile(r"[A-Z][A-Z_]*|.*=[A-Z][A-Z_]*|\[.*|[^ ]*\|[^ ]*|.*&|#.*")

# Linux 7.3's pci_endpoint_test kselftest: its cases, what a full run reports.
KSELFTEST_CASES = 23


def readme_examples() -> list[str]:
    """Every command the README shows with real arguments (in code spans and blocks, lines
    joined), leaving out synopses and placeholders (FILE, [--opt], a|b, &) and bare command
    names."""
    text = README.read_text()
    blocks = re.findall(r"```\w*\n(.*?)```", text, flags=re.S)
    spans = re.findall(r"`([^`]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    found = []
    for candidate in spans + [line for b in blocks for line in b.splitlines()]:
        command = " ".join(candidate.split())
        if not command.startswith("vfio-ep "):
            continue
        words = shlex.split(command)
        has_arguments = len(words) > 2 or (len(words) == 2 and words[1].startswith("-"))
        if has_arguments and not any(_PLACEHOLDER.fullmatch(w) for w in words[1:]):
            found.append(command)
    return list(dict.fromkeys(found))


def readme_block(containing: str) -> list[str]:
    """The lines of the README's code block that has ``containing`` (a recipe a test runs
    as written)."""
    blocks = re.findall(r"```\w*\n(.*?)```", README.read_text(), flags=re.S)
    found = [b for b in blocks if containing in b]
    assert len(found) == 1, f"{len(found)} README code blocks have {containing!r}"
    return found[0].splitlines()


def readme_example(command: str) -> list[str]:
    """The README's ``command``, which must be there as written, split into the arguments
    after ``vfio-ep`` (the tests add only a ``--run-dir`` of their own)."""
    assert command in readme_examples(), f"the README has no example {command!r}"
    return shlex.split(command)[1:]


def vfio_ep_run(tmp_path: Path, *args: str, prefix: tuple[str, ...] = (),
                cwd: Path | None = None) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``vfio-ep run --run-dir TMP/run ARGS`` (under ``prefix``, e.g. ``unshare``; in
    ``cwd``): its exit status and output, and the results.json it wrote (which must
    exist)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([*prefix, sys.executable, "-m", "vfio_ep", "run", "--run-dir",
                           str(run_dir), *args], capture_output=True, text=True, timeout=1200,
                          cwd=cwd)
    results = run_dir / "results.json"
    assert results.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(results.read_text())


def assert_passed(proc: subprocess.CompletedProcess[str], results: dict,
                  names: list[str]) -> None:
    """Every test passed, exactly ``names`` ran, and the exit status says so."""
    failed = [f"{t['name']}: {t['reason']} {t['diagnostics']}" for t in results["tests"]
              if t["status"] != "pass"]
    assert not failed, f"{failed}\n{proc.stdout[-4000:]}"
    assert [t["name"] for t in results["tests"]] == names
    assert proc.returncode == 0 and results["passed"], proc.stderr[-3000:]


class Terminal:
    """``vfio-ep ARGS`` on a pty of its own, as on a developer's terminal (a guest's shell
    there: ``--shell``, ``--ep-shell``): what it prints, what is typed at it, its exit
    status."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: vfio-ep on the pty
            os.execv(sys.executable, [sys.executable, "-m", "vfio_ep", *args])
        self.seen = b""

    @property
    def text(self) -> str:
        return self.seen.decode(errors="replace")

    def until(self, token: bytes, seconds: float) -> bool:
        """Read what vfio-ep prints until ``token`` (a prompt comes without a newline after
        it) or ``seconds``; whether it came."""
        end = time.monotonic() + seconds
        while token not in self.seen and time.monotonic() < end:
            if select.select([self.fd], [], [], 0.5)[0]:
                try:
                    self.seen += os.read(self.fd, 4096)
                except OSError:  # vfio-ep closed the pty
                    break
        return token in self.seen

    def type(self, line: str) -> None:
        """A line typed at the terminal (Enter is a carriage return there)."""
        os.write(self.fd, line.encode() + b"\r")

    def wait(self, kill_after: float | None = None) -> int:
        """vfio-ep's exit status, once it has exited; with ``kill_after``, SIGTERM (it stops
        its guests, as on Ctrl-C) if it has not within so many seconds: a test that failed
        midway does not hang on the shell it left open."""
        end = time.monotonic() + (kill_after if kill_after is not None else float("inf"))
        while (reaped := os.waitpid(self.pid, os.WNOHANG)) == (0, 0):
            if time.monotonic() > end:
                os.kill(self.pid, signal.SIGTERM)
                end = float("inf")
            self.until(b"\0never\0", 0.5)  # keep its output flowing meanwhile
        status = reaped[1]
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def shell_session(args: list[str], typed: str, boot_seconds: float) -> tuple[int, str]:
    """``vfio-ep ARGS`` on a terminal of its own: once its shell's banner and prompt show
    (within ``boot_seconds``), ``typed`` at the prompt, then until the run ends (SIGTERM if
    it hangs); its exit status and everything the terminal showed."""
    terminal = Terminal(*args)
    try:
        assert terminal.until(b"Ctrl-A X stops QEMU", boot_seconds), terminal.text
        assert terminal.until(b"# ", 30)  # the prompt, shown without a newline after it
        terminal.type(typed)
        terminal.until(b"run directory", 120)
    finally:
        status = terminal.wait(kill_after=180)
    return status, terminal.text
