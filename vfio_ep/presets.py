"""Platform presets: what a board's endpoint looks like to the host's drivers, in one word.

A preset is the ``--set`` items that make a function look like the board's: the IDs the
host driver's table matches (pci_endpoint_test's driver data: AM654's register BAR, RK3588's
alignment; ntb_hw_epf's BAR map), the controller profile with that SoC's epc_features, and
its reserved BARs.  The user's own ``--set`` items come after, so they win.
"""

from __future__ import annotations

from vfio_ep.config import ConfigError

# preset -> function driver -> --set items (IDs from Linux 7.3.4's pci_endpoint_test.c and
# ntb_hw_epf.c; BARs and alignment from the controller drivers, see vfio_ep.epc.features)
PRESETS: dict[str, dict[str, tuple[str, ...]]] = {
    # TI AM654 (pci-keystone): the test registers in BAR2, BARs 0 and 1 reserved
    "am654": {"pci_epf_test": ("vendorid=0x104c", "deviceid=0xb00c", "reserved_bars=0,1")},
    "rk3588": {"pci_epf_test": ("controller=rk3588", "vendorid=0x1d87", "deviceid=0x3588")},
    # R-Car S4 (R8A779F0); its vNTB IDs are pci-epf-vntb's defaults, the seeds' board
    "rcar-s4": {"pci_epf_test": ("controller=rcar-s4", "vendorid=0x1912", "deviceid=0x0031"),
                "pci_epf_vntb": ("controller=rcar-s4", "vendorid=0x1912", "deviceid=0x0030")},
    # i.MX8 (pci-imx6's i.MX8Q features); ntb_hw_epf's mx8_map: config, doorbell, MW1 in
    # BARs 0, 2, 4
    "imx8": {"pci_epf_test": ("controller=imx8q", "vendorid=0x1957", "deviceid=0x0808"),
             "pci_epf_vntb": ("controller=imx8q", "vendorid=0x1957", "deviceid=0x0809",
                              "ctrl_bar=0", "db_bar=2", "mw1_bar=4")},
}


def preset_sets(preset: str, driver: str) -> tuple[str, ...]:
    """The ``--set`` items of ``preset`` for a function of ``driver`` (``pci_epf_test``).

    ConfigError for an unknown preset, or one that has nothing for this function."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    sets = PRESETS[preset].get(driver)
    if sets is None:
        covered = ", ".join(d.replace("_", "-") for d in PRESETS[preset])
        raise ConfigError(f"preset {preset} is for {covered}, not {driver.replace('_', '-')}")
    return sets
