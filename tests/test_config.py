"""Configuration: configfs names from TOML and --set, strictly checked; compositions."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfio_ep import config
from vfio_ep.cmdline import load
from vfio_ep.composition import Composition


def device_of(comp: Composition):  # type: ignore[no-untyped-def]
    comp.assign_sockets(["/nonexistent/ep.sock"])
    return comp.build()[0].device


def test_toml_and_set_use_configfs_names(tmp_path: Path) -> None:
    f = tmp_path / "ep.toml"
    f.write_text('function = "pci-epf-test"\n[pci_epf_test]\nvendorid = 0x104c\n'
                 'deviceid = "0xb00c"\nbar5_size = "2M"\n')
    comp = load(f, None, ["bar5-size=4M", "reserved_bars=0,1"])
    assert comp.functions["func1"].values["bar5_size"] == "4M"  # --set wins
    device = device_of(comp)
    assert device.config.u32(0) == 0xB00C104C
    assert device.spec.bars[-1].size == 4 << 20
    assert {b.index for b in device.spec.bars} == {2, 3, 4, 5}


def test_toml_arrays_for_list_attributes(tmp_path: Path) -> None:
    f = tmp_path / "ep.toml"
    f.write_text("reserved_bars = [0, 1]\n")
    assert {b.index for b in device_of(load(f, None, [])).spec.bars} == {2, 3, 4, 5}


def test_unknown_attribute_lists_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match=r"no attribute vendor_id; known: .*vendorid"):
        device_of(load(None, "pci-epf-test", ["vendor_id=1"]))
    with pytest.raises(config.ConfigError, match="unknown function 'nope'"):
        load(None, "nope", [])
    with pytest.raises(config.ConfigError, match="expected"):
        load(None, None, ["novalue"])
    with pytest.raises(config.ConfigError, match="not a number"):
        device_of(load(None, "pci-epf-test", ["bar1_size=big"]))
    f = tmp_path / "two.toml"
    f.write_text("[a]\nvendorid = 1\n[b]\ndeviceid = 2\n")
    with pytest.raises(config.ConfigError, match="at most one table"):
        load(f, None, [])


def test_numbers_as_configfs_parses_them() -> None:
    assert [config.parse_int(v) for v in ("0x10", "16", "020", "1K", "1MiB", 7)] == \
        [16, 16, 16, 1024, 1 << 20, 7]


def test_composition_tables_name_controllers_and_functions(tmp_path: Path) -> None:
    f = tmp_path / "comp.toml"
    f.write_text('[controllers.ep0]\nsocket = "/run/ep0.sock"\nprofile = "rk3588"\n'
                 '[functions.func1]\ntype = "pci-epf-vntb"\nprimary = "ep0"\n'
                 'db_bar = 4\nntb_client = "tool"\n')
    comp = load(f, None, ["func1.db_count=6", "ep0.ram_size=64M"])
    assert comp.controllers["ep0"].values == {"socket": "/run/ep0.sock", "profile": "rk3588",
                                              "ram_size": "64M"}
    func = comp.functions["func1"]
    assert (func.driver, func.primary, func.values["db_count"]) == ("pci_epf_vntb", "ep0", "6")
    assert func.values["vendorid"] == 0x1912  # vfio-ep's vNTB defaults: the seeds' R-Car
    ep = comp.build()[0]
    assert (ep.controller, ep.socket, ep.epc.ops.profile.name) == ("ep0", Path("/run/ep0.sock"),
                                                               "rk3588")
    assert ep.device.config.u32(0) == 0x00301912


@pytest.mark.parametrize(("toml", "error"), [
    ('[controllers.a]\n[functions.f]\nprimary = "a"\n', "needs type"),
    ('[controllers.a]\n[functions.f]\ntype = "pci-epf-test"\nprimary = "b"\n',
     "primary controller 'b' does not exist"),
    ('[controllers.a]\nsocket = "s"\n[controllers.b]\nsocket = "t"\n'
     '[functions.f]\ntype = "pci-epf-test"\nprimary = "a"\n', "controller b has no function"),
    ('[controllers.a]\n[functions.f]\ntype = "pci-epf-test"\nprimary = "a"\n', "no socket"),
    ('vendorid = 1\n[controllers.a]\n', "outside"),
    ('[controllers.a]\nsocket = "s"\n[functions.f]\ntype = "pci-epf-test"\nprimary = "a"\n'
     'secondary = "a"\n', "no secondary interface"),
])
def test_composition_errors_say_what_is_wrong(tmp_path: Path, toml: str, error: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(toml)
    with pytest.raises(config.ConfigError, match=error):
        load(f, None, []).build()


def test_socket_names_a_controller() -> None:
    comp = load(None, "pci-epf-test", [], sockets=["ep0=/tmp/a.sock"])
    assert comp.controllers["ep0"].values["socket"] == "/tmp/a.sock"
    with pytest.raises(config.ConfigError, match="no controller named 'x'"):
        load(None, "pci-epf-test", [], sockets=["x=/tmp/a.sock"])


def test_presets_set_ids_profile_and_bars_and_user_sets_win() -> None:
    """--preset: a board's look in one word; --set items after it override it."""
    comp = load(None, None, ["deviceid=0xb00d"], preset="am654")
    values = comp.function_attributes("func1")
    assert (values.vendorid, values.deviceid) == (0x104C, 0xB00D)
    assert comp.controllers["ep0"].values["reserved_bars"] == "0,1"
    vntb = load(None, "pci-epf-vntb", [], preset="imx8")
    assert vntb.controllers["ep0"].values["profile"] == "imx8q"
    attrs = vntb.function_attributes("func1")
    assert (attrs.deviceid, attrs.db_bar) == (0x0809, 2)
    with pytest.raises(config.ConfigError, match="rk3588 is for pci-epf-test, not pci-epf-vntb"):
        load(None, "pci-epf-vntb", [], preset="rk3588")
    with pytest.raises(config.ConfigError, match="unknown preset 'x'"):
        load(None, None, [], preset="x")


def test_errors_found_at_bind_name_the_file_the_owner_and_the_key(tmp_path: Path) -> None:
    toml = tmp_path / "ep.toml"
    toml.write_text('[controllers.ep0]\nsocket = "x.sock"\n[functions.f]\n'
                    'type = "pci-epf-test"\nprimary = "ep0"\nbar1_size = "abc"\n')
    with pytest.raises(config.ConfigError,
                       match=rf"^{toml}: functions/pci_epf_test/f: bar1_size: not a number"):
        load(toml, None, []).build()
