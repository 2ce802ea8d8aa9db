"""configfs scripts as kernel developers write them, accepted as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfio_ep.cmdline import load
from vfio_ep.config import ConfigError
from vfio_ep.configfs_script import parse_script

# The "Setup" block of the seeds' vNTB ping-latency thread, byte for byte (footnote included).
SEED = Path(__file__).parent / "data" / "seed-vntb-setup.sh"


def test_the_seeds_vntb_setup_is_accepted_unmodified() -> None:
    comp = parse_script(SEED.read_text(), SEED.name)
    assert list(comp.controllers) == ["e65d0000.pcie-ep"]
    assert comp.controllers["e65d0000.pcie-ep"].started
    func = comp.functions["func1"]
    assert (func.driver, func.primary) == ("pci_epf_vntb", "e65d0000.pcie-ep")
    assert func.values == {
        "vendorid": "0x1912", "deviceid": "0x0030", "msi_interrupts": "32", "db_count": "4",
        "spad_count": "128", "num_mws": "1", "mw1": "0x100000", "vntb_vid": "0x1912",
        "vntb_pid": "0x0030", "vbus_number": "0x10", "ctrl_bar": "0", "db_bar": "4",
        "mw1_bar": "2"}
    comp.assign_sockets(["e65d0000.pcie-ep=/tmp/ep.sock"])
    ep = comp.build()[0]
    bars = {b.index: b.size for b in ep.device.spec.bars}
    assert ep.device.config.u32(0) == 0x00301912
    assert bars[2] == 0x100000 and set(bars) == {0, 2, 4}  # ctrl 0, MW1 2, doorbells 4


def test_pci_epf_test_with_the_older_link_direction() -> None:
    script = """
cd /sys/kernel/config/pci_ep
mkdir functions/pci_epf_test/func1
echo 0x104c > functions/pci_epf_test/func1/vendorid
echo 2M > functions/pci_epf_test/func1/pci_epf_test.0/bar5_size
ln -s functions/pci_epf_test/func1 controllers/51000000.pcie_ep/
echo 1 > controllers/51000000.pcie_ep/start
"""
    comp = parse_script(script, "epf-test.sh")
    assert comp.functions["func1"].primary == "51000000.pcie_ep"
    comp.assign_sockets(["/tmp/x.sock"])
    assert comp.build()[0].device.spec.bars[-1].size == 2 << 20


@pytest.mark.parametrize(("line", "error"), [
    ("echo 1 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/nope", "no attribute nope"),
    ("echo 1 > functions/pci_epf_vntb/func1/db_count", "has no attribute db_count"),
    ("echo 2 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/db_count", "-EINVAL"),
    ("echo 0x100000 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/mw2", "-ERANGE"),
    ("echo 9 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/ctrl_bar", "-EINVAL"),
    ("mkdir functions/pci_epf_nope/f", "no such function driver"),
    ("modprobe pci_epf_vntb", "not a configfs step"),
    ("echo 1 > /etc/passwd", "outside /sys/kernel/config/pci_ep"),
    ("echo 1 > functions/pci_epf_vntb/func2/vendorid", "does not exist"),
])
def test_errors_name_the_line(line: str, error: str) -> None:
    script = ("cd /sys/kernel/config/pci_ep/\nmkdir functions/pci_epf_vntb/func1\n"
              f"echo 1 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/num_mws\n{line}\n")
    with pytest.raises(ConfigError, match=rf"s\.sh:4: .*{error}"):
        parse_script(script, "s.sh")


@pytest.mark.parametrize(("write", "refusal"), [
    ("echo 0x12345 > functions/pci_epf_test/func1/vendorid",
     "functions/pci_epf_test/func1/vendorid: 0x12345 is out of range 0..0xffff (-ERANGE)"),
    ("echo -1 > functions/pci_epf_test/func1/deviceid",
     "functions/pci_epf_test/func1/deviceid: -1 is out of range 0..0xffff (-EINVAL)"),
    ("echo 256 > functions/pci_epf_test/func1/revid",
     "functions/pci_epf_test/func1/revid: 256 is out of range 0..0xff (-ERANGE)"),
    ("echo 64 > functions/pci_epf_test/func1/msi_interrupts",
     "functions/pci_epf_test/func1/msi_interrupts: 64 is out of range 1..32 (-EINVAL: what "
     "pci_epc_set_msi() takes)"),
    ("echo 5G > functions/pci_epf_test/func1/pci_epf_test.0/bar1_size",
     "functions/pci_epf_test/func1/bar1_size: 5G is out of range 0..0xffffffff (-ERANGE)"),
])
def test_a_write_the_store_refuses_fails_at_its_line(write: str, refusal: str) -> None:
    """Header values are checked at the echo, as configfs refuses the write, not at bind."""
    script = f"mkdir functions/pci_epf_test/func1\n{write}\n"
    with pytest.raises(ConfigError) as refused:
        parse_script(script, "s.sh")
    assert str(refused.value) == f"s.sh:2: {write}: {refusal}"


def test_a_negative_bar_number_is_a_value_not_an_echo_option() -> None:
    """``echo -1 > .../ctrl_bar`` (the first free BAR) writes -1; only -n/-e are options."""
    comp = parse_script("mkdir functions/pci_epf_vntb/func1\n"
                        "echo -1 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/ctrl_bar\n", "s.sh")
    assert comp.functions["func1"].values["ctrl_bar"] == "-1"


def test_stores_after_linking_are_refused_like_7_3_4() -> None:
    script = SEED.read_text() + "echo 8 > functions/pci_epf_vntb/func1/pci_epf_vntb.0/db_count\n"
    with pytest.raises(ConfigError, match="-EOPNOTSUPP"):
        parse_script(script, "late.sh")


def test_a_script_through_the_command_line(tmp_path: Path) -> None:
    """--configfs with --socket NAME=PATH and --set for what configfs has no file for."""
    comp = load(None, None, ["ntb_client=pingpong"], configfs=SEED,
                sockets=[f"e65d0000.pcie-ep={tmp_path / 'ep.sock'}"])
    assert comp.functions["func1"].values["ntb_client"] == "pingpong"
    with pytest.raises(ConfigError, match="--function is for the one-function form"):
        load(None, "pci-epf-test", [], configfs=SEED)


HOWTO = Path(__file__).parent / "data" / "howto-ntb-setup.sh"


def test_the_ntb_howto_binds_one_function_to_two_controllers(tmp_path: Path) -> None:
    """pci-ntb-howto.rst's commands: one pci-epf-ntb, a vfio-user socket per interface."""
    comp = parse_script(HOWTO.read_text(), HOWTO.name)
    func = comp.functions["func1"]
    assert (func.driver, func.primary, func.secondary) == (
        "pci_epf_ntb", "2900000.pcie-ep", "2910000.pcie-ep")
    comp.assign_sockets([f"{c}={tmp_path / c}.sock" for c in comp.controllers])
    primary, secondary = sorted(comp.build(), key=lambda ep: ep.socket)
    for ep in (primary, secondary):
        assert ep.device.config.u32(0) == 0xb00d104c
    assert primary.epc.soc is secondary.epc.soc  # one SoC bridges both hosts


def test_the_howtos_hyphenated_link_gets_a_hint() -> None:
    """The howto's own ln lines say functions/pci-epf-ntb/; the error says what configfs
    calls it."""
    text = HOWTO.read_text().replace("functions/pci_epf_ntb/func1/primary",
                                     "functions/pci-epf-ntb/func1/primary")
    with pytest.raises(ConfigError, match="configfs names it functions/pci_epf_ntb"):
        parse_script(text, HOWTO.name)
