"""trace.log: the guest's output, its kernel's log and the endpoint's log on one time line.

A kselftest prints ``#  RUN  <test>`` as each test starts; the server logs what the EP did
(decoded pci-epf-test commands and their STATUS, doorbells, resets; with -vv every message);
the guest kernel says what its drivers did (dmesg.txt: a driver's pr_info, a warning).
Merged by time, each EP line and each kernel line sits under the test that caused it, which
is what one reads a failure with.  Guest lines carry the host time they arrived
(GuestResult.line_times); dmesg's lines carry the guest's printk clock, put on the host's
by one moment both know: /init writes KMSG_BEGIN to the kernel's log just before the
command's BEGIN line, whose arrival the host timed (GuestResult.began).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

from vfio_ep.guest.initramfs import KMSG_BEGIN
from vfio_ep.guest.launcher import GuestResult

# logging's default asctime, as ``vfio-ep serve`` writes it: 2026-11-29 06:38:53,772
_SERVER_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)")
# a printk line as dmesg prints it: [   10.335922] ntb_hw_epf 0000:01:00.0: eth0 created
_DMESG_LINE = re.compile(r"\[\s*(\d+\.\d+)\] ?(.*)")

Event = tuple[float, int, str, str]  # (wall clock, order within its source, source, line)


def write_trace(result: GuestResult, others: dict[str, GuestResult] | None = None,
                run_dir: Path | None = None, label: str | None = None) -> Path:
    """Write ``trace.log`` in ``run_dir`` (the result's run directory by default): guest lines
    (``guest|``), the guest kernel's (``dmesg|``, when dmesg.txt is there), the same of the
    ``others`` guests under their labels (an EP guest's ``ep-guest|`` and ``ep-dmesg|``), and
    of ``result`` too when it has a ``label`` (of two RC guests, ``a-guest|``), and server
    lines (``ep   |``) in time order."""
    to_wall = time.time() - time.monotonic()  # the launcher's times are time.monotonic()
    events = _guest_events(result, f"{label}-guest" if label else "guest",
                           f"{label}-dmesg" if label else "dmesg", to_wall)
    for label, other in (others or {}).items():
        events += _guest_events(other, f"{label}-guest", f"{label}-dmesg", to_wall)
    events += _server_events(result.server_log)
    events.sort(key=lambda e: (e[0], e[1]))
    out = (run_dir or result.run_dir) / "trace.log"
    width = max(5, *(len(who) for _, _, who, _ in events)) if events else 5
    with out.open("w") as f:
        for when, _, who, line in events:
            clock = datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]
            f.write(f"{clock} {who:<{width}}| {line}\n")
    return out


def _guest_events(result: GuestResult, label: str, kernel: str, to_wall: float) -> list[Event]:
    """A guest's command lines at the time they reached us, and its dmesg on the same clock."""
    events = [(when + to_wall, 0, label, line) for when, line in result.line_times]
    dmesg = result.run_dir / "dmesg.txt"
    if result.began is not None and dmesg.is_file():
        events += _dmesg_events(dmesg.read_text(errors="replace"), result.began + to_wall,
                                kernel)
    return events


def _server_events(server_log: str) -> list[Event]:
    """The server's lines at their logged time; a line without one (a traceback's) stays
    with the line before it."""
    events = []
    when = 0.0
    for i, line in enumerate(server_log.splitlines()):
        if match := _SERVER_LINE.match(line):
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp()
            when, line = stamp + int(match[2]) / 1000, match[3]
        events.append((when, i + 1, "ep", line))
    return events


def _dmesg_events(dmesg: str, began: float, label: str = "dmesg") -> list[Event]:
    """dmesg's lines on the host's wall clock, ``began`` being KMSG_BEGIN's moment there;
    none when the marker is missing (a guest that never got to its command)."""
    stamped = [(i, _DMESG_LINE.match(line), line) for i, line in enumerate(dmesg.splitlines())]
    marker = next((float(m[1]) for _, m, _ in stamped if m and m[2] == KMSG_BEGIN), None)
    if marker is None:
        return []
    events = []
    when: float | None = None
    for i, match, line in stamped:
        if match:
            when, line = began + float(match[1]) - marker, match[2]
        if when is not None:  # a line without a time of its own goes with the one before
            events.append((when, i + 1, label, line))
    return events
