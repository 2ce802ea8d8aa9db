"""One guest boot, supervised: its server (or a running one's socket), QEMU with its serial
console read live, QMP on a socket this process listens on, and a rescue console for a guest
that hangs; all torn down on success, failure, timeout, Ctrl-C or SIGTERM.

What to boot is one :class:`GuestBoot`; the QEMU command line is :mod:`qemu_cmdline`'s, the
processes' lifetimes :mod:`children`'s, the server's start and facts :mod:`server`'s.  QMP
(asyncio, PyPI ``qemu.qmp``) lives in this launcher process, never in the trio server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qemu.qmp import QMPClient

from vfio_ep.guest.assets import INSMOD, PCITEST_TAP, TAP_LIB
from vfio_ep.guest.children import GRACE, LaunchError, run_async, spawn, terminate
from vfio_ep.guest.initramfs import (
    BEGIN,
    END,
    build_initramfs,
    console_sections,
    guest_init,
    parse_console,
    sections_script,
)
from vfio_ep.guest.provision import GuestAssets, provision_all
from vfio_ep.guest.qemu_cmdline import (
    DEFAULT_OPTIONS,
    DEVICE_ID,
    GuestOptions,
    qemu_command,
    vfio_user_device,
)
from vfio_ep.guest.run_dir import new_run_dir
from vfio_ep.guest.server import FACTS_FILE, Facts, read_facts, server_command, wait_for_sockets
from vfio_ep.tail import tail

TASK_DUMP_SECONDS = 3.0  # for a timed-out guest's sysrq-t dump to reach the console
RESCUE_LIMIT = 32 << 20  # bytes: the largest dmesg + trace buffer the rescue console takes
RESCUE_SECONDS = 20.0  # for a timed-out guest's dmesg (and trace) through the rescue console
# What the rescue console prints when done; the tty's echo of the command has $((6*7)).
RESCUE_DONE, RESCUE_DONE_CMD = b"@@vfio-ep: rescue 42@@", "echo '@@vfio-ep: rescue' $((6*7))@@"
KSELFTEST_NAME = "pci_endpoint_test"
TEST_FILES = {"kselftest": KSELFTEST_NAME, "pcitest": "pcitest"}  # the guest's /NAME, by kind
GUEST_MODULES = "lib/modules"  # where the initramfs holds the kernel's modules (insmod PATH)

Live = Callable[[str], None]


@dataclass(frozen=True)
class GuestBoot:
    """One guest boot, whole: what it runs, the endpoint it gets, what it carries, and how.

    The endpoint: ``serve`` starts a ``vfio-ep serve`` of the boot's own with these arguments
    (``script`` may then be a function of the facts that server reports, as its test's
    expectations); ``socket`` attaches to a running server's instead; neither boots with no
    vfio-user device.  ``files`` go into the initramfs (guest path: host file or bytes),
    ``qemu_args`` on QEMU's command line before the user's options (another device), and
    ``live`` gets each line of the command's output as the guest prints it."""

    script: str | Callable[[Facts], str]
    serve: Sequence[str] | None = None
    socket: Path | None = None
    assets: GuestAssets | None = None
    run_dir: Path | None = None
    files: Mapping[str, Path | bytes] = field(default_factory=dict)
    options: GuestOptions = DEFAULT_OPTIONS
    qemu_args: tuple[str, ...] = ()
    live: Live | None = None

    def __post_init__(self) -> None:
        if self.serve is not None and self.socket is not None:
            raise ValueError("a guest boot starts its own server or attaches to a socket, "
                             "not both")
        if callable(self.script) and self.serve is None:
            raise ValueError("only a boot that starts its own server has facts to build its "
                             "script from")


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
    facts: Facts = field(default_factory=dict)  # what its own server reported it served

    @property
    def ok(self) -> bool:
        return self.exit_status == 0


def boot_guest(boot: GuestBoot, timeout: float = 300) -> GuestResult:
    """Boot a guest that runs ``boot.script`` (busybox sh) and powers off; return its
    output.  ``timeout`` covers the whole run."""
    return run_async(GuestRun(boot).run(timeout))


class GuestRun:
    """One guest boot and the processes it owns; ``async with`` it to hot-plug over QMP."""

    def __init__(self, boot: GuestBoot) -> None:
        self.boot = boot
        self.assets = boot.assets or provision_all()
        self.run_dir = new_run_dir(boot.run_dir)
        self.options = boot.options
        self._sockets = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
        self.socket = boot.socket or (self._sockets / "ep.sock" if boot.serve is not None
                                      else None)
        self.server_cmd = (None if boot.serve is None else server_command(
            [str(self.socket)], boot.serve, self.run_dir / FACTS_FILE))
        self.facts: Facts = {}
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
                             self._line_times, self._began, self.facts)
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
        await terminate(self._qemu)
        await asyncio.gather(self._console, return_exceptions=True)
        output, status = parse_console(self._log("console"))
        self._meta.update(exit_status=status, error=error)
        return GuestResult(status, output, self.run_dir, self._log("server"), error,
                           self._line_times, self._began, self.facts)

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
        if self.server_cmd:  # first: the script may be built from what it serves
            self._server = await spawn(self.server_cmd, stdout=self._open_log("server"))
            await self._wait_for_socket()
            self.facts = read_facts(self.run_dir / FACTS_FILE)
        script = self.boot.script(self.facts) if callable(self.boot.script) else self.boot.script
        files = {TEST_FILES[self.assets.test_kind]: self.assets.test, "sbin/insmod": INSMOD,
                 **({"pcitest_tap.sh": PCITEST_TAP, "tap_lib.sh": TAP_LIB}
                    if self.assets.test_kind == "pcitest" else {}),
                 **{f"{GUEST_MODULES}/{ko.name}": ko for ko in self.assets.modules},
                 **self.boot.files}
        init, script_file = guest_init(self.options.guest_setup() + script)
        initrd = build_initramfs(self.run_dir / "initramfs.gz", {**files, **script_file}, init,
                                 self.assets.busybox)
        qmp_socket = self._sockets / "qmp.sock"
        await self.qmp.start_server(str(qmp_socket))
        argv = qemu_command(self.assets.qemu, kernel=self.assets.kernel, initrd=initrd,
                            qmp=qmp_socket, rescue=self._rescue, options=self.options,
                            device=vfio_user_device(self.socket) if self.socket else None,
                            extra_args=self.boot.qemu_args)
        self._meta["qemu_argv"] = argv
        if self.options.gdb_port is not None:
            vmlinux = self.assets.kernel.with_name("vmlinux")
            print(f"vfio-ep: QEMU gdbstub on 127.0.0.1:{self.options.gdb_port} ({self.run_dir.name}"
                  f"): gdb {vmlinux if vmlinux.is_file() else 'vmlinux'} -ex 'target remote "
                  f"127.0.0.1:{self.options.gdb_port}'", file=sys.stderr)
        self._qemu = await spawn(argv, stdout=asyncio.subprocess.PIPE,
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
                    if self.boot.live:
                        self.boot.live(text)
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
                await terminate(proc)
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


def _until_marker(data: bytes, marker: bytes) -> tuple[bytes, bytes, bool]:
    """(what to show now, what to hold back, whether to go on showing): everything before
    ``marker``; when it is not there, all but a tail that could be its beginning."""
    end = data.find(marker)
    if end >= 0:
        return data[:end], b"", False
    keep = next((n for n in range(min(len(marker) - 1, len(data)), 0, -1)
                 if marker.startswith(data[-n:])), 0)
    return data[: len(data) - keep], data[len(data) - keep :], True
