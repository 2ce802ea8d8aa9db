"""``wake``: how the connection's I/O thread waits for the client, measured (issue 22).

The I/O thread (native/vfu_io.c) used to wait in poll() and then read without blocking; the
C reference server sleeps in a blocking read, and an earlier session saw ours ~20 us slower
across CPUs.  The thread now sleeps in a blocking one-byte MSG_PEEK on a socket it makes
blocking while it runs (Python makes it non-blocking only to drain an oversized message,
the thread parked).  This measures the ways to wait (wake.c) on one CPU and across CPUs,
each against poll: what the choice rests on, on this machine.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from vfio_ep.bench.common import BenchError, Column, Result, build_c, median, ratio

HERE = Path(__file__).resolve().parent
MODES = ("poll", "peek", "blocking-peek", "blocking")


def _placements() -> list[tuple[str, int, int]]:
    """(label, server CPU, client CPU): one CPU, and two where the machine has them."""
    cpus = sorted(os.sched_getaffinity(0))
    out = [("one CPU", cpus[0], cpus[0])]
    if len(cpus) > 1:
        out.append(("across CPUs", cpus[1], cpus[0]))
    return out


def _measure(program: Path, mode: str, server: int, client: int, n: int) -> tuple[float, float]:
    proc = subprocess.run([str(program), mode, str(server), str(client), str(n)],
                          capture_output=True, text=True, check=False, timeout=300)
    if proc.returncode != 0:
        raise BenchError(f"wake {mode}: exit {proc.returncode}: {proc.stderr.strip()}")
    median, p90 = (float(x) for x in proc.stdout.split())
    return median, p90


def run(n: int = 20_000, reps: int = 5) -> Result:
    started = time.monotonic()
    program = build_c(HERE / "wake.c", flags=("-pthread",))
    rows = []
    for label, server, client in _placements():
        runs: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        for _ in range(reps):  # interleaved, so drift in the machine hits each mode alike
            for mode in MODES:
                runs[mode].append(_measure(program, mode, server, client, n))
        poll = median([m for m, _ in runs["poll"]])
        for mode in MODES:
            mid = median([m for m, _ in runs[mode]])
            rows.append({"placement": label, "mode": mode, "median_us": mid,
                         "p90_us": median([p for _, p in runs[mode]]),
                         "saved_us": poll - mid, "vs_poll": ratio(mid, poll)})
    by = {(r["placement"], r["mode"]): r for r in rows}
    verdict = [f"{place}, against poll, the I/O thread's blocking peek saves "
               f"{by[place, 'blocking-peek']['saved_us']:+.1f} us a round trip, the C "
               f"reference's blocking read {by[place, 'blocking']['saved_us']:+.1f} us"
               for place in dict.fromkeys(r["placement"] for r in rows)]
    notes = [f"{n} round trips of 16 bytes over a socketpair per run, median of {reps} runs "
             "per mode (modes interleaved); the client and the waiting thread pinned.",
             "poll: poll() then a non-blocking read (the I/O thread until 2026-12-07); peek: "
             "the socket made blocking only around a blocking MSG_PEEK (two fcntl()s a "
             "wait); blocking-peek: a blocking MSG_PEEK on a socket blocking while the thread "
             "runs, then the non-blocking read (the I/O thread now); blocking: a blocking "
             "read (the C reference's, which would need the whole message read blocking).",
             "measured: " + "; ".join(verdict) + "."]
    return Result(
        name="wake", title="the I/O thread's wait for the client, by how it waits",
        baseline="poll() then a non-blocking read (the I/O thread's wait until 2026-12-07)",
        columns=[Column("placement", "placement"), Column("mode", "wait"),
                 Column("median_us", "median us", "{:.1f}"), Column("p90_us", "p90 us", "{:.1f}"),
                 Column("vs_poll", "vs poll", "{:.2f}x")],
        rows=rows, params={"n": n, "reps": reps}, notes=notes,
        seconds=time.monotonic() - started)
