"""pci-epf-ntb: one function, two controllers, two hosts; each host driven over our client
the way ntb_hw_epf drives the J721E map (the real drivers run in the guest-pair tests).

Host A uses MSI doorbells and host B MSI-X, so both interrupt paths are covered; every test
runs on the C and the Python path.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from ntb_hw_epf_rc import NtbHwEpfRc
from vfio_user_client import Client, ServerThread

from vfio_ep.composition import Composition
from vfio_ep.config import ConfigError
from vfio_ep.epf.functions import ntb_ctrl as c
from vfio_ep.epf.functions.pci_epf_ntb import MSIX_ENABLE
from vfio_ep.pci.capabilities import PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX
from vfio_ep.vfio_user import protocol as p

CONFIG_BAR, PEER_SPAD_BAR, DB_MW1_BAR = 0, 1, 2  # ntb_hw_epf's j721e_map
GUEST = 0x100000
GUEST_SIZE = 4 << 20
VECTORS = 16
PAIR = """
[controllers.a]
[controllers.b]
[functions.ntb]
type = "pci-epf-ntb"
primary = "a"
secondary = "b"
"""


class Host(NtbHwEpfRc):
    """One RC of the pair on the J721E map: config BAR 0, peer scratchpads BAR 1."""

    def __init__(self, client: Client, msix: bool) -> None:
        super().__init__(client, CONFIG_BAR, GUEST, GUEST_SIZE, VECTORS, msix)

    def configure_doorbell(self) -> int:
        return self.command(c.COMMAND_CONFIGURE_DOORBELL,
                            VECTORS | (MSIX_ENABLE if self.msix else 0))

    def spad(self, i: int) -> int:
        return int.from_bytes(self.c.read(CONFIG_BAR, self.r("spad_offset") + 4 * i, 4),
                              "little")

    def write_peer_spad(self, i: int, value: int) -> None:
        self.c.write(PEER_SPAD_BAR, 4 * i, value.to_bytes(4, "little"))

    def peer_db_set(self, bit: int) -> None:
        slot = bit + 2
        addr = self.r("db_entry_size") * slot + self.r("db_offset", slot)
        self.c.write(DB_MW1_BAR, addr, self.r("db_data", slot).to_bytes(4, "little"))



@contextmanager
def pair(tmp_path: Path, toml: str = PAIR) -> Iterator[tuple[Host, Host, ServerThread]]:
    comp = Composition.from_toml(tomllib.loads(toml), "pair")
    comp.assign_sockets([f"a={tmp_path / 'a.sock'}", f"b={tmp_path / 'b.sock'}"])
    a, b = comp.build()
    assert a.epc is not None and b.epc is not None and a.epc.soc is b.epc.soc
    with ServerThread(a.device, a.socket, ((b.device, b.socket),)) as srv:
        ca, cb = Client(a.socket), Client(b.socket)
        yield Host(ca, msix=False), Host(cb, msix=True), srv
        ca.close()
        cb.close()


def link_up(a: Host, b: Host) -> None:
    assert a.configure_doorbell() == b.configure_doorbell() == c.COMMAND_STATUS_OK
    assert a.command(c.COMMAND_LINK_UP) == c.COMMAND_STATUS_OK
    assert a.r("link_status", size=2) == 0  # the first host waits for the other
    assert b.command(c.COMMAND_LINK_UP) == c.COMMAND_STATUS_OK
    assert a.r("link_status", size=2) == b.r("link_status", size=2) == c.LINK_STATUS_UP
    assert a.wait_irq(0) and b.wait_irq(0)  # slot 0: the link event, on both hosts


def test_each_host_sees_the_j721e_layout(tmp_path: Path, path: str) -> None:
    with pair(tmp_path) as (a, b, _):
        for h in (a, b):
            cfg = h.c.read(p.Region.CONFIG, 0, 256)
            assert cfg[0:4] == bytes.fromhex("4c100db0") and cfg[0x0B] == 0x05
            assert {PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX} <= set(h.c.capabilities())
            sizes = {i: h.c.region_info(i)[0]["size"] for i in range(3)}
            assert sizes == {0: 0x800, 1: 0x100, 2: 0x200000}
            assert (h.r("spad_offset"), h.r("spad_count"), h.r("num_mws"),
                    h.r("db_entry_size"), h.r("mw1_offset")) == (0x400, 64, 1, 4, 0x100000)


def test_link_scratchpads_and_doorbells_both_ways(tmp_path: Path, path: str) -> None:
    with pair(tmp_path) as (a, b, _):
        link_up(a, b)
        for i in range(8):
            a.write_peer_spad(i, 0xA0000000 + i)
            b.write_peer_spad(i, 0xB0000000 + i)
        assert [b.spad(i) for i in range(8)] == [0xA0000000 + i for i in range(8)]
        assert [a.spad(i) for i in range(8)] == [0xB0000000 + i for i in range(8)]
        for bit in range(VECTORS - 2):
            a.peer_db_set(bit)
            assert b.wait_irq(bit + 2), f"B got no MSI-X on slot {bit + 2}"
            b.peer_db_set(bit)
            assert a.wait_irq(bit + 2), f"A got no MSI on slot {bit + 2}"
        assert not any(h.wait_irq(v, 0) for h in (a, b) for v in range(VECTORS))


def test_memory_windows_land_in_the_other_hosts_buffer(tmp_path: Path, path: str) -> None:
    with pair(tmp_path) as (a, b, _):
        link_up(a, b)
        for h, offset in ((a, 0x10000), (b, 0x20000)):  # each host's receive buffer
            h.w("addr", GUEST + offset)
            h.w("size", 0x10000)
            assert h.command(c.COMMAND_CONFIGURE_MW, 0) == c.COMMAND_STATUS_OK
        data_a, data_b = os.urandom(0x1000), os.urandom(0x1000)
        a.c.write(DB_MW1_BAR, a.r("mw1_offset"), data_a)
        b.c.write(DB_MW1_BAR, b.r("mw1_offset") + 0x800, data_b)
        assert b.mem[0x20000:0x21000] == data_a
        assert a.mem[0x10800:0x11800] == data_b
        assert b.c.read(DB_MW1_BAR, b.r("mw1_offset"), 16) == a.mem[0x10000:0x10010]
        assert a.command(c.COMMAND_TEARDOWN_MW, 0) == c.COMMAND_STATUS_OK


def test_bad_commands_get_error_or_no_status(tmp_path: Path, path: str,
                                             caplog: pytest.LogCaptureFixture) -> None:
    with pair(tmp_path) as (a, _, _):
        assert a.command(c.COMMAND_CONFIGURE_DOORBELL, 0) == c.COMMAND_STATUS_ERROR
        assert a.command(c.COMMAND_CONFIGURE_DOORBELL, 33) == c.COMMAND_STATUS_ERROR
        assert a.command(c.COMMAND_CONFIGURE_MW, 4) == c.COMMAND_STATUS_ERROR
        a.w("size", 2 << 20)
        assert a.command(c.COMMAND_CONFIGURE_MW, 0) == c.COMMAND_STATUS_ERROR
        assert a.command(77, timeout=0.2) == 0
        assert "UNKNOWN command: 77" in caplog.text


def test_a_host_that_goes_away_takes_the_link_down_for_the_other(tmp_path: Path,
                                                                 path: str) -> None:
    with pair(tmp_path) as (a, b, srv):
        link_up(a, b)
        a.c.close()
        assert b.wait_irq(0), "B heard no link event"
        assert b.r("link_status", size=2) == 0
        # A comes back: B never said LINK_DOWN, so A's LINK_UP brings the pair up again.
        a2 = Host(Client(srv.path), msix=False)
        assert a2.configure_doorbell() == c.COMMAND_STATUS_OK
        assert a2.command(c.COMMAND_LINK_UP) == c.COMMAND_STATUS_OK
        assert a2.wait_irq(0) and b.wait_irq(0)
        assert a2.r("link_status", size=2) == b.r("link_status", size=2) == c.LINK_STATUS_UP
        a2.c.close()


def test_configuration_checks() -> None:
    with pytest.raises(ConfigError, match=r"db_count: 0 is out of range 1\.\.32 "):
        Composition.from_toml(tomllib.loads(PAIR + "db_count = 0\n"),
                              "t").function_attributes("ntb")
    with pytest.raises(ConfigError, match="needs a secondary"):
        Composition.from_toml(tomllib.loads(PAIR.replace('secondary = "b"\n', "")),
                              "t").build()


def test_memory_windows_are_served_from_the_peers_memory_not_trapped(tmp_path: Path) -> None:
    """Once a host's CONFIGURE_MW maps the other host's window onto its buffer, that window
    is a RAM row pointing into the buffer: the C fast path copies into it directly."""
    with pair(tmp_path) as (a, b, srv):
        link_up(a, b)
        b.w("addr", GUEST + 0x40000)
        b.w("size", 0x10000)
        assert b.command(c.COMMAND_CONFIGURE_MW, 0) == c.COMMAND_STATUS_OK
        srv.wait_idle()
        mw1 = a.r("mw1_offset")
        rows = [w for w in srv.device.windows.of_bar(DB_MW1_BAR) if w.start <= mw1 < w.end]
        assert rows and rows[0].kind.name == "RAM" and rows[0].end - rows[0].start == 0x10000
        a.c.write(DB_MW1_BAR, mw1 + 8, b"straight in")
        assert b.mem[0x40008:0x40013] == b"straight in"
        assert b.command(c.COMMAND_TEARDOWN_MW, 0) == c.COMMAND_STATUS_OK
        srv.wait_idle()
        rows = [w for w in srv.device.windows.of_bar(DB_MW1_BAR) if w.start <= mw1 < w.end]
        assert rows[0].kind.name == "MMIO"  # unmapped again: trapped, and writes go nowhere
