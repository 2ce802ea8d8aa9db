"""Configuration: configfs names from TOML and --set, strictly checked; compositions."""

from __future__ import annotations

import os
import shlex
import typing
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vfio_ep import config
from vfio_ep.cmdline import load
from vfio_ep.composition import Composition, attribute_listing, known_types
from vfio_ep.config import ConfigError
from vfio_ep.configfs_script import parse_script
from vfio_ep.epc.core import EpcError, PciEpcAttributes
from vfio_ep.epc.features import PROFILES
from vfio_ep.epf.functions import DRIVERS
from vfio_ep.pci import testdev


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
    """kstrtou*(s, 0): 0x hex, 0 octal, decimal, a sign; K/M/G sizes besides; nothing of
    Python's own (0b, 0o, underscores, other scripts' digits)."""
    assert [config.parse_int(v) for v in ("0x10", "16", "020", "1K", "1MiB", 7, "0xb",
                                          "+5", "-1", "0", " 12\n")] == \
        [16, 16, 16, 1024, 1 << 20, 7, 11, 5, -1, 0, 12]
    for bad in ("0b1", "0o7", "1_000", "\u0663", "08", "0x", "", "1.5", "1T"):
        with pytest.raises(ConfigError, match="not a number"):
            config.parse_int(bad)


@pytest.mark.parametrize(("item", "message"), [
    ("vendorid=0x12345", "functions/pci_epf_test/func1/vendorid: 0x12345 is out of range "
     "0..0xffff (-ERANGE)"),
    ("deviceid=-1", "functions/pci_epf_test/func1/deviceid: -1 is out of range 0..0xffff "
     "(-EINVAL)"),
    ("revid=256", "functions/pci_epf_test/func1/revid: 256 is out of range 0..0xff (-ERANGE)"),
    ("subsys_id=lots", "functions/pci_epf_test/func1/subsys_id: 'lots' is not a number "
     "(0..0xffff) (-EINVAL)"),
    ("msi_interrupts=64", "functions/pci_epf_test/func1/msi_interrupts: 64 is out of range "
     "1..32 (-EINVAL: what pci_epc_set_msi() takes)"),
    ("msix_interrupts=4096", "functions/pci_epf_test/func1/msix_interrupts: 4096 is out of "
     "range 1..2048 (-EINVAL: what pci_epc_set_msix() takes)"),
    ("ram_size=2G", "controllers/ep0/ram_size: 2G is out of range 4K..1792M (-EINVAL: EP RAM "
     "ends where the SoC's MMIO begins)"),
])
def test_a_value_the_store_refuses_names_attribute_value_range_and_errno(
        item: str, message: str) -> None:
    """As ``echo VALUE > ATTR`` fails: kstrtou16 and friends (-EINVAL for no number or a
    sign, -ERANGE beyond the type), then the kernel's own limit; one line."""
    with pytest.raises(config.StoreError) as refused:
        device_of(load(None, "pci-epf-test", [item]))
    assert str(refused.value) == message


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
                       match=rf"^{toml}: functions/pci_epf_test/f/bar1_size: 'abc' is not a "
                       r"number \(0\.\.0xffffffff\) \(-EINVAL\)$"):
        load(toml, None, []).build()


# -- every attribute, written as configfs would take it ------------------------------------

ATTRIBUTES = [(fn, path) for fn in known_types() for path, _ in attribute_listing(fn)]
# Values that mean something to some attribute, so the random ones reach the binds too.
WORDS = ["", "none", "auto", "msi", "embedded", "poll", "netdev", "pingpong", "tool",
         "builtin", "y", "n", "on", "0,1", "2,3,4", "10.0.0.1/24", *PROFILES]
TOML_VALUES = st.one_of(st.integers(), st.floats(), st.booleans(),
                        st.lists(st.one_of(st.integers(), st.text()), max_size=3))
NUMBERS = st.builds(str.format, st.sampled_from(["{}", "{:#x}", "0{:o}", "{}K", "{}M", "+{}"]),
                    st.one_of(st.integers(-(1 << 70), 1 << 70), st.integers(-2, 4100)))


def _write(fn: str, path: str, value: object) -> Composition:
    """``value`` written to attribute ``path`` (as `vfio-ep attributes` names it): a TOML
    value as a flat file has it, a string with ``echo`` in a configfs script where configfs
    has the attribute, else with --set."""
    parts = path.split("/")
    driver = fn.replace("-", "_")
    if not isinstance(value, str):
        return Composition.single(fn, {parts[-1]: value})
    if parts[0] == "functions" and driver in DRIVERS:
        where = "/".join(["functions", driver, "func1", *parts[3:]])
        comp = parse_script(f"mkdir functions/{driver}/func1\n"
                            f"echo {shlex.quote(value)} > {where}\n"
                            f"ln -s controllers/c0 functions/{driver}/func1/primary/\n"
                            + (f"ln -s controllers/c1 functions/{driver}/func1/secondary/\n"
                               if DRIVERS[driver].interfaces == 2 else "")
                            + "echo 1 > controllers/c0/start\n", "t.sh")
    else:
        comp = Composition.single(fn, {})
        comp.set(f"{parts[-1]}={value}")
    return comp


@settings(max_examples=int(os.environ.get("VFIO_EP_ATTRIBUTE_EXAMPLES", "1000")),
          deadline=None)
@given(attribute=st.sampled_from(ATTRIBUTES),
       value=st.one_of(st.text(), NUMBERS, st.sampled_from(WORDS), TOML_VALUES))
def test_any_string_written_to_any_attribute_is_taken_or_refused_in_one_line(
        attribute: tuple[str, str], value: object) -> None:
    """What `vfio-ep serve` reports in one line (vfio_ep.serve): a configuration error,
    or an errno from the bind; nothing else escapes, whatever the string (or TOML value).
    (tap:NAME makes a host interface: tests/test_pci_epf_vntb.py tries one that cannot.)"""
    assume(not str(value).strip().startswith("tap:"))
    _build_or_refuse(*attribute, value)


def _build_or_refuse(fn: str, path: str, value: object) -> None:
    try:
        comp = _write(fn, path, value)
        for ctrl in comp.controllers.values():
            ctrl.values.setdefault("socket", "/nonexistent/ep.sock")
        comp.build()
    except (ConfigError, ValueError, EpcError) as e:
        assert str(e) and "\n" not in str(e), repr(e)


def _declared_ends(fn: str, path: str) -> list[int]:
    """Both ends of every range attribute ``path`` declares (its type's and narrower)."""
    cls = (PciEpcAttributes if path.startswith("controllers/") else testdev.TestdevAttributes
           if fn == "testdev" else DRIVERS[fn.replace("-", "_")].attributes)
    kind = typing.get_type_hints(cls, include_extras=True).get(path.rsplit("/", 1)[1])
    ranges = [m for m in getattr(kind, "__metadata__", ()) if isinstance(m, config.Range)]
    return sorted({end for r in ranges for end in (r.lo, r.hi)})


@pytest.mark.parametrize(("fn", "path"), [a for a in ATTRIBUTES if _declared_ends(*a)])
def test_the_ends_of_each_declared_range_bind_or_are_refused_in_one_line(
        fn: str, path: str) -> None:
    """The values a declaration lets through, at their extremes, reach the bind without a
    crash (an OverflowError at write_header was how vendorid=0x12345 ended)."""
    for end in _declared_ends(fn, path):
        _build_or_refuse(fn, path, str(end))
