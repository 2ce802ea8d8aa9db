"""trace.log: the guest's output and the endpoint's log on one time line.

A kselftest prints ``#  RUN  <test>`` as each test starts; the server logs what the EP did
(decoded pci-epf-test commands and their STATUS, doorbells, resets; with -vv every message).
Merged by time, each EP line sits under the test that caused it, which is what one reads a
failure with.  Guest lines carry the host time they arrived (GuestResult.line_times).
"""

from __future__ import annotations

import re
import time
from datetime import datetime
from pathlib import Path

# logging's default asctime, as ``vfio-ep serve`` writes it: 2026-11-29 06:38:53,772
_SERVER_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) (.*)")


def write_trace(run_dir: Path, line_times: list[tuple[float, str]], server_log: str,
                others: dict[str, list[tuple[float, str]]] | None = None) -> Path:
    """Write ``run_dir/trace.log``: guest lines (``guest|``), the lines of ``others`` guests
    (under their labels: an EP guest's ``ep-guest|``) and server lines (``ep   |``) in
    time order; a server line without a timestamp (a traceback's) stays with the line before
    it."""
    to_wall = time.time() - time.monotonic()  # line_times are time.monotonic()
    labelled = {"guest": line_times, **{f"{k}-guest": v for k, v in (others or {}).items()}}
    events = [(when + to_wall, 0, who, line) for who, lines in labelled.items()
              for when, line in lines]
    when = 0.0
    for i, line in enumerate(server_log.splitlines()):
        if match := _SERVER_LINE.match(line):
            stamp = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S").timestamp()
            when, line = stamp + int(match[2]) / 1000, match[3]
        events.append((when, i + 1, "ep", line))
    events.sort(key=lambda e: (e[0], e[1]))
    out = run_dir / "trace.log"
    width = max(5, *(len(who) for who in labelled))
    with out.open("w") as f:
        for when, _, who, line in events:
            clock = datetime.fromtimestamp(when).strftime("%H:%M:%S.%f")[:-3]
            f.write(f"{clock} {who:<{width}}| {line}\n")
    return out
