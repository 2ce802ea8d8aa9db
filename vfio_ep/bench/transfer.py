"""transfer: pci-epf-test READ/WRITE/COPY throughput, memcpy and DMA, vs the host doing
the same work.

Driven as pci_endpoint_test drives it, over our own vfio-user client instead of a guest (a
TCG guest would measure QEMU, not the endpoint): guest RAM is a memfd mapped with DMA_MAP,
the registers are programmed, and the time runs from the COMMAND write to the completion
MSI-X on its eventfd.  The baseline of each operation is this process doing the same work
on the same buffers, measured in the same run: READ copies and checksums (CRC32), WRITE
fills with random data, checksums and copies, COPY copies.  The ratio is how far the
endpoint's data path (messages, the outbound iATU, the eDMA model) is from that work alone.

A 4 KiB command of each kind is the "floor", what any command costs before its data; a note
breaks it into stages, from the client's stamps and the server's (the server runs under
vfio_ep.bench.probe): the COMMAND write reaching the event loop, the handler task started,
the function's Python, the MSI-X raised, the client woken.
"""

from __future__ import annotations

import os
import time
import zlib

import trio

from vfio_ep.bench import probe
from vfio_ep.bench.client import Client, RcSide
from vfio_ep.bench.common import BenchError, Column, Result, median, ratio, serve
from vfio_ep.bulk import fill_random
from vfio_ep.epc.core import PciEpcAttributes
from vfio_ep.epc.dw import OUTBOUND_SIZE
from vfio_ep.epf.functions import pci_epf_test as t

MIB = 1 << 20
SIZES = (1 * MIB, 4 * MIB, 16 * MIB, 64 * MIB)
FLOOR_SIZE = 4096  # a command whose data costs next to nothing: the per-command cost
FLOOR_SHARE_MAX = 0.25  # the data's part must be at least this share of a command's time
OPS = {"READ": t.COMMAND_READ, "WRITE": t.COMMAND_WRITE, "COPY": t.COMMAND_COPY}
OK = {"READ": t.STATUS_READ_SUCCESS, "WRITE": t.STATUS_WRITE_SUCCESS,
      "COPY": t.STATUS_COPY_SUCCESS}
IOVA = 0x1_0000_0000  # guest RAM above 4 GiB, as a 64-bit DMA mask allows
REG_BAR = 0
REG = {name: off for name, (off, _) in t.REG_OFFSET.items()}
# A floor command's stages, each from the stamp before to its own: the client's (c0: the
# COMMAND write sent, c2: the MSI-X seen) and the probed server's (vfio_ep.bench.probe).
STAGES = (("c0", "applied", "the COMMAND write reaching the event loop (the I/O thread reads, "
           "acknowledges, queues it and wakes the loop)"),
          ("applied", "handler", "the write applied and the handler task started (the queue's "
           "copy, region_write, the watch's callback, trio)"),
          ("handler", "raise", "the function's Python"),
          ("raise", "msix", "raising the MSI-X (pci_epc_raise_irq to the eventfd's write)"),
          ("msix", "c2", "the eventfd reaching the client"))


class Endpoint:
    """pci-epf-test behind a server process, with guest RAM holding a source and a
    destination buffer of ``max_size`` each."""

    def __init__(self, client: Client, max_size: int) -> None:
        self.c = client
        self.dst_off = max_size + 4096
        self.rc = RcSide(client, IOVA, 2 * max_size + 8192)
        self.src = memoryview(self.rc.mem)[:max_size]
        self.dst = memoryview(self.rc.mem)[self.dst_off : self.dst_off + max_size]
        self.src[:] = os.urandom(max_size)
        self.dst[:] = bytes(max_size)  # touch every page now, not inside a timed run
        # The host's copy of the function's buffer in EP RAM (COPY by memcpy stages there).
        self.stage = memoryview(bytearray(max_size))
        # The last command's client stamps (monotonic ns): c0 the COMMAND write sent, c1 its
        # reply, c2 the MSI-X seen.
        self.stamps: dict[str, int] = {}

    def w(self, name: str, value: int) -> None:
        off, size = t.REG_OFFSET[name]
        self.c.write(REG_BAR, off, value.to_bytes(size, "little"))

    def op(self, name: str, size: int, dma: bool, checksum: int) -> float:
        """One command; seconds from the COMMAND write to its completion interrupt."""
        self.w("status", 0)
        self.w("irq_type", t.IRQ_TYPE_MSIX)
        self.w("irq_number", 1)
        self.w("src_addr", IOVA)
        self.w("dst_addr", IOVA + self.dst_off)
        self.w("size", size)
        self.w("checksum", checksum)
        self.w("flags", t.FLAG_USE_DMA if dma else 0)
        c0 = time.monotonic_ns()  # CLOCK_MONOTONIC: the probed server's stamps' clock
        self.w("command", OPS[name])
        c1 = time.monotonic_ns()
        self.rc.wait_irq()
        self.stamps = {"c0": c0, "c1": c1, "c2": time.monotonic_ns()}
        elapsed = (self.stamps["c2"] - c0) / 1e9
        status = self.c.read32(REG_BAR, REG["status"])
        if not status & OK[name]:
            raise BenchError(f"{name} of {size} bytes ({'DMA' if dma else 'memcpy'}) failed: "
                             f"STATUS {status:#x}")
        if name == "COPY" and self.dst[:4096] != self.src[:4096]:
            raise BenchError("COPY: destination differs from source")
        return elapsed

    def host_work(self, name: str, size: int, dma: bool) -> float:
        """Seconds for this process to do what ``name`` does to ``size`` bytes, on the
        same buffers: the baseline (the destination doubles as WRITE's fill buffer).  COPY
        by memcpy copies twice, through the function's buffer, as the kernel's does."""
        src, dst, stage = self.src[:size], self.dst[:size], self.stage[:size]

        async def work() -> float:  # timed inside the loop: trio.run's start-up is not work
            start = time.perf_counter()
            if name == "WRITE":
                await fill_random([dst])
                zlib.crc32(dst)
                src[:] = dst
            elif name == "COPY" and not dma:
                stage[:] = src
                dst[:] = stage
            else:
                dst[:] = src
                if name == "READ":
                    zlib.crc32(dst)
            return time.perf_counter() - start

        return trio.run(work)

    def close(self) -> None:
        self.src.release()
        self.dst.release()
        self.stage.release()
        self.rc.close()


def beyond_floor(host: float, took: float, floor: float) -> float | None:
    """host / (took - floor): how the data's part of a command compares with the host's
    work; None where the floor is most of the time (what is left is noise)."""
    if took - floor < FLOOR_SHARE_MAX * took:
        return None
    return ratio(host, took - floor)


def floor_stages(client: list[dict[str, int]], server: list[dict[str, int]]
                 ) -> dict[str, list[int]]:
    """Each stage's ns (STAGES, and "acked": the COMMAND write's reply at the client) for
    every command, from its client and server stamps (one record each, in order)."""
    if len(client) != len(server):
        raise BenchError(f"{len(client)} commands but {len(server)} MSI-X stamped by the "
                         "server")
    out: dict[str, list[int]] = {"acked": [c["c1"] - c["c0"] for c in client]}
    for c, s in zip(client, server, strict=True):
        both = c | s
        for start, end, _ in STAGES:
            out.setdefault(end, []).append(both[end] - both[start])
    return out


def where_it_goes(stages: dict[tuple[str, bool], dict[str, list[int]]]) -> str:
    """The floor's note: each stage's median (us) over all the floor commands, the
    function's Python per operation."""
    def us(values: list[int]) -> str:
        return f"{median(values) / 1e3:.0f}"

    pooled: dict[str, list[int]] = {}
    for per_kind in stages.values():
        for stage, values in per_kind.items():
            pooled.setdefault(stage, []).extend(values)
    parts = []
    for _, end, what in STAGES:
        if end == "raise":
            kinds = [(name, dma) for dma in (False, True) for name in OPS]
            what += (f" {us(pooled[end])} (READ/WRITE/COPY by memcpy " +
                     "/".join(us(stages[k][end]) for k in kinds[:3]) + ", by DMA " +
                     "/".join(us(stages[k][end]) for k in kinds[3:]) + ")")
        else:
            what += f" {us(pooled[end])}"
        parts.append(what)
    return ("floor ms, where it goes (medians, us, over every floor command; CLOCK_MONOTONIC "
            "stamps in the client and in the server, vfio_ep/bench/probe.py): " +
            ", ".join(parts) + "; the COMMAND write's reply reaches the client after "
            f"{us(pooled['acked'])}.")


def run(sizes: tuple[int, ...] = SIZES, reps: int = 5) -> Result:
    started = time.monotonic()
    rows = []
    ram_size = PciEpcAttributes.ram_size
    if max(sizes) > ram_size // 2:  # a DMA READ/WRITE bounces through EP RAM
        raise BenchError(f"sizes up to {max(sizes)} need ram_size > {2 * max(sizes)}")
    stages = {}  # the floor commands' stages, by operation
    with serve(probe=True) as server, Client(server.socket) as client:
        ep = Endpoint(client, max(sizes))
        try:
            floor = {}  # a FLOOR_SIZE command: what every command costs before its data
            crc = zlib.crc32(ep.src[:FLOOR_SIZE]) ^ 0xFFFFFFFF
            for dma in (False, True):
                for name in OPS:
                    ep.op(name, FLOOR_SIZE, dma, crc)
                    probe.take(server)  # the warm-up's stamps
                    times, stamps = [], []
                    for _ in range(4 * reps):
                        times.append(ep.op(name, FLOOR_SIZE, dma, crc))
                        stamps.append(ep.stamps)
                    floor[name, dma] = median(times)
                    stages[name, dma] = floor_stages(stamps, probe.take(server).commands)
            for size in sizes:
                host = {}
                for dma in (False, True):
                    for name in OPS:
                        ep.host_work(name, size, dma)  # warm-up
                        host[name, dma] = median([ep.host_work(name, size, dma)
                                                  for _ in range(reps)])
                ep.src[:size] = os.urandom(size)  # the host's WRITE work overwrote it
                crc = zlib.crc32(ep.src[:size]) ^ 0xFFFFFFFF
                for dma in (False, True):
                    for name in OPS:
                        ep.op(name, size, dma, crc)  # warm-up: first-touch faults
                        took = median([ep.op(name, size, dma, crc) for _ in range(reps)])
                        rows.append({"op": f"{name} {'DMA' if dma else 'memcpy'}",
                                     "size_mib": size / MIB, "mb_s": size / took / 1e6,
                                     "ms": took * 1e3, "host_ms": host[name, dma] * 1e3,
                                     "ratio": ratio(host[name, dma], took),
                                     "floor_ms": floor[name, dma] * 1e3,
                                     "beyond": beyond_floor(host[name, dma], took,
                                                            floor[name, dma])})
        finally:
            ep.close()
    notes = [f"median of {reps} runs per row after a warm-up one; time from the COMMAND "
             "write to the MSI-X (includes the function's CRC32, and WRITE's random data, as "
             "in the kernel; not the kernel's 1 ms usleep_range() after a WRITE, which waits "
             "for posted writes a DRA7xx had in flight and here have landed).",
             "host ms: this process doing the same work on the same buffers (READ: copy + "
             "CRC32; WRITE: random fill + CRC32 + copy; COPY: copy, twice by memcpy: through "
             "the function's buffer, as the kernel's pci-epf-test does); vs host = host ms / "
             "ms, target >= 0.5x (before 2026-11-29 COPY by memcpy was held against one "
             "copy: its ratio then was about half).",
             f"floor ms: a {FLOOR_SIZE // 1024} KiB command of the same kind (median of "
             f"{4 * reps}): the cost of any command before its data (its stages: the next "
             "note); beyond floor = host ms / (ms - floor ms), left out (-) where the "
             f"floor is over {1 - FLOOR_SHARE_MAX:.0%} of ms.  Where the host's work is "
             "below the floor (COPY at 1-4 MiB: a memcpy of 0.03-0.2 ms) no command path "
             "reaches 0.5x.",
             where_it_goes(stages),
             f"EP RAM {ram_size // MIB} MiB (ram_size; DMA READ/WRITE bounce through it), "
             f"outbound aperture {OUTBOUND_SIZE // MIB} MiB; C fast path server."]
    return Result(
        "transfer", "pci-epf-test READ/WRITE/COPY throughput",
        "the host doing the same work on the same buffers",
        [Column("op", "operation"), Column("size_mib", "MiB", "{:g}"),
         Column("mb_s", "MB/s", "{:,.0f}"), Column("ms", "ms", "{:,.1f}"),
         Column("host_ms", "host ms", "{:,.2f}"), Column("ratio", "vs host", "{:.3g}x"),
         Column("floor_ms", "floor ms", "{:,.2f}"),
         Column("beyond", "beyond floor", "{:.3g}x")],
        rows, {"sizes": list(sizes), "reps": reps, "ram_size": ram_size}, notes,
        time.monotonic() - started)
