"""Boot a QEMU guest against a freshly started vfio-ep server, and own both processes.

The QEMU command line is assembled here and nowhere else. A run starts the server first, waits
for its socket, then starts QEMU (serial console on a pipe read live, QMP on a socket this
process listens on) and always tears both down: on success, failure, timeout, Ctrl-C or SIGTERM.
QMP (asyncio, PyPI ``qemu.qmp``) lives in this launcher process, never in the trio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from qemu.qmp import QMPClient

from vfio_ep.guest.assets import INSMOD, PCITEST_TAP, TAP_LIB
from vfio_ep.guest.initramfs import (
    BEGIN,
    END,
    build_initramfs,
    console_sections,
    guest_init,
    parse_console,
    sections_script,
)
from vfio_ep.guest.interrupt import SIGNALS, Interrupted
from vfio_ep.guest.provision import GuestAssets, Qemu, cache_dir, provision_all
from vfio_ep.tail import tail

# no_timer_check: what KVM, Hyper-V and VMware guests set for themselves.  A TCG guest is
# not seen as virtual, so it times its IO-APIC timer against the TSC at boot; on a busy host
# the ticks come late and, with interrupt remapping on, the kernel panics ("timer doesn't work
# through Interrupt-remapped IO-APIC"), seen in a loaded container suite.
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet no_timer_check"
DEFAULT_MEMORY_MB = 256
DEFAULT_MSG_TIMEOUT_MS = 10_000  # TCG guest + Python server: give slow replies room
ROOT_PORT = "rp0"
DEVICE_ID = "ep0"
SERVER_READY_TIMEOUT = 30.0
GRACE = 5.0
TASK_DUMP_SECONDS = 3.0  # for a timed-out guest's sysrq-t dump to reach the console
RESCUE_LIMIT = 32 << 20  # bytes: the largest dmesg + trace buffer the rescue console takes
RESCUE_SECONDS = 20.0  # for a timed-out guest's dmesg (and trace) through the rescue console
# What the rescue console prints when done; the tty's echo of the command has $((6*7)).
RESCUE_DONE, RESCUE_DONE_CMD = b"@@vfio-ep: rescue 42@@", "echo '@@vfio-ep: rescue' $((6*7))@@"
KEEP_RUNS = 20  # run directories kept under the cache's runs/ (VFIO_EP_KEEP_RUNS)
KSELFTEST_NAME = "pci_endpoint_test"
TEST_FILES = {"kselftest": KSELFTEST_NAME, "pcitest": "pcitest"}  # the guest's /NAME, by kind
# The guest's insmod (qemu/guest/insmod.sh, adding the command line's NAME.dyndbg as
# modprobe would), for commands that say `insmod`.
GUEST_INSMOD = 'insmod() { /sbin/insmod "$@"; }\n'
GUEST_MODULES = "lib/modules"  # where the initramfs holds the kernel's modules (insmod PATH)
_PR_SET_PDEATHSIG = 1

Live = Callable[[str], None]
T = TypeVar("T")


class LaunchError(RuntimeError):
    """The server or QEMU could not be started; the message carries the tail of its log."""


@dataclass
class GuestResult:
    """What a guest run produced. ``exit_status`` is None when the guest command never ended."""

    exit_status: int | None
    output: str
    run_dir: Path
    server_log: str
    error: str | None = None
    # (time.monotonic() when it reached us, line) of each line the command printed
    line_times: list[tuple[float, str]] = field(default_factory=list)
    # time.monotonic() when the command began (its BEGIN line reached us): the guest's
    # dmesg has the same moment on its own clock (initramfs.KMSG_BEGIN)
    began: float | None = None

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


@dataclass(frozen=True)
class GuestOptions:
    """How every guest of a run boots, beyond its script: memory, CPUs, kernel arguments,
    QEMU arguments of the user's, and a gdbstub."""

    memory_mb: int = DEFAULT_MEMORY_MB
    append: str = ""  # after DEFAULT_APPEND, so the user's arguments win
    cpus: int = 1
    qemu_args: tuple[str, ...] = ()  # last on QEMU's command line
    gdb_port: int | None = None  # QEMU's gdbstub on 127.0.0.1:PORT
    interactive: bool = False  # the serial console on our terminal (stdin to the guest)
    shares: tuple[Share, ...] = ()  # host directories mounted in the guest (virtio-9p)
    dyndbg: tuple[str, ...] = ()  # dynamic debug queries, "module ntb_transport +p"
    trace_events: tuple[str, ...] = ()  # boot-time trace events, "irq:irq_handler_entry"
    ftrace_filter: tuple[str, ...] = ()  # functions for the boot-time function tracer
    workdir: str | None = None  # the guest's directory for the command (inside a share)
    accel: str = "tcg"  # a key of ACCELERATORS

    @property
    def cmdline(self) -> str:
        """The kernel command line: ours, the debugging options', then the user's own."""
        return " ".join(filter(None, (DEFAULT_APPEND, *debug_cmdline(
            self.dyndbg, self.trace_events, self.ftrace_filter), self.append)))

    def qemu_argv(self) -> list[str]:
        """The QEMU options these stand for (after the machine's own)."""
        gdb = ["-gdb", f"tcp:127.0.0.1:{self.gdb_port}"] if self.gdb_port is not None else []
        shares = [a for i, s in enumerate(self.shares) for a in s.qemu_args(i)]
        return ["-smp", str(self.cpus), *gdb, *shares, *self.qemu_args]

    def guest_setup(self) -> str:
        """Shell lines the guest runs before the command: our insmod for the command's own
        (busybox sh runs its applet before looking at PATH), the shares' mounts, then the
        working directory."""
        cd = f"cd '{self.workdir}' || exit 125\n" if self.workdir else ""
        return (GUEST_INSMOD + "".join(s.mount_script(i) for i, s in enumerate(self.shares))
                + cd)


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts over virtio-9p (``run --share``): at the same path
    by default, so a command names a file of the host's tree as it is written there."""

    host: Path
    guest: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> Share:
        """``HOST[:GUEST][:ro]``; GUEST defaults to HOST's absolute path."""
        parts = spec.split(":")
        readonly = parts[-1] == "ro" and len(parts) > 1
        if readonly:
            parts.pop()
        if not 1 <= len(parts) <= 2 or not parts[0]:
            raise ValueError(f"--share {spec!r}: expected HOST[:GUEST][:ro]")
        host = Path(parts[0]).expanduser().resolve()
        if not host.is_dir():
            raise ValueError(f"--share {spec!r}: {host} is not a directory")
        guest = parts[1] if len(parts) == 2 else str(host)
        if any(c in str(host) + guest for c in "'\n"):
            raise ValueError(f"--share {spec!r}: paths with quotes or newlines are refused")
        if not guest.startswith("/") or guest == "/":
            raise ValueError(f"--share {spec!r}: the guest path must be absolute, and not /")
        return cls(host, guest, readonly)

    def guest_path(self, host: Path) -> str | None:
        """Where the host's ``host`` (absolute) is in the guest, if inside this share (and
        quotable in the guest's shell)."""
        if not host.is_relative_to(self.host) or any(c in str(host) for c in "'\n"):
            return None
        rel = host.relative_to(self.host)
        return self.guest if rel == Path() else f"{self.guest.rstrip('/')}/{rel}"

    def tag(self, index: int) -> str:
        return f"vfio-ep-share{index}"

    def qemu_args(self, index: int) -> list[str]:
        """A virtio-9p device exporting the directory (no ID mapping: files are the user's)."""
        return ["-virtfs", f"local,path={_qemu_escape(str(self.host))},mount_tag="
                f"{self.tag(index)},security_model=none"
                + (",readonly=on" if self.readonly else "")]

    def mount_script(self, index: int) -> str:
        """The guest's mount, failing the run with a reason when the kernel cannot."""
        opts = "trans=virtio,version=9p2000.L,msize=262144" + (",ro" if self.readonly else "")
        return (f"mkdir -p '{self.guest}' && mount -t 9p -o {opts} {self.tag(index)} "
                f"'{self.guest}' || {{ echo 'vfio-ep: cannot mount the shared {self.host} at "
                f"{self.guest} (is CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO in the kernel?)'; "
                "exit 125; }\n")


def _qemu_escape(value: str) -> str:
    """A value inside a QEMU -option list: commas doubled."""
    return value.replace(",", ",,")


def debug_cmdline(dyndbg: Sequence[str], trace_events: Sequence[str],
                  ftrace_filter: Sequence[str]) -> list[str]:
    """Kernel arguments for dynamic debug and boot-time tracing.  ``module NAME QUERY`` becomes
    ``NAME.dyndbg="QUERY"``, which the kernel applies when NAME loads (built in or a module
    loaded later); other queries go to ``dyndbg=``, applied at boot."""
    args = []
    plain = []
    for query in dyndbg:
        words = query.split(maxsplit=2)
        if len(words) == 3 and words[0] == "module":  # module names: dashes are underscores
            args.append(f'{words[1].replace("-", "_")}.dyndbg="{words[2]}"')
        else:
            plain.append(query)
    if plain:
        args.append(f'dyndbg="{"; ".join(plain)}"')
    if trace_events:
        args.append(f"trace_event={','.join(trace_events)}")
    if ftrace_filter:
        args += ["ftrace=function", f"ftrace_filter={','.join(ftrace_filter)}"]
    return args


DEFAULT_OPTIONS = GuestOptions()


def boot_guest(
    script: str,
    *,
    server_args: list[str] | None,
    assets: GuestAssets | None = None,
    timeout: float = 300,
    run_dir: Path | None = None,
    extra_files: dict[str, Path | bytes] | None = None,
    live: Live | None = None,
    server_argv: Sequence[str] | None = None,
    socket: Path | None = None,
    options: GuestOptions = DEFAULT_OPTIONS,
    msg_timeout_ms: int = DEFAULT_MSG_TIMEOUT_MS,
    extra_qemu_args: Sequence[str] = (),
) -> GuestResult:
    """Boot a guest that runs ``script`` (busybox sh) and powers off; return its output.

    ``server_args`` go to ``vfio-ep serve``; None boots without a vfio-user device.
    ``server_argv`` replaces the ``python -m vfio_ep -v serve`` prefix; ``socket`` attaches to an
    already running server (e.g. one in this process) instead of starting one. ``live`` gets
    each line of the command's output as the guest prints it. ``timeout`` covers the whole run.
    ``extra_qemu_args`` are appended to the QEMU command line (e.g. another device).
    """
    run = GuestRun(script, server_args=server_args, assets=assets, run_dir=run_dir,
                   extra_files=extra_files, live=live, server_argv=server_argv, socket=socket,
                   options=options, msg_timeout_ms=msg_timeout_ms,
                   extra_qemu_args=extra_qemu_args)
    return run_async(run.run(timeout))


class GuestRun:
    """One guest boot and the processes it owns; ``async with`` it to hot-plug over QMP."""

    def __init__(
        self,
        script: str,
        *,
        server_args: list[str] | None,
        assets: GuestAssets | None = None,
        run_dir: Path | None = None,
        extra_files: dict[str, Path | bytes] | None = None,
        live: Live | None = None,
        server_argv: Sequence[str] | None = None,
        socket: Path | None = None,
        options: GuestOptions = DEFAULT_OPTIONS,
        msg_timeout_ms: int = DEFAULT_MSG_TIMEOUT_MS,
        extra_qemu_args: Sequence[str] = (),
    ) -> None:
        self.assets = assets or provision_all()
        self.run_dir = new_run_dir(run_dir)
        self.script = script
        self.extra_files = extra_files or {}
        self.live = live
        self.options = options
        self.msg_timeout_ms = msg_timeout_ms
        self.extra_qemu_args = list(extra_qemu_args)
        self._sockets = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
        self.socket = socket or (self._sockets / "ep.sock" if server_args is not None else None)
        self.server_cmd = (None if socket or server_args is None
                           else server_command([str(self.socket)], server_args, server_argv))
        self.qmp = QMPClient("vfio-ep-guest")
        self._server: asyncio.subprocess.Process | None = None
        self._qemu: asyncio.subprocess.Process | None = None
        self._console: asyncio.Task[None] | None = None
        self._line_times: list[tuple[float, str]] = []
        self._began: float | None = None
        self._started = time.monotonic()
        self._meta: dict[str, Any] = {"server_argv": self.server_cmd}
        self._rescue = self._sockets / "rescue.sock"

    async def __aenter__(self) -> GuestRun:
        try:
            await self._start()
        except BaseException:
            await self._stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._stop()

    async def run(self, timeout: float) -> GuestResult:
        """Start, wait for the guest to power off (or ``timeout``), tear down, report."""
        async with self:
            return await self.wait(timeout - (time.monotonic() - self._started))

    async def wait(self, timeout: float) -> GuestResult:
        """Wait for QEMU to exit (the guest powers off after its command) and read the result."""
        assert self._qemu is not None and self._console is not None
        error = None
        try:
            await asyncio.wait_for(self._qemu.wait(), max(timeout, 0))
            await self._console
            if self._qemu.returncode != 0:
                error = f"QEMU exited with {self._qemu.returncode}: {tail(self._log('qemu'))}"
        except TimeoutError:
            error = f"timed out after {time.monotonic() - self._started:.1f} s"
            if await self._task_dump():
                error += " (the guest's tasks, sysrq-t, are at the end of console.log)"
            if records := await self._rescue_records():
                self._write_records(records)
                error += f"; its {' and '.join(sorted(records))} are in the run directory"
        else:
            self._write_records(console_sections(self._log("console")))
        output, status = parse_console(self._log("console"))
        if status is None and error is None:
            error = "the guest stopped before its command finished; see console.log"
        result = GuestResult(status, output, self.run_dir, self._log("server"), error,
                             self._line_times, self._began)
        self._meta.update(exit_status=status, error=error)
        return result

    async def collect(self) -> GuestResult:
        """End a guest that serves until stopped (the EP guest): its records (dmesg)
        through the rescue console, then QEMU stopped; the result of what it printed, with
        no exit status and no error when it was still running."""
        assert self._qemu is not None and self._console is not None
        error = None
        if self._qemu.returncode is None:
            self._write_records(await self._rescue_records())
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), GRACE)
        else:
            error = f"it stopped first (QEMU exit {self._qemu.returncode})"
            self._write_records(console_sections(self._log("console")))
        await _terminate(self._qemu)
        await asyncio.gather(self._console, return_exceptions=True)
        output, status = parse_console(self._log("console"))
        self._meta.update(exit_status=status, error=error)
        return GuestResult(status, output, self.run_dir, self._log("server"), error,
                           self._line_times, self._began)

    async def _task_dump(self) -> bool:
        """sysrq-t in the stuck guest: every task's state and stack reach the console (and
        console.log) before QEMU is stopped, so a timeout shows what hung.  False when QEMU
        no longer answers."""
        try:
            # sysrq-8 first: /init keeps the console at loglevel 1, and the dump is KERN_INFO
            for key in ("8", "t"):
                keys = [{"type": "qcode", "data": k} for k in ("alt", "sysrq", key)]
                await asyncio.wait_for(self.qmp.execute("send-key", {"keys": keys}), GRACE)
        except Exception:  # QEMU gone or wedged: nothing to dump
            return False
        await asyncio.sleep(TASK_DUMP_SECONDS)
        return True

    async def _rescue_records(self) -> dict[str, str]:
        """The hung guest's dmesg (and trace buffer) through the rescue console, the shell
        /init leaves on the second serial port; {} when it does not answer in time."""
        try:
            async with asyncio.timeout(RESCUE_SECONDS):
                reader, writer = await asyncio.open_unix_connection(str(self._rescue),
                                                                    limit=RESCUE_LIMIT)
                try:
                    writer.write(f"{sections_script()}; {RESCUE_DONE_CMD}\n".encode())
                    await writer.drain()
                    text = await reader.readuntil(RESCUE_DONE)
                finally:
                    writer.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            return {}
        return console_sections(text.decode(errors="replace"))

    def _write_records(self, records: dict[str, str]) -> None:
        for name, text in records.items():
            (self.run_dir / name).write_text(text)

    async def execute(self, command: str, arguments: dict[str, Any] | None = None) -> object:
        """One QMP command."""
        return await self.qmp.execute(command, arguments)

    async def device_add(self, device: dict[str, Any]) -> None:
        """Hot-plug a device, e.g. ``vfio_user_device(sock)`` on the root port."""
        await self.qmp.execute("device_add", device)

    async def device_del(self, device_id: str = DEVICE_ID, timeout: float = 30) -> None:
        """Hot-unplug a device and wait until QEMU reports it gone (the guest must let go)."""
        with self.qmp.listener("DEVICE_DELETED") as listener:
            await self.qmp.execute("device_del", {"id": device_id})
            async with asyncio.timeout(timeout):
                async for event in listener:
                    data = event["data"]
                    if isinstance(data, dict) and data.get("device") == device_id:
                        break

    async def _start(self) -> None:
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            logging.getLogger("qemu.qmp").setLevel(logging.WARNING)  # EOF at poweroff is normal
        files = {TEST_FILES[self.assets.test_kind]: self.assets.test, "sbin/insmod": INSMOD,
                 **({"pcitest_tap.sh": PCITEST_TAP, "tap_lib.sh": TAP_LIB}
                    if self.assets.test_kind == "pcitest" else {}),
                 **{f"{GUEST_MODULES}/{ko.name}": ko for ko in self.assets.modules},
                 **self.extra_files}
        init, script_file = guest_init(self.options.guest_setup() + self.script)
        initrd = build_initramfs(self.run_dir / "initramfs.gz", {**files, **script_file}, init,
                                 self.assets.busybox)
        if self.server_cmd:
            self._server = await _spawn(self.server_cmd, stdout=self._open_log("server"))
            await self._wait_for_socket()
        qmp_socket = self._sockets / "qmp.sock"
        await self.qmp.start_server(str(qmp_socket))
        argv = qemu_command(self.assets.qemu, kernel=self.assets.kernel, initrd=initrd,
                            qmp=qmp_socket, rescue=self._rescue, options=self.options,
                            device=(vfio_user_device(self.socket, self.msg_timeout_ms)
                                    if self.socket else None),
                            extra_args=self.extra_qemu_args)
        self._meta["qemu_argv"] = argv
        if self.options.gdb_port is not None:
            vmlinux = self.assets.kernel.with_name("vmlinux")
            print(f"vfio-ep: QEMU gdbstub on 127.0.0.1:{self.options.gdb_port} ({self.run_dir.name}"
                  f"): gdb {vmlinux if vmlinux.is_file() else 'vmlinux'} -ex 'target remote "
                  f"127.0.0.1:{self.options.gdb_port}'", file=sys.stderr)
        self._qemu = await _spawn(argv, stdout=asyncio.subprocess.PIPE,
                                  stderr=self._open_log("qemu"),
                                  env={**os.environ, **self.assets.qemu.env},
                                  terminal=self.options.interactive)
        self._console = asyncio.create_task(self._read_console())
        await self._accept_qmp()

    async def _wait_for_socket(self) -> None:
        assert self._server is not None and self.socket is not None
        await wait_for_sockets(self._server, [self.socket], self.run_dir / "server.log")

    async def _accept_qmp(self) -> None:
        assert self._qemu is not None
        accept = asyncio.create_task(self.qmp.accept())
        exited = asyncio.create_task(self._qemu.wait())
        await asyncio.wait({accept, exited}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        exited.cancel()
        if not accept.done():
            accept.cancel()
            await asyncio.gather(accept, return_exceptions=True)
            raise LaunchError(f"QEMU did not start (exit {self._qemu.returncode}):\n"
                              f"{tail(self._log('qemu'))}\nserver log:\n"
                              f"{tail(self._log('server'))}")
        accept.result()

    async def _read_console(self) -> None:
        """Copy the serial console to console.log and hand the command's lines to ``live``
        (interactive: every byte to our terminal as it comes, prompts included)."""
        assert self._qemu is not None and self._qemu.stdout is not None
        inside = False
        with (self.run_dir / "console.log").open("wb") as log:
            # The terminal gets what the guest's command prints: after BEGIN, up to END.
            phase, held = "boot", b""
            while self.options.interactive and (chunk := await self._qemu.stdout.read(4096)):
                log.write(chunk)
                log.flush()
                held += chunk
                if phase == "boot" and (start := held.find(BEGIN.encode())) >= 0:
                    phase, held = "command", held[start + len(BEGIN) :].lstrip(b"\r\n")
                    self._began = time.monotonic()
                if phase == "command":
                    out, held, going_on = _until_marker(held, END.encode())
                    sys.stdout.buffer.write(out)
                    sys.stdout.buffer.flush()
                    phase = "command" if going_on else "done"
                elif phase == "boot":
                    held = held[-len(BEGIN) :]  # all a BEGIN split across reads needs
            while line := await self._qemu.stdout.readline():
                log.write(line)
                log.flush()
                text = line.decode(errors="replace").rstrip("\r\n")
                if text.startswith(END):
                    inside = False
                elif inside:
                    self._line_times.append((time.monotonic(), text))
                    if self.live:
                        self.live(text)
                elif text.endswith(BEGIN):  # firmware may leave escape codes before it
                    inside = True
                    self._began = time.monotonic()

    async def _stop(self) -> None:
        """QMP quit, then SIGTERM, then SIGKILL; QEMU (the client) before the server."""
        if self._qemu and self._qemu.returncode is None and self.qmp.runstate.name == "RUNNING":
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.qmp.execute("quit"), GRACE)
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        for proc in (self._qemu, self._server):
            if proc:
                await _terminate(proc)
        if self._console:
            await asyncio.gather(self._console, return_exceptions=True)
        shutil.rmtree(self._sockets, ignore_errors=True)
        self._meta["seconds"] = round(time.monotonic() - self._started, 1)
        (self.run_dir / "run.json").write_text(json.dumps(self._meta, indent=2) + "\n")

    def _open_log(self, name: str) -> Any:
        return (self.run_dir / f"{name}.log").open("wb")

    def _log(self, name: str) -> str:
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def server_command(sockets: Sequence[str], server_args: list[str],
                   server_argv: Sequence[str] | None = None) -> list[str]:
    """``vfio-ep serve`` on ``sockets`` (``PATH`` or ``CONTROLLER=PATH``); ``server_argv``
    swaps the program part."""
    prefix = list(server_argv or [sys.executable, "-m", "vfio_ep", "-v", "serve"])
    return [*prefix, *(a for s in sockets for a in ("--socket", s)), *server_args]


async def wait_for_sockets(server: asyncio.subprocess.Process, sockets: Sequence[Path],
                           log: Path) -> None:
    """The server is ready once its sockets exist; fail with its log if it died first."""
    deadline = time.monotonic() + SERVER_READY_TIMEOUT
    while not all(s.exists() for s in sockets):
        text = log.read_text(errors="replace") if log.exists() else ""
        if server.returncode is not None:
            raise LaunchError(f"vfio-ep server exited with {server.returncode} before creating "
                              f"{', '.join(map(str, sockets))}:\n{tail(text)}")
        if time.monotonic() > deadline:
            raise LaunchError(f"vfio-ep server made no socket in {SERVER_READY_TIMEOUT:.0f} "
                              f"s:\n{tail(text)}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_server(controllers: Sequence[str], server_args: list[str], log: Path,
                         server_argv: Sequence[str] | None = None
                         ) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, Path]]]:
    """``vfio-ep serve`` with a socket per named controller (its output in ``log``), ready
    to connect to; stopped (and its sockets' directory removed) on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
    sockets = {c: tmp / f"{c}.sock" for c in dict.fromkeys(controllers)}
    cmd = server_command([f"{c}={p}" for c, p in sockets.items()], server_args, server_argv)
    server = await _spawn(cmd, stdout=log.open("wb"))
    try:
        await wait_for_sockets(server, list(sockets.values()), log)
        yield server, sockets
    finally:
        await _terminate(server)
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass(frozen=True)
class GuestSpec:
    """One guest of several against one server: attached to ``controller``'s socket.  With
    ``after``, it boots once the guest labelled so has exited: the same host coming back.
    ``qemu_args`` go on its QEMU command line (a NIC, say)."""

    label: str
    controller: str
    script: str
    after: str | None = None
    qemu_args: tuple[str, ...] = ()



def boot_guests(specs: Sequence[GuestSpec], *, server_args: list[str],
                assets: GuestAssets | None = None, timeout: float = 300, run_dir: Path,
                extra_files: dict[str, Path | bytes] | None = None,
                live: Callable[[str, str], None] | None = None,
                options: GuestOptions = DEFAULT_OPTIONS) -> list[GuestResult]:
    """Start one ``vfio-ep serve`` with a socket per controller the specs name, boot every
    guest at once against it (run directory ``run_dir/<label>``; a guest with ``after`` when
    that one has exited), and return their results in order.  ``live`` gets (label, line)
    as each guest prints."""
    return run_async(_boot_guests(specs, server_args, assets or provision_all(), timeout,
                                  run_dir, extra_files or {}, live, options))


async def _boot_guests(specs: Sequence[GuestSpec], server_args: list[str],
                       assets: GuestAssets, timeout: float, run_dir: Path,
                       extra_files: dict[str, Path | bytes],
                       live: Callable[[str, str], None] | None,
                       options: GuestOptions) -> list[GuestResult]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "server.log"
    async with running_server([s.controller for s in specs], server_args, log) as (_, sockets):
        tasks: dict[str, asyncio.Task[GuestResult]] = {}
        for i, s in enumerate(specs):
            gdb_port = None if options.gdb_port is None else options.gdb_port + i
            run = GuestRun(s.script, server_args=[], assets=assets,
                           socket=sockets[s.controller], run_dir=run_dir / s.label,
                           extra_files=extra_files, extra_qemu_args=s.qemu_args,
                           options=replace(options, gdb_port=gdb_port),
                           live=partial(live, s.label) if live else None)
            tasks[s.label] = asyncio.create_task(_boot_after(
                tasks[s.after] if s.after else None, run, timeout))
        results = await asyncio.gather(*tasks.values())
    server_log = log.read_text(errors="replace")
    return [replace(r, server_log=server_log) for r in results]


async def _boot_after(before: asyncio.Task[GuestResult] | None, run: GuestRun,
                      timeout: float) -> GuestResult:
    if before is not None:
        await asyncio.wait([before])  # its failure is its own result
    return await run.run(timeout)


def vfio_user_device(socket: Path, msg_timeout_ms: int = DEFAULT_MSG_TIMEOUT_MS,
                     device_id: str = DEVICE_ID, bus: str = ROOT_PORT) -> dict[str, Any]:
    """The vfio-user-pci device, as -device JSON or QMP ``device_add`` arguments."""
    return {"driver": "vfio-user-pci", "id": device_id, "bus": bus,
            "socket": {"type": "unix", "path": str(socket)}, "x-msg-timeout": msg_timeout_ms}


def qemu_command(qemu: Qemu, *, kernel: Path, initrd: Path, qmp: Path, options: GuestOptions,
                 device: dict[str, Any] | None, extra_args: Sequence[str] = (),
                 rescue: Path | None = None) -> list[str]:
    """The one QEMU command line: q35 under TCG (or KVM), memfd RAM (so the server can DMA
    directly), serial console on stdout, QMP to our socket, the rescue console's serial port on
    ``rescue``, a PCIe root port for the endpoint; then ``extra_args`` (the run's own
    devices) and the user's options."""
    argv = [
        *qemu.argv, *endpoint_machine_args(options.memory_mb, options.accel),
        "-nodefaults", "-nographic", "-no-reboot",
        # Interactive: QEMU's monitor multiplexed in too, so Ctrl-A X always gets out.
        "-serial", "mon:stdio" if options.interactive else "stdio", "-qmp", f"unix:{qmp}",
        *(["-serial", f"unix:{rescue},server=on,wait=off"] if rescue else []),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", options.cmdline,
    ]
    if device:
        argv += ["-device", json.dumps(device)]
    return argv + list(extra_args) + options.qemu_argv()


def _until_marker(data: bytes, marker: bytes) -> tuple[bytes, bytes, bool]:
    """(what to show now, what to hold back, whether to go on showing): everything before
    ``marker``; when it is not there, all but a tail that could be its beginning."""
    end = data.find(marker)
    if end >= 0:
        return data[:end], b"", False
    keep = next((n for n in range(min(len(marker) - 1, len(data)), 0, -1)
                 if marker.startswith(data[-n:])), 0)
    return data[: len(data) - keep], data[len(data) - keep :], True


# -accel's options per accelerator.  Interrupt remapping (below) needs the IOAPIC in QEMU:
# under KVM the irqchip must be split (QEMU refuses intremap=on with the kernel's own).
ACCELERATORS = {"tcg": "tcg", "kvm": "kvm,kernel-irqchip=split"}


def endpoint_machine_args(memory_mb: int = DEFAULT_MEMORY_MB, accel: str = "tcg") -> list[str]:
    """What a QEMU machine needs for a vfio-user endpoint to work as in ``vfio-ep run``."""
    return [
        "-accel", ACCELERATORS[accel],
        # Guest RAM in a shared memfd: the server reaches it directly, not by messages; -m
        # must say the backend's size.
        "-machine", "q35,memory-backend=mem", "-m", str(memory_mb),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        # Interrupt remapping only (x86 multi-MSI needs it); must come before PCI devices.
        "-device", "intel-iommu,intremap=on,dma-translation=off",
        "-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1",
        # Native PCIe hot-plug (pciehp, in the guest kernel) instead of q35's ACPI hot-plug.
        "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ]


async def _spawn(argv: Sequence[str], *, stdout: Any, stderr: Any = asyncio.subprocess.STDOUT,
                 env: dict[str, str] | None = None,
                 terminal: bool = False) -> asyncio.subprocess.Process:
    """Start a child in its own session (the terminal's Ctrl-C reaches only us, and we stop it
    in order) that dies with us even if we are SIGKILLed.  With ``terminal`` it reads our
    stdin instead, in our session (a background reader of a terminal would be stopped)."""
    env = dict(env or os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # `-m vfio_ep` from any cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=None if terminal else asyncio.subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, env=env, start_new_session=not terminal,
            preexec_fn=_die_with_parent, limit=1 << 20)
    finally:
        for stream in (stdout, stderr):
            if hasattr(stream, "close"):
                stream.close()


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group, SIGKILL it after :data:`GRACE` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), GRACE)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGINT and SIGTERM cancelling ``coro`` (its processes are torn down
    on the way out) and then raising :class:`Interrupted`.  A second signal during the
    teardown cannot cut it short."""
    caught: list[int] = []

    def on_signal(signum: int, task: asyncio.Task[T]) -> None:
        if not caught:
            caught.append(signum)
            task.cancel()

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        if in_main_thread:
            for sig in SIGNALS:
                asyncio.get_running_loop().add_signal_handler(sig, on_signal, sig, task)
        try:
            return await coro
        except asyncio.CancelledError:
            if caught:
                raise Interrupted(caught[0]) from None
            raise

    in_main_thread = threading.current_thread() is threading.main_thread()
    # The loop's close resets the signals it handled to their defaults: put back ours.
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS} if in_main_thread else {}
    try:
        return asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


def new_run_dir(run_dir: Path | None) -> Path:
    """``run_dir`` (created), else a fresh directory under the cache's runs/.

    The oldest there go beyond ``$VFIO_EP_KEEP_RUNS`` (KEEP_RUNS by default), except a run
    whose process is still alive (its ``owner`` file names it): a long matrix is never
    pruned under its own feet by the runs started beside it."""
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    keep = int(os.environ.get("VFIO_EP_KEEP_RUNS", KEEP_RUNS))
    for old in sorted(runs.iterdir())[: -keep or None]:
        if not _owner_alive(old):
            shutil.rmtree(old, ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
    (new / "owner").write_text(f"{os.getpid()}\n")
    return new


def _owner_alive(run: Path) -> bool:
    try:
        os.kill(int((run / "owner").read_text()), 0)
    except PermissionError:
        return True  # another user's, alive
    except (OSError, ValueError):
        return False  # no owner file, or its process is gone
    return True

