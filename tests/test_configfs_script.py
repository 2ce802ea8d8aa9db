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
