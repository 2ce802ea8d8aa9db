"""What every benchmark shares: result tables (text and markdown), the results files, a
``vfio-ep serve`` subprocess, and cached C builds.

The server always runs as its own process, as QEMU would see it: a server thread in the
benchmark's process would share the GIL with the load generator and measure both.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vfio_ep.guest.assets import GUEST_PROGRAMS
from vfio_ep.guest.provision import cache_dir
from vfio_ep.tail import tail

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DEFAULT_OUT = REPO / "results" / "bench.json"
NATIVE = REPO / "native"  # C headers the benchmarks' programs share with the fast path
SERVER_READY_TIMEOUT = 30.0
PROBE_ENV = "VFIO_EP_PROBE"  # a probed server's file (vfio_ep.bench.probe)


class BenchError(RuntimeError):
    """A benchmark could not produce a number; the message says why."""


# -- results -----------------------------------------------------------------
@dataclass(frozen=True)
class Column:
    """One table column: ``fmt`` formats the row's ``key`` value (None prints as a dash)."""

    key: str
    header: str
    fmt: str = "{}"

    def cell(self, row: dict[str, Any]) -> str:
        value = row.get(self.key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return self.fmt.format(value)


@dataclass
class Result:
    """One benchmark's table, with what it was measured against and how."""

    name: str
    title: str
    baseline: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    params: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    measured: str = field(default_factory=lambda: _now())  # when the benchmark finished

    def text(self) -> str:
        head = [c.header for c in self.columns]
        cells = [[c.cell(r) for c in self.columns] for r in self.rows]
        widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h)
                  for i, h in enumerate(head)]
        # First column left-aligned (names), numbers right-aligned.
        def line(values: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(values, widths, strict=True)))
        out = [f"== {self.name}: {self.title}", f"   baseline: {self.baseline}",
               line(head), line(["-" * w for w in widths]), *(line(r) for r in cells)]
        out += [f"   {n}" for n in self.notes]
        return "\n".join(out)

    def markdown(self) -> str:
        head = [c.header for c in self.columns]
        out = [f"**{self.name}**: {self.title} (baseline: {self.baseline})", "",
               "| " + " | ".join(head) + " |",
               "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
        out += ["| " + " | ".join(c.cell(r) for c in self.columns) + " |" for r in self.rows]
        if self.notes:
            out += ["", *(f"- {n}" for n in self.notes)]
        return "\n".join(out)

    def to_json(self) -> dict[str, Any]:
        return {"title": self.title, "baseline": self.baseline, "params": self.params,
                "rows": self.rows, "notes": self.notes, "seconds": round(self.seconds, 1),
                "columns": [asdict(c) for c in self.columns], "measured": self.measured}


def ratio(value: float | None, baseline: float | None) -> float | None:
    """value / baseline, or None when either is missing or the baseline is zero."""
    if value is None or not baseline:
        return None
    return value / baseline


def median(values: Sequence[float]) -> float:
    s = sorted(values)
    n = len(s)
    if not n:
        raise ValueError("median of nothing")
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def write_results(results: list[Result], out: Path) -> tuple[Path, Path]:
    """Merge ``results`` into the JSON file (other benchmarks' last numbers are kept) and
    regenerate the markdown next to it from everything the JSON now holds."""
    data: dict[str, Any] = {}
    if out.exists():
        with contextlib.suppress(ValueError, OSError):
            data = json.loads(out.read_text())
    benches = data.get("benchmarks", {})
    for r in results:
        benches[r.name] = r.to_json()
    from vfio_ep.bench import NAMES  # the canonical order

    ordered = {n: benches[n] for n in NAMES if n in benches}
    ordered.update({n: b for n, b in benches.items() if n not in ordered})
    data = {"host": host_info(), "updated": _now(), "benchmarks": ordered}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    md = out.with_suffix(".md")
    md.write_text(markdown_from_json(data))
    return out, md


def markdown_from_json(data: dict[str, Any]) -> str:
    host = data.get("host", {})
    parts = [f"Benchmarks (`make bench`), {data.get('updated', '?')} on {host.get('cpus', '?')} "
             f"CPUs ({host.get('cpu', '?')}), Python {host.get('python', '?')}. Ratios are "
             "against a baseline measured in the same run.", ""]
    for name, b in data.get("benchmarks", {}).items():
        r = Result(name, b["title"], b["baseline"], [Column(**c) for c in b["columns"]],
                   b["rows"], b.get("params", {}), b.get("notes", []), b.get("seconds", 0.0))
        parts += [r.markdown(), ""]
    return "\n".join(parts)


def host_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg": [round(x, 2) for x in os.getloadavg()]}


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


# -- the server under test ------------------------------------------------------
@dataclass
class Server:
    """A running ``python -m vfio_ep serve``: its pid, socket and log."""

    proc: subprocess.Popen[bytes]
    socket: Path
    log: Path
    probe: Path | None = None  # where a probed server writes (vfio_ep.bench.probe)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log.read_text(errors="replace") if self.log.exists() else "", lines)


@contextlib.contextmanager
def serve(sets: Sequence[str] = (), *, fastpath: bool = True, function: str = "pci-epf-test",
          verbose: bool = False, argv: Sequence[str] | None = None,
          controllers: int = 0, probe: bool = False) -> Iterator[Server]:
    """Start a server subprocess (``argv`` replaces the vfio-ep command, e.g. a sink), wait
    for its socket, and stop it (SIGTERM, then SIGKILL) on exit.  ``controllers`` > 0: that
    many controllers, each with its own ``function`` and socket ``ep<k>.sock`` (the
    Server's ``socket`` is the first).  ``probe``: vfio-ep with its stages measured
    (vfio_ep.bench.probe)."""
    tmp = Path(tempfile.mkdtemp(prefix="vfio-ep-bench-"))  # short: sun_path <= 107
    sock = tmp / ("ep0.sock" if controllers else "ep.sock")
    log = tmp / "server.log"
    vfio_ep = [sys.executable, "-m", "vfio_ep.bench.probe" if probe else "vfio_ep"]
    if controllers:
        config = tmp / "composition.toml"
        config.write_text("".join(
            f'[controllers.ep{k}]\nsocket = "{tmp}/ep{k}.sock"\n'
            f'[functions.f{k}]\ntype = "{function}"\nprimary = "ep{k}"\n'
            for k in range(controllers)))
        cmd = [*vfio_ep, "serve", "--config", str(config)]
    elif argv is None:
        cmd = [*vfio_ep, *(["-v"] if verbose else []), "serve", "--socket", str(sock),
               "--function", function]
        for s in sets:
            cmd += ["--set", s]
    else:
        cmd = [*argv, str(sock)]
    env = {**os.environ, "VFIO_EP_FASTPATH": "1" if fastpath else "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    probe_file = tmp / "probe.json" if probe else None
    if probe_file is not None:
        env[PROBE_ENV] = str(probe_file)
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    server = Server(proc, sock, log, probe_file)
    try:
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        while not all((tmp / f"ep{k}.sock").exists() for k in range(controllers)) \
                or not sock.exists():
            if proc.poll() is not None:
                raise BenchError(f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                                 f"{server.log_tail()}")
            if time.monotonic() > deadline:
                raise BenchError(f"{' '.join(cmd)} made no socket:\n{server.log_tail()}")
            time.sleep(0.02)
        yield server
    except Exception as e:
        e.add_note(f"--- server log (tail) ---\n{server.log_tail()}")
        raise
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)


def connect(path: Path, timeout: float = 60.0) -> socket.socket:
    """Connect, retrying briefly: the socket file exists from bind(), a moment before listen()."""
    deadline = time.monotonic() + 5
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


# -- CPU time of a process ---------------------------------------------------------
@dataclass(frozen=True)
class ProcSample:
    """A process's CPU use so far."""

    when: float  # time.monotonic()
    on_cpu: float  # seconds, all threads (exited ones too), ns resolution
    ticks: float  # seconds, utime+stime from /proc/PID/stat (clock-tick resolution)
    wakeups: int  # context switches of all its threads (trio loop, the poll doorbell's poller)


def sample_process(pid: int) -> ProcSample:
    hz = os.sysconf("SC_CLK_TCK")
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = (int(fields[11]) + int(fields[12])) / hz  # utime, stime (fields 14, 15)
    try:  # the process's CPU-time clock: clock_getcpuclockid(pid), MAKE_PROCESS_CPUCLOCK
        on_cpu = time.clock_gettime((~pid << 3) | 2)
    except OSError:
        on_cpu = ticks
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just exited
            switches += sum(int(line.split()[1]) for line in
                            (task / "status").read_text().splitlines()
                            if "ctxt_switches:" in line)
    return ProcSample(time.monotonic(), on_cpu, ticks, switches)


def thread_cpu(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of ``pid`` has run so far, by thread id (its schedstat): the
    main thread's id is ``pid``."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that just exited
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return out


# -- C programs ------------------------------------------------------------------
def build_c(source: Path, *, static: bool = False, flags: Sequence[str] = ()) -> Path:
    """Compile ``source`` with gcc -O2, native/'s headers on its include path (the wire
    format, vfu_wire.h), cached under the cache dir, keyed by the source, those headers and
    the ones beside it, the flags and the compiler, so a re-run compiles nothing."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BenchError("gcc not found: the benchmarks compile small C programs")
    argv = ["-O2", "-Wall", "-Wextra", "-I", str(NATIVE), *(["-static"] if static else []),
            *flags]
    version = subprocess.run([gcc, "--version"], capture_output=True, text=True,
                             check=False).stdout.splitlines()[:1]
    headers = b"".join(h.read_bytes() for d in (NATIVE, source.parent)
                       for h in sorted(d.glob("*.h")))
    key = hashlib.sha256(source.read_bytes() + headers + repr((argv, version)).encode()
                         ).hexdigest()[:12]
    out = cache_dir() / "bench" / f"{source.stem}-{key}"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.partial")
    proc = subprocess.run([gcc, *argv, "-o", str(tmp), str(source)], capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        raise BenchError(f"gcc {source.name} failed:\n{proc.stderr.strip()}")
    tmp.rename(out)
    return out


def guest_programs() -> dict[str, Path]:
    """Every ``qemu/bench/*.c``, static (the initramfs has no libc), by program name."""
    return {src.stem: build_c(src, static=True) for src in sorted(GUEST_PROGRAMS.glob("*.c"))}
