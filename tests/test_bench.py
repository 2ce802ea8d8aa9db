"""Smoke test of the benchmarks that need no guest: tiny N and sizes, so this checks the
plumbing (server subprocesses, sinks, the client, the results files), never the numbers.
One guest test runs ep-guest's --quick variant, the EP guest pair and its parsing."""

from __future__ import annotations

import json
import math
import os
import select
from pathlib import Path

import pytest
from vfio_user_client import Client

from vfio_ep.bench import dispatch, doorbell, ep_guest, probe, scale, transfer, wake
from vfio_ep.bench.__main__ import _runners, main
from vfio_ep.bench.common import BenchError, Result, write_results
from vfio_ep.bench.doorbell import REF_DEVICE, REF_VENDOR, reference_server
from vfio_ep.bench.trapped import host_round_trips
from vfio_ep.vfio_user import protocol as p


def _well_formed(r: Result, name: str) -> None:
    assert r.name == name and r.rows and r.baseline
    keys = {c.key for c in r.columns}
    for row in r.rows:
        assert keys <= row.keys() | {"ms"}, row
        assert row["ratio"] is not None and math.isfinite(row["ratio"]) and row["ratio"] > 0
    lines = r.text().splitlines()
    assert len(lines) >= 4 + len(r.rows)
    assert r.markdown().count("\n|") >= 2 + len(r.rows)


def test_dispatch_small() -> None:
    r = dispatch.run(n=2000, reps=1)
    _well_formed(r, "dispatch")
    rows = {row["target"]: row for row in r.rows}
    assert "server, Python path" in rows
    assert all(row["rate"] > 0 for row in r.rows)
    # where a write to a register Python applies spends its time, from the probed server
    (note,) = [n for n in r.notes if "where a write's time goes" in n]
    assert "the C I/O thread" in note and "writes a batch" in note


def test_transfer_small() -> None:
    r = transfer.run(sizes=(64 << 10,), reps=1)
    _well_formed(r, "transfer")
    ops = [row["op"] for row in r.rows]
    assert ops == ["READ memcpy", "WRITE memcpy", "COPY memcpy", "READ DMA", "WRITE DMA",
                   "COPY DMA"]
    # each against the host doing that operation's work
    assert all(row["host_ms"] > 0 and row["ratio"] > 0 for row in r.rows)
    # the floor's stages, from the client's and the probed server's stamps
    (note,) = [n for n in r.notes if n.startswith("floor ms, where it goes")]
    assert "the function's Python" in note and "by DMA" in note


def test_wake_small() -> None:
    """The ways the I/O thread may wait, each timed against poll on one CPU and, where the
    machine has two, across CPUs; the note says what the thread's own wait saves."""
    r = wake.run(n=500, reps=1)
    assert r.name == "wake" and r.baseline
    assert [row["mode"] for row in r.rows[:4]] == list(wake.MODES)
    assert all(row["median_us"] > 0 and row["vs_poll"] > 0 for row in r.rows)
    assert {row["placement"] for row in r.rows} <= {"one CPU", "across CPUs"}
    assert any("the I/O thread's blocking peek saves" in n for n in r.notes)


def test_every_probed_function_exists() -> None:
    """The probes wrap the server's functions by name: a rename must fail here (the server
    under the probe would not start)."""
    for owner, attr in [*probe.TIMED.values(), *probe.STAMPED.values()]:
        assert callable(getattr(owner, attr, None)), f"{owner.__name__}.{attr}"


def test_floor_stages_from_the_client_and_server_stamps() -> None:
    client = [{"c0": 0, "c1": 20, "c2": 200}, {"c0": 1000, "c1": 1030, "c2": 1150}]
    server = [{"applied": 40, "handler": 90, "raise": 170, "msix": 180},
              {"applied": 1050, "handler": 1090, "raise": 1120, "msix": 1130}]
    got = transfer.floor_stages(client, server)
    assert got == {"acked": [20, 30], "applied": [40, 50], "handler": [50, 40],
                   "raise": [80, 30], "msix": [10, 10], "c2": [20, 20]}
    with pytest.raises(BenchError, match="2 commands but 1 MSI-X"):
        transfer.floor_stages(client, server[:1])


def test_scale_small() -> None:
    """Several controllers in one server, each read through its own socket."""
    r = scale.run(devices=(1, 3), reads=300)
    _well_formed(r, "scale")
    assert [row["case"] for row in r.rows] == ["1 device, one process", "3 devices, one process",
                                               "1 device, 2048 MSI-X vectors"]
    assert all(row["us"] > 0 for row in r.rows)


def test_results_files_merge(tmp_path: Path) -> None:
    out = tmp_path / "bench-results.json"
    a = transfer.run(sizes=(64 << 10,), reps=1)
    write_results([a], out)
    b = Result("dispatch", "t", "b", a.columns, a.rows)
    json_path, md_path = write_results([b], out)
    data = json.loads(json_path.read_text())
    assert list(data["benchmarks"]) == ["dispatch", "transfer"]  # kept, in canonical order
    md = md_path.read_text()
    assert "**dispatch**" in md and "**transfer**" in md and "| operation |" in md


def test_cli_rejects_unknown(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["nope"])
    assert e.value.code == 2
    assert "unknown benchmark nope" in capsys.readouterr().err


def test_guest_result_lines_parse() -> None:
    out = ("doorbell BAR1+0x0 data 0x0 (mmap)\n"
           "RESULT doorbell-round-trip n=10 median_ns=1500 p99_ns=9000 via=vfio-mmap\n")
    got = doorbell.parse_results(out)
    assert got == {"doorbell-round-trip": {"n": 10.0, "median_ns": 1500.0, "p99_ns": 9000.0,
                                           "via": "vfio-mmap"}}


def test_ep_guest_transfer_times_from_the_functions_dmesg() -> None:
    """pci-epf-test's own lines (7.3's %ptSp time), the size asked only, each operation's
    warm-up dropped."""
    line = ("[   12.9] pci_epf_test pci_epf_test.0: {op} => Size: {size} B, DMA: {dma}, "
            "Time: {t} s, Rate: 1 KB/s")
    dmesg = "\n".join(line.format(op=op, size=size, dma=dma, t=t) for op, size, dma, t in (
        ("READ", 4096, "YES", "9.000000001"), ("READ", 4096, "YES", "0.002589017"),
        ("READ", 4096, "NO", "0.5"), ("READ", 1024, "YES", "0.5"),
        ("WRITE", 4096, "YES", "1.0"), ("WRITE", 4096, "YES", "0.0025"),
        ("WRITE", 4096, "YES", "0.0035"), ("COPY", 4096, "YES", "0.5")))
    assert ep_guest.transfer_times(dmesg, 4096) == {"READ": [0.002589017],
                                                    "WRITE": [0.0025, 0.0035]}


@pytest.mark.guest
def test_ep_guest_quick() -> None:
    """make bench's ep-guest, --quick: the same RC program against vfio-ep's Python
    pci-epf-test and against Linux's in an EP guest, a row per access and transfer."""
    r = _runners(quick=True)["ep-guest"]()
    _well_formed(r, "ep-guest")
    rows = {row["case"]: row for row in r.rows}
    bars = [f"BAR{b} {k}" for b in range(6) for k in ("read", "write")]
    assert list(rows) == ["doorbell -> MSI-X", *bars, "DMA READ 1 MiB", "DMA WRITE 1 MiB"]
    assert all(row["median_us"] > 0 and row["python_us"] is not None for row in r.rows)
    for op in ("READ", "WRITE"):  # the function's own time, the RC's ioctl around it
        dma = rows[f"DMA {op} 1 MiB"]
        assert 0 < dma["median_us"] < dma["rc_us"] and dma["mb_s"] > 0


@pytest.mark.guest
def test_ep_vntb_quick() -> None:
    """make bench's ep-vntb, --quick: the kernel's vNTB on both sides, pinged with the
    embedded doorbell and polled; polling is the slower."""
    r = _runners(quick=True)["ep-vntb"]()
    _well_formed(r, "ep-vntb")
    embedded, polled = r.rows
    assert embedded["ratio"] == 1 and polled["replies"] >= 18
    assert polled["median_ms"] > embedded["median_ms"], r.rows


@pytest.mark.guest
def test_ep_nvme_quick() -> None:
    """make bench's ep-nvme, --quick: the EP guest's nvmet-pci-epf and QEMU's nvme in one
    RC guest, each written and read."""
    r = _runners(quick=True)["ep-nvme"]()
    _well_formed(r, "ep-nvme")
    assert [row["case"] for row in r.rows] == ["sequential write, 8 MiB",
                                              "sequential read, 8 MiB"]
    assert all(row["mb_s"] > 0 and row["baseline_mb_s"] > 0 for row in r.rows)


def test_reference_server_speaks_enough_vfio_user() -> None:
    """The trapped benchmark's C floor (refserver.c) answers what QEMU asks at attach time,
    keeps its registers, and its doorbell register raises MSI-X vector 0."""
    with reference_server() as server:
        c = Client(server.socket)
        try:
            info = c.device_info()
            assert (info["num_regions"], info["num_irqs"]) == (p.NUM_REGIONS, p.NUM_IRQS)
            assert c.cfg_read32(0) == REF_DEVICE << 16 | REF_VENDOR
            msix = c.capabilities()[0x11]
            assert c.irq_info(p.Irq.MSIX)["count"] == 1
            for bar, size in ((0, 4096), (1, 0), (3, 0)):
                assert c.region_info(bar)[0]["size"] == size
            info, _, fds = c.region_info(2)  # RAM the guest maps, as pci-epf-test's BARs
            assert info["size"] == 4096 and info["flags"] & p.REGION_INFO_FLAG_MMAP
            assert len(fds) == 1
            os.close(fds[0])
            c.write(p.Region.BAR0, 0x10, b"\x78\x56\x34\x12")
            c.write(p.Region.BAR0, 0x14, b"\xaa", posted=True)
            assert c.read(p.Region.BAR0, 0x10, 5) == b"\x78\x56\x34\x12\xaa"
            c.guest_memory(0x100000, 1 << 16).close()  # DMA_MAP with an fd, acknowledged
            (fd,) = c.enable_interrupts(1, msix=True)
            assert c.cfg_read32(msix) >> 16 & 0x8000  # MSI-X enable kept
            c.write(p.Region.BAR0, 0x08, b"\x01\0\0\0")  # the doorbell
            assert select.select([fd], [], [], 5)[0] == [fd]
            assert int.from_bytes(os.read(fd, 8), "little") == 1
            os.close(fd)
        finally:
            c.close()


def test_host_round_trips_against_the_raw_socket_and_the_reference() -> None:
    """The trapped benchmark's host-side baselines: every server answers the same read."""
    got = host_round_trips(reads=200)
    assert list(got) == ["raw C socket", "C reference", "vfio-ep C path",
                         "vfio-ep C path, a register Python answers", "vfio-ep Python path"]
    assert all(0 < us < 100_000 for us in got.values())
