"""The guest's initramfs: a gzip'd cpio "newc" archive written in pure Python, and its /init.

Writing the archive ourselves needs no host ``cpio`` and no root, yet can hold device nodes
(/dev/console must exist before /init runs, or the guest has no stdout).

/init wraps the requested command between two markers on the serial console, so the launcher
can cut the command's output and exit status out of the console log (:func:`parse_console`);
after them come the guest's dmesg and, when the kernel command line asked for boot-time
tracing, the trace buffer (:func:`console_sections`).  A second shell listens on the second
serial port (the launcher's rescue console): when the command hangs, the launcher still gets
the dmesg through it.
"""

from __future__ import annotations

import gzip
import re
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

BEGIN = "@@vfio-ep: begin@@"
END = "@@vfio-ep: exit status "
# Written to /dev/kmsg just before BEGIN is echoed: the dmesg line whose printk time is the
# moment BEGIN reached the host (how trace.log puts the guest's dmesg on the host's clock).
KMSG_BEGIN = "vfio-ep: the command begins"
_END_RE = re.compile(re.escape(END) + r"(\d+)@@")
GUEST_SCRIPT = "guest.sh"

INIT = """#!/bin/sh
# vfio-ep guest /init: mount the pseudo filesystems, run /{script}, report, power off.
mkdir -p /proc /sys /dev /tmp /run
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug
mount -t tmpfs tmpfs /tmp 2>/dev/null
# Kernel messages would interleave with the command's output: keep them in dmesg.
dmesg -n 1
# The rescue console on the second serial port, for the launcher when the command hangs: one
# command per line, no prompt.
[ -c /dev/ttyS1 ] && setsid sh -c 'while read -r l; do eval "$l"; done' \\
  </dev/ttyS1 >/dev/ttyS1 2>&1 &
cd /
echo '{kmsg_begin}' > /dev/kmsg
echo '{begin}'
sh /{script} </dev/null 2>&1
echo "{end}$?@@"
{sections}
sync
poweroff -f
"""
# The records after the command, also what the rescue console runs on a timeout (so one
# line): dmesg, the interrupt counts (which handlers ran: a doorbell's, the eDMA's), and the
# trace buffer when the kernel command line asked for boot-time tracing.
SECTIONS = ("echo '{dmesg}'; dmesg; echo '{interrupts}'; cat /proc/interrupts; "
            "if grep -qE '(^| )(trace_event|ftrace)=' /proc/cmdline; then "
            "mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null; "
            "echo '{trace}'; cat /sys/kernel/tracing/trace; fi")
DMESG = "--- dmesg ---"
INTERRUPTS = "--- interrupts ---"
TRACE = "--- trace ---"
SECTION_FILES = {DMESG: "dmesg.txt", INTERRUPTS: "interrupts.txt", TRACE: "ftrace.txt"}
_SECTION_RE = re.compile("^(" + "|".join(map(re.escape, SECTION_FILES)) + ")$", re.MULTILINE)


def sections_script() -> str:
    """One shell line printing the guest's records, each after its heading."""
    return SECTIONS.format(dmesg=DMESG, interrupts=INTERRUPTS, trace=TRACE)


def console_sections(text: str) -> dict[str, str]:
    """The records a guest printed after its command (or through the rescue console), by
    file name: ``dmesg.txt``, ``interrupts.txt``, and ``ftrace.txt`` when tracing was on."""
    text = text.replace("\r", "")
    end = _END_RE.search(text)
    if end is not None:
        text = text[end.end():]
    found: dict[str, str] = {}
    heads = list(_SECTION_RE.finditer(text))
    for i, m in enumerate(heads):
        stop = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        found[SECTION_FILES[m.group(1)]] = text[m.end():stop].lstrip("\n")
    return found


@dataclass(frozen=True)
class _Entry:
    """One cpio member: a path inside the archive, its mode and its data (a link's target)."""

    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def guest_init(script: str) -> tuple[str, dict[str, bytes]]:
    """The /init text and the extra file that carries ``script`` (a busybox sh script)."""
    init = INIT.format(script=GUEST_SCRIPT, begin=BEGIN, end=END, sections=sections_script(),
                       kmsg_begin=KMSG_BEGIN)
    return init, {GUEST_SCRIPT: script.encode()}


def parse_console(console: str) -> tuple[str, int | None]:
    """The command's output and exit status from a console log (status None: it never ended)."""
    text = console.replace("\r", "")
    start = text.find(BEGIN + "\n")
    if start < 0:
        return "", None
    body = text[start + len(BEGIN) + 1:]
    end = _END_RE.search(body)
    if end is None:
        return body, None
    return body[:end.start()], int(end.group(1))


def build_initramfs(out: Path, files: dict[str, Path | bytes], init_script: str,
                    busybox: Path = Path("/bin/busybox")) -> Path:
    """Write ``out`` (gzip'd newc cpio) with busybox and its applet links, ``files`` and /init.

    ``files`` maps archive paths (``"pci_endpoint_test"``, ``"etc/x.toml"``) to host files or
    bytes; host files keep their executable bit, and replace a busybox applet of that path.
    The archive is deterministic (mtime 0), so the same inputs give the same bytes.
    """
    entries = [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, busybox.read_bytes()),
        # an applet a file of ours replaces (sbin/insmod) is left out
        *(_Entry(link, stat.S_IFLNK | 0o777, b"/bin/busybox") for link in _applets(busybox)
          if link not in files),
        _Entry("init", stat.S_IFREG | 0o755, init_script.encode()),
        *(_file_entry(name, source) for name, source in files.items()),
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(out, "wb", mtime=0) as archive:
        archive.write(_cpio(_with_parents(entries)))
    return out


def _applets(busybox: Path) -> list[str]:
    """Every applet as its install path (``usr/bin/[``, ``sbin/ip``...), from busybox itself."""
    listing = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             check=True).stdout.split()
    return [path for path in listing if path != "bin/busybox"]


def _file_entry(name: str, source: Path | bytes) -> _Entry:
    if isinstance(source, bytes):
        return _Entry(name.lstrip("/"), stat.S_IFREG | 0o644, source)
    executable = source.stat().st_mode & 0o111
    return _Entry(name.lstrip("/"), stat.S_IFREG | (0o755 if executable else 0o644),
                  source.read_bytes())


def _with_parents(entries: list[_Entry]) -> list[_Entry]:
    """Directory entries first, for every parent of every member (cpio does not imply them)."""
    dirs = sorted({str(parent) for e in entries for parent in Path(e.name).parents} - {"."})
    return [_Entry(d, stat.S_IFDIR | 0o755) for d in dirs] + entries


def _cpio(entries: list[_Entry]) -> bytes:
    chunks = [_member(ino, entry) for ino, entry in enumerate(entries, start=1)]
    chunks.append(_member(0, _Entry("TRAILER!!!", 0)))
    return b"".join(chunks)


def _member(ino: int, entry: _Entry) -> bytes:
    """One newc header + name + data, each padded to 4 bytes."""
    name = entry.name.encode() + b"\0"
    fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0, *entry.rdev, len(name), 0)
    header = b"070701" + b"".join(b"%08X" % value for value in fields)
    return _pad(header + name) + _pad(entry.data)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)
