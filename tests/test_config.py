"""Configuration: configfs names from TOML and --set, strictly checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from vfio_ep import config
from vfio_ep.serve import build_device


def test_toml_and_set_use_configfs_names(tmp_path: Path) -> None:
    f = tmp_path / "ep.toml"
    f.write_text('function = "pci-epf-test"\n[pci_epf_test]\nvendorid = 0x104c\n'
                 'deviceid = "0xb00c"\nbar5_size = "2M"\n')
    values = config.load(f, ["bar5-size=4M", "reserved_bars=0,1"])
    assert values["bar5_size"] == "4M"  # --set wins
    device = build_device(None, values)
    assert device.config.u32(0) == 0xB00C104C
    assert device.spec.bars[-1].size == 4 << 20
    assert {b.index for b in device.spec.bars} == {2, 3, 4, 5}


def test_unknown_attribute_lists_the_known_ones() -> None:
    with pytest.raises(config.ConfigError, match=r"no attribute vendor_id; known: .*vendorid"):
        build_device("pci-epf-test", {"vendor_id": 1})
    with pytest.raises(config.ConfigError, match="unknown function 'nope'"):
        build_device("nope", {})
    with pytest.raises(config.ConfigError, match="expected KEY=VALUE"):
        config.load(None, ["novalue"])
    with pytest.raises(config.ConfigError, match="not a number"):
        build_device("pci-epf-test", {"bar1_size": "big"})


def test_numbers_as_configfs_parses_them() -> None:
    assert [config.parse_int(v) for v in ("0x10", "16", "020", "1K", "1MiB", 7)] == \
        [16, 16, 16, 1024, 1 << 20, 7]
