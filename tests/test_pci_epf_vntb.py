"""pci-epf-vntb behind the vfio-user server, driven the way ntb_hw_epf drives it.

The RC side here is our own client doing what 7.3.4's ntb_hw_epf does on the bus (the
real driver runs in the guest tests); the EP side is the function with its tool client,
so each primitive is checked in both directions.  Every test runs on the C and the
Python path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ntb_hw_epf_rc import CTRL, NtbHwEpfRc
from vfio_user_client import Client, ServerThread

from vfio_ep import cmdline
from vfio_ep.composition import Composition, attribute_listing
from vfio_ep.config import ConfigError
from vfio_ep.epc.core import EpcError
from vfio_ep.epc.edma import EMUL_DOORBELL_OFFSET
from vfio_ep.epf.functions import pci_epf_vntb as v
from vfio_ep.pci.capabilities import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX
from vfio_ep.vfio_user import protocol as p

GUEST = 0x100000
GUEST_SIZE = 2 << 20
MSI_VECTORS = 16
CTRL_BAR, MW1_BAR, DB_BAR = 0, 2, 4  # the seeds' R-Car layout (vfio-ep's defaults)


class Rc(NtbHwEpfRc):
    """ntb_hw_epf's side of the bus on the seeds' R-Car map: control BAR 0, 16 MSI."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, CTRL_BAR, GUEST, GUEST_SIZE, MSI_VECTORS)

    def spad(self, i: int, peer: bool = False) -> int:
        count = self.r("spad_count")
        return int.from_bytes(self.c.read(CTRL_BAR, self.r("spad_offset") + 4 * (
            i + (count if peer else 0)), 4), "little")

    def write_peer_spad(self, i: int, value: int) -> None:
        self.c.write(CTRL_BAR, self.r("spad_offset") + 4 * (self.r("spad_count") + i),
                     value.to_bytes(4, "little"))

    def peer_db_set(self, bit: int) -> None:
        """ntb_epf_peer_db_set(): slot bit + 2, data and offset re-read every time."""
        slot = bit + 2
        addr = self.r("db_entry_size") * slot + self.r("db_offset", slot)
        self.c.write(DB_BAR, addr, self.r("db_data", slot).to_bytes(4, "little"))



@contextmanager
def vntb(tmp_path: Path, **attrs: object) -> Iterator[tuple[Rc, v.PciEpfVntb]]:
    comp = Composition.single("pci-epf-vntb", {"ntb_client": "tool", **attrs})
    comp.assign_sockets([str(tmp_path / "ep.sock")])
    ep = comp.build()[0]
    with ServerThread(ep.device, ep.socket) as srv:
        client = Client(srv.path)
        rc = Rc(client)
        epf = ep.functions[0]
        assert isinstance(epf, v.PciEpfVntb)
        yield rc, epf
        client.close()


def test_the_rc_sees_what_ntb_hw_epf_reads_at_probe(tmp_path: Path, path: str) -> None:
    with vntb(tmp_path) as (rc, _):
        cfg = rc.c.read(p.Region.CONFIG, 0, 256)
        assert cfg[0:4] == bytes.fromhex("12193000") and cfg[0x0B] == 0x05  # class memory
        caps = rc.c.capabilities()
        assert PCI_CAP_ID_MSIX not in caps
        assert (int.from_bytes(cfg[caps[PCI_CAP_ID_MSI] + 2:][:2], "little") >> 1) & 7 == 4
        assert {i: rc.c.region_info(i)[0]["size"] for i in (0, 2, 4)} == {
            0: 2048, 2: 1 << 20, 4: 128}
        assert (rc.r("spad_offset"), rc.r("spad_count"), rc.r("num_mws")) == (0x134, 128, 1)
        assert rc.r("db_entry_size") == 0  # an interrupt doorbell
        data = [rc.r("db_data", i) for i in range(4)]
        assert len(set(data)) == 4 and len({rc.r("db_offset", i) for i in range(4)}) == 1


def test_commands_and_their_status(tmp_path: Path, path: str,
                                   caplog: pytest.LogCaptureFixture) -> None:
    with vntb(tmp_path) as (rc, epf):
        assert rc.command(v.COMMAND_CONFIGURE_DOORBELL, MSI_VECTORS) == v.COMMAND_STATUS_OK
        assert rc.r("link_status", size=2) == 0
        assert rc.command(v.COMMAND_LINK_UP) == v.COMMAND_STATUS_OK
        assert rc.r("link_status", size=2) == v.LINK_STATUS_UP
        assert epf.ntb is not None and epf.ntb.link_is_up()
        rc.w("addr", GUEST)
        rc.w("size", 0x10000)
        assert rc.command(v.COMMAND_CONFIGURE_MW, 0) == v.COMMAND_STATUS_OK
        assert rc.command(v.COMMAND_CONFIGURE_MW, 3) == v.COMMAND_STATUS_ERROR  # no MW4
        rc.w("size", 2 << 20)
        assert rc.command(v.COMMAND_CONFIGURE_MW, 0) == v.COMMAND_STATUS_ERROR  # > mw1
        assert rc.command(99, timeout=0.2) == 0  # unknown: no status, the RC times out
        assert rc.r("command") == 0 and "UNKNOWN command: 99" in caplog.text
        assert rc.command(v.COMMAND_TEARDOWN_MW, 0) == v.COMMAND_STATUS_OK
        assert rc.command(v.COMMAND_LINK_DOWN) == v.COMMAND_STATUS_OK
        assert not epf.ntb.link_is_up()


@pytest.mark.parametrize("backend", ["msi", "embedded", "poll"])
def test_scratchpads_and_doorbells_both_ways(tmp_path: Path, path: str, backend: str) -> None:
    """Each doorbell comes back on its own slot; the embedded doorbell is one register for
    all of them, so in 7.3.4 any ring raises every doorbell on the EP, and all come back."""
    with vntb(tmp_path, doorbell=backend, doorbell_poll_interval_us=200,
              db_count=6) as (rc, _):
        assert rc.r("db_entry_size") == (4 if backend == "poll" else 0)
        assert rc.command(v.COMMAND_LINK_UP) == v.COMMAND_STATUS_OK
        for bit in range(4):  # db_count 6: doorbells 0-3
            for i in range(4):
                rc.write_peer_spad(i, 0x5A5A0000 + 16 * bit + i)
            rc.peer_db_set(bit)
            for answer in range(4) if backend == "embedded" else [bit]:
                assert rc.wait_irq(answer + 2), f"no MSI on slot {answer + 2} (rang {bit})"
            for i in range(4):  # the EP (tool client) read ours and answered in its own
                assert rc.spad(i) == ~(0x5A5A0000 + 16 * bit + i) & 0xFFFFFFFF
        assert not any(rc.wait_irq(slot, 0) for slot in range(MSI_VECTORS))


def test_an_idle_polled_doorbell_bar_does_not_wake_the_event_loop(tmp_path: Path,
                                                                  path: str) -> None:
    """The polled doorbell BAR's slots are watched by the C poller (every slot, the last
    too): the event loop wakes for a ring, never for a period that found none; on the
    Python path it looks every period itself."""
    with vntb(tmp_path, doorbell="poll", doorbell_poll_interval_us=500, db_count=6) as (rc,
                                                                                        epf):
        words = epf._db_poll
        assert words is not None and (words._poller is not None) == (path == "c")
        wakeups: list[float] = []
        wait = words.wait

        async def counted() -> None:
            await wait()
            wakeups.append(time.monotonic())

        words.wait = counted  # type: ignore[method-assign]  # from the wait after the next
        assert rc.command(v.COMMAND_LINK_UP) == v.COMMAND_STATUS_OK
        rc.peer_db_set(0)
        assert rc.wait_irq(2)
        before = len(wakeups)
        time.sleep(0.2)  # 400 periods, nothing rung
        idle = len(wakeups) - before
        rc.peer_db_set(3)  # DB#3: slot 5, the last word polled
        assert rc.wait_irq(5)
        assert len(wakeups) > before + idle
        if path == "c":
            assert idle == 0
        else:
            assert idle > 40


def test_memory_windows_both_ways(tmp_path: Path, path: str) -> None:
    """RC -> EP through the MW BAR, EP -> RC through the outbound window CONFIGURE_MW set."""
    with vntb(tmp_path) as (rc, _):
        rc.w("addr", GUEST)
        rc.w("size", 0x10000)
        assert rc.command(v.COMMAND_CONFIGURE_MW, 0) == v.COMMAND_STATUS_OK
        pattern = os.urandom(0x10000)
        for off in range(0, len(pattern), 4096):
            rc.c.write(MW1_BAR, off, pattern[off:off + 4096])
        rc.peer_db_set(0)
        assert rc.wait_irq(2)
        assert rc.mem[:0x10000] == pattern


def test_rk3588_reuses_the_doorbell_pre_exposed_in_bar4(tmp_path: Path, path: str) -> None:
    with vntb(tmp_path, controller="rk3588", doorbell="auto") as (rc, epf):
        assert epf.db_backend == "embedded"
        assert {rc.r("db_offset", i) for i in range(4)} == {EMUL_DOORBELL_OFFSET}
        assert rc.command(v.COMMAND_LINK_UP) == v.COMMAND_STATUS_OK
        rc.peer_db_set(1)  # the embedded doorbell rings every bit: the EP answers 0 and 1
        assert rc.wait_irq(2) and rc.wait_irq(3)


@pytest.mark.parametrize(("attrs", "error"), [
    ({"db_count": 2}, "db_count: 2 is out of range 3..32 "),
    ({"num_mws": 5}, "num_mws: 5 is out of range 0..4 "),
    ({"mw2": 4096}, "mw2 set but num_mws is 1: -ERANGE"),
    ({"db_bar": 6}, "db_bar: 6 is out of range -1..5 "),
    ({"ntb_client": "ftp"}, "ntb_client must be one of"),
    ({"netdev": "eth0"}, "builtin or tap:NAME"),
])
def test_configuration_is_checked_like_the_stores(attrs: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        Composition.single("pci-epf-vntb", dict(attrs)).function_attributes("func1")


def test_the_last_memory_window_gets_no_automatic_bar(tmp_path: Path) -> None:
    """7.3.4's optional-BAR loop starts at the MW1 slot: MW2 of two stays without a BAR."""
    comp = Composition.single("pci-epf-vntb", {"num_mws": 2, "mw2": 0x10000,
                                               "ntb_client": "none"})
    comp.assign_sockets([str(tmp_path / "s")])
    with pytest.raises(EpcError, match=r"MW2 got no BAR.*set mw2_bar"):
        comp.build()
    comp.set("mw2_bar=3")
    assert {b.index for b in comp.build()[0].device.spec.bars} == {0, 2, 3, 4}


@pytest.mark.parametrize(("items", "error"), [
    # the flat form's map is ctrl/db/mw1 = 0/4/2
    (["ctrl_bar=2"], r"^ctrl_bar and mw1_bar are both BAR2: each NTB region needs a BAR of "
     r"its own$"),
    (["db_bar=0"], r"^ctrl_bar and db_bar are both BAR0: "),
    (["num_mws=2", "mw2=0x10000", "mw2_bar=4"], r"^db_bar and mw2_bar are both BAR4: "),
])
def test_two_regions_on_one_bar_are_refused(items: list[str], error: str) -> None:
    """7.3.4 lays both regions over each other in that BAR; here the bind refuses."""
    comp = Composition.single("pci-epf-vntb", {"ntb_client": "none"})
    for item in items:
        comp.set(item)
    comp.assign_sockets(["/nonexistent/ep.sock"])
    with pytest.raises(EpcError, match=error):
        comp.build()


@pytest.mark.parametrize(("items", "error"), [
    (["mw1=4"], r"^0000:10:00\.0: ntb_transport: memory window 1 \(4 bytes\) holds no "
     r"frame for queue 0$"),
    (["ram_size=1M"], r"^0000:10:00\.0: NetdevClient probe: EP RAM exhausted: no 0x100000 "
     r"bytes aligned to 0x1000 \(-ENOMEM; a larger ram_size, or smaller windows\)$"),
    (["ntb_client=tool", "mw1=1G"], r"^0000:10:00\.0: ToolResponder probe: EP RAM exhausted"),
    (["netdev=tap:lo"], r"^0000:10:00\.0: NetdevClient probe: tap:lo: cannot attach \("),
])
def test_an_ep_client_that_cannot_probe_is_a_configuration_error(items: list[str],
                                                                error: str) -> None:
    """The EP's NTB client probes at bind: no EP RAM for its buffers, a window too small
    for a frame (where the kernel would divide by zero), an interface that is no TAP
    device: a ValueError naming it, as `vfio-ep serve` prints in one line."""
    comp = Composition.single("pci-epf-vntb", {})
    for item in items:
        comp.set(item)
    comp.assign_sockets(["/nonexistent/ep.sock"])
    with pytest.raises(ValueError, match=error):
        comp.build()


def test_sizes_struct_as_in_the_kernel() -> None:
    assert v.EpfNtbCtrl.sizeof() == 0x134 == v.CTRL_SIZE
    assert (CTRL["command_status"], CTRL["link_status"], CTRL["spad_offset"],
            CTRL["db_data"], CTRL["db_offset"]) == (0x08, 0x0A, 0x28, 0x34, 0xB4)


def _poll_interval(comp: Composition, tmp_path: Path) -> float:
    """The period the built controller scans a polled doorbell with, in seconds."""
    comp.assign_sockets([f"{name}={tmp_path / name}.sock" for name in comp.controllers])
    epc = comp.build()[0].epc
    assert epc is not None
    return epc.doorbell_poll_interval


def test_the_polled_doorbell_runs_at_the_kernels_5_ms_unless_set(tmp_path: Path) -> None:
    """epf_ntb_cmd_handler scans the doorbell BAR every 5 ms when it has no MSI doorbell:
    pci-epf-vntb's default in every form (a configfs script too); the controller attribute
    still sets it; pci-epf-test's poll doorbell keeps pci-epf-test's own 1 ms."""
    seeds = Path(__file__).parent / "data" / "seed-vntb-setup.sh"
    assert _poll_interval(cmdline.load(None, "pci-epf-vntb", ["doorbell=poll"]),
                          tmp_path) == 0.005
    assert _poll_interval(cmdline.load(None, None, [], seeds), tmp_path) == 0.005
    assert _poll_interval(cmdline.load(None, "pci-epf-vntb", [
        "doorbell=poll", "doorbell_poll_interval_us=1000"]), tmp_path) == 0.001
    assert _poll_interval(cmdline.load(None, "pci-epf-test", ["doorbell=poll"]),
                          tmp_path) == 0.001
    listed = dict(attribute_listing("pci-epf-vntb"))
    assert listed["controllers/NAME/doorbell_poll_interval_us"] == 5000
