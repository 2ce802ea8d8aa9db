"""dispatch: how many posted REGION_WRITEs a second the server applies to a RAM window.

A guest's MMIO writes reach the server as posted 4-byte REGION_WRITE messages; this is the
rate that bounds a write-heavy driver.  The client stays cheap so that it is not what is
measured: N messages are built up front in one buffer, ``sendall`` in one go, followed by one
non-posted REGION_READ as a fence (answered only after everything before it was applied).
rate = N / (time until the fence's reply).

Targets: pci-epf-test's BAR1 (EP RAM; our client writes it over the socket), served by the C
fast path and by the Python path (``VFIO_EP_FASTPATH=0``), each in its own server process;
the baseline is a C sink that reads the same stream and walks its framing without doing
anything, the floor of the transport.  A Python sink shows what any Python receiver pays
per message.  The C reference vfio-user server (refserver.c) and vfio-ep's C path also take
the same stream aimed at one register (pci-epf-test's SIZE in BAR0, the reference's
scratch register): sustained posted writes against the C floor of a real server.

The stream to a register Python applies (pci-epf-test's COMMAND) is broken down in a note:
its server's CPU a write, thread by thread (/proc), the event loop's part split by the
server's probes (vfio_ep.bench.probe), beside the C servers' CPU a write.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import click

from vfio_ep import native
from vfio_ep.bench import probe
from vfio_ep.bench.client import Client
from vfio_ep.bench.common import (
    HERE,
    BenchError,
    Column,
    Result,
    Server,
    build_c,
    median,
    ratio,
    serve,
    thread_cpu,
)
from vfio_ep.epf.functions import pci_epf_test as t
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.protocol import Command

BAR = 1  # pci-epf-test's BAR1: plain EP RAM behind it
BAR_SIZE = 128 << 10
REG_SIZE = t.REG_OFFSET["size"][0]  # pci-epf-test's SIZE register (the reference's scratch)
REG_COMMAND = t.REG_OFFSET["command"][0]  # watched: Python applies every write
WRITE_SIZE = 4
PROBED = "c-path-cmd"  # the target whose time per write is broken down (its server probed)
# header, access (offset, region, count), 4 data bytes
_MSG = struct.Struct(p.HEADER.struct.format + p.ACCESS.struct.format.lstrip("<") + "I")


@dataclass(frozen=True)
class Target:
    name: str
    label: str
    fraction: float  # of N this target gets, so that each run lasts long enough
    bar: int = BAR  # where the writes go: `span` bytes from `start`, word after word
    start: int = 0
    span: int = BAR_SIZE
    zeros: bool = False  # write 0 (COMMAND: the handler runs, with no command to do)


def _targets() -> list[Target]:
    out = [Target("sink-c", "raw AF_UNIX sink (C)", 10.0),  # long enough to time
           Target("sink-py", "raw AF_UNIX sink (Python)", 5.0)]
    if native.available()[0]:
        out.append(Target("c-path", "server, C fast path", 1.0))
    out.append(Target("py-path", "server, Python path", 0.1))
    out.append(Target("ref", "C reference server, one register", 1.0, 0, REG_SIZE, WRITE_SIZE))
    if native.available()[0]:
        out.append(Target("c-path-reg", "server, C fast path, one register", 1.0, 0, REG_SIZE,
                          WRITE_SIZE))
        out.append(Target("c-path-cmd", "server, C fast path, a register Python applies", 1.0,
                          0, REG_COMMAND, WRITE_SIZE, zeros=True))
    return out


@functools.cache
def build_stream(n: int, bar: int, start: int, span: int, zeros: bool = False
                 ) -> tuple[bytes, int, int]:
    """N posted 4-byte writes over ``span`` bytes of ``bar`` from ``start`` (as a driver
    filling a buffer would), with ids 1..N; returns the stream and the last write's offset
    and value, for the fence to check.  Built once per target and reused: the server
    replies to none of them, so ids may repeat."""
    buf = bytearray(_MSG.size * n)
    words = span // WRITE_SIZE
    flags = p.FLAG_REQUEST | p.FLAG_NO_REPLY
    off = value = 0
    for i in range(n):
        off = start + (i % words) * WRITE_SIZE
        value = 0 if zeros else (i * 2654435761) & 0xFFFFFFFF
        _MSG.pack_into(buf, i * _MSG.size, (1 + i) & 0xFFFF, Command.REGION_WRITE,
                       _MSG.size, flags, 0, off, bar, WRITE_SIZE, value)
    return bytes(buf), off, value


def run_once(client: Client, target: Target, n: int, check: bool) -> float:
    """Send N posted writes and the fence; seconds until the fence's reply."""
    stream, last_off, last_value = build_stream(n, target.bar, target.start, target.span,
                                                target.zeros)
    client.msg_id = n & 0xFFFF
    fence_id = client.next_id()
    fence = p.HEADER.pack(fence_id, Command.REGION_READ, p.HEADER_SIZE + p.ACCESS.size,
                      p.FLAG_REQUEST, 0) + p.ACCESS.pack(last_off, target.bar, WRITE_SIZE)
    start = time.perf_counter()
    client.sock.sendall(stream)
    client.sock.sendall(fence)
    body = client.reply(fence_id, Command.REGION_READ)
    elapsed = time.perf_counter() - start
    got = int.from_bytes(body[p.ACCESS.size :], "little")
    if check and got != last_value:
        raise BenchError(f"fence read {got:#x} at BAR{target.bar}+{last_off:#x}, wrote "
                         f"{last_value:#x}")
    return elapsed


@contextlib.contextmanager
def _target(t: Target) -> Iterator[tuple[Server, Client]]:
    if t.name == "sink-c":
        ctx = serve(argv=[str(build_c(HERE / "sink.c"))])
    elif t.name == "sink-py":
        ctx = serve(argv=[sys.executable, "-m", "vfio_ep.bench.dispatch", "--sink"])
    elif t.name == "ref":
        ctx = serve(argv=[str(build_c(HERE / "refserver.c"))])
    else:
        ctx = serve(fastpath=t.name.startswith("c-path"), probe=t.name == PROBED)
    with ctx as server, Client(server.socket, negotiate=not t.name.startswith("sink")) as c:
        yield server, c


def _cpu_since(pid: int, before: dict[int, int], into: dict[str, int]) -> None:
    """Add the CPU ns each kind of thread of ``pid`` ran since ``before`` to ``into``: the
    main thread (a vfio-ep server's event loop) and the others (its C I/O thread)."""
    for tid, ns in thread_cpu(pid).items():
        kind = "main" if tid == pid else "others"
        into[kind] = into.get(kind, 0) + ns - before.get(tid, 0)


def where_it_goes(writes: int, cpu: dict[str, int], probed: dict[str, tuple[int, int]],
                  ref: float, reg: float | None, wall: float) -> str:
    """The note under the probed row: its server's CPU a write by thread, the event loop's
    split by the probes (ns per write in; us out), against the C servers' CPU a write."""
    applied_calls, applied = probed.get("applied", (0, 0))
    copied = probed.get("copied", (0, 0))[1]
    loop, io = cpu.get("main", 0) / writes, cpu.get("others", 0) / writes
    return (f"a register Python applies, where a write's time goes (CPU time over its runs, "
            f"per thread from /proc, the event loop's split by vfio_ep/bench/probe.py): "
            f"{(loop + io) / 1e3:.2f} us of server CPU a write against the C reference's "
            f"{ref / 1e3:.2f}" + (f" (C fast path, one register: {reg / 1e3:.2f})" if reg
                                   else "") +
            f": the C I/O thread {io / 1e3:.2f} (read, acknowledge, queue), the event loop "
            f"{loop / 1e3:.2f}: copying the queue out {copied / writes / 1e3:.2f}, applying "
            f"the writes {(applied - copied) / writes / 1e3:.2f} (each through "
            "PciDevice.region_write to its window, WatchedRam's store and the watch's "
            "callback; the batch handed back), the rest "
            f"{(loop - applied / writes) / 1e3:.2f} (waiting for and taking each batch: "
            "epoll, the eventfd, trio; the handler's runs); "
            f"{writes / max(applied_calls, 1):.0f} writes a batch, {wall / 1e3:.2f} us a "
            "write of wall time.")


def run(n: int = 200_000, reps: int = 5) -> Result:
    """Interleave the targets rep by rep, so load from other jobs hits them alike."""
    started = time.monotonic()
    targets = _targets()
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    counts = {t.name: max(int(n * t.fraction), 100) for t in targets}
    check = {t.name: not t.name.startswith("sink") for t in targets}
    cpu: dict[str, dict[str, int]] = {t.name: {} for t in targets}
    probed: dict[str, tuple[int, int]] = {}
    try:
        with contextlib.ExitStack() as stack:
            ends = {t.name: stack.enter_context(_target(t)) for t in targets}
            for t in targets:  # warm-up: first-touch page faults, caches, trio's first wakeups
                run_once(ends[t.name][1], t, max(counts[t.name] // 10, 100), check[t.name])
            before = probe.take(ends[PROBED][0]) if PROBED in ends else None
            for _ in range(reps):
                for t in targets:
                    pid = ends[t.name][0].pid
                    start = thread_cpu(pid)
                    times[t.name].append(run_once(ends[t.name][1], t, counts[t.name],
                                                  check[t.name]))
                    _cpu_since(pid, start, cpu[t.name])
            if before is not None:
                probed = probe.take(ends[PROBED][0]).since(before)
    finally:
        build_stream.cache_clear()  # up to 10 N messages
    rates = {name: counts[name] / median(ts) for name, ts in times.items()}
    base = rates["sink-c"]
    rows = [{"target": t.label, "messages": counts[t.name], "rate": rates[t.name],
             "ns_per_msg": 1e9 / rates[t.name], "wire_mb_s": rates[t.name] * _MSG.size / 1e6,
             "ratio": ratio(rates[t.name], base),
             "vs_c": ratio(rates[t.name], rates.get("c-path")),
             "vs_ref": ratio(rates["ref"], rates[t.name]) if t.name.startswith("c-path-")
             else None,
             "spread": (max(times[t.name]) - min(times[t.name])) / median(times[t.name])}
            for t in targets]
    notes = [f"{WRITE_SIZE}-byte posted REGION_WRITEs ({_MSG.size} bytes on the wire) to BAR{BAR}"
             f" RAM, then one REGION_READ fence; median of {reps} runs, targets interleaved.",
             "one register: the same stream aimed at BAR0's SIZE register (pci-epf-test's, "
             "stored in EP RAM and written by C; the C reference's scratch register); time "
             "vs C ref = the reference's rate / ours (target <= 1.0x).",
             "a register Python applies: the same stream of zeros to pci-epf-test's COMMAND "
             "(watched: each write is acknowledged by the I/O thread and queued, the queue "
             "applied by the event loop, the command handler run and finding no command); "
             "target <= 1.1x the C reference's time per write."]
    if PROBED in rates:
        per_write = {name: sum(cpu[name].values()) / (reps * counts[name]) for name in cpu}
        notes.append(where_it_goes(reps * counts[PROBED], cpu[PROBED], probed,
                                   per_write["ref"], per_write.get("c-path-reg"),
                                   1e9 / rates[PROBED]))
    if not native.available()[0]:
        notes.append(f"C fast path not measured: {native.available()[1]}")
    return Result(
        "dispatch", "posted REGION_WRITE messages applied per second", "raw AF_UNIX sink (C)",
        [Column("target", "target"), Column("messages", "N"),
         Column("rate", "msg/s", "{:,.0f}"), Column("ns_per_msg", "ns/msg", "{:,.0f}"),
         Column("wire_mb_s", "wire MB/s", "{:,.1f}"), Column("ratio", "vs sink", "{:.3g}x"),
         Column("vs_c", "vs C path", "{:.3g}x"), Column("vs_ref", "time vs C ref", "{:.2f}x"),
         Column("spread", "spread", "{:.0%}")],
        rows, {"n": n, "reps": reps, "bar": BAR, "write_size": WRITE_SIZE}, notes,
        time.monotonic() - started)


# -- the Python sink (a subprocess: python -m vfio_ep.bench.dispatch --sink SOCKET) ----------
def python_sink(path: str) -> None:
    """Read the stream in 1 MiB chunks and walk its framing; answer what wants a reply."""
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    while True:
        conn, _ = lsock.accept()
        with conn:
            _drain(conn)


def _drain(conn: socket.socket) -> None:
    buf = bytearray(2 << 20)
    view = memoryview(buf)
    have = 0
    unpack = struct.Struct("<I").unpack_from
    while True:
        k = conn.recv_into(view[have:])
        if not k:
            return
        have += k
        pos = 0
        while have - pos >= p.HEADER_SIZE:
            (size,) = unpack(buf, pos + 4)
            if have - pos < size:
                break
            if not buf[pos + 8] & (p.FLAG_TYPE_MASK | p.FLAG_NO_REPLY):
                _reply(conn, bytes(buf[pos : pos + size]))
            pos += size
        buf[: have - pos] = buf[pos:have]
        have -= pos


def _reply(conn: socket.socket, msg: bytes) -> None:
    msg_id, cmd, _, _, _ = p.HEADER.unpack_from(msg)
    if cmd == Command.REGION_READ:
        off, region, count = p.ACCESS.unpack_from(msg, p.HEADER_SIZE)
        body = p.ACCESS.pack(off, region, count) + bytes(count)
    else:
        body = b""
    conn.sendall(p.HEADER.pack(msg_id, cmd, p.HEADER_SIZE + len(body), p.FLAG_REPLY, 0) + body)


@click.command()
@click.option("--sink", metavar="SOCKET", required=True, help="Be the Python sink on SOCKET.")
def main(sink: str) -> None:
    """The Python socket sink the dispatch benchmark measures against."""
    python_sink(sink)


if __name__ == "__main__":
    main()
