"""``pci_epc_features`` and the controller profiles that fill them.

A profile is what a real SoC's EPC driver hard-codes: which BARs exist and
how (programmable, fixed, reserved), which interrupts the controller can
raise, what its inbound iATU can do, and which platform blocks (eDMA, MSI
controller) sit beside it.  The BAR helpers mirror pci-epc-core.c.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from vfio_ep.pci.bar import NUM_BARS

NO_BAR = -1


class BarType(enum.IntEnum):
    """enum pci_epc_bar_type."""

    PROGRAMMABLE = 0
    FIXED = 1
    RESIZABLE = 2
    RESERVED = 3
    DISABLED = 4


@dataclass(frozen=True)
class BarDesc:
    """struct pci_epc_bar_desc."""

    type: BarType = BarType.PROGRAMMABLE
    fixed_size: int = 0
    only_64bit: bool = False


@dataclass(frozen=True)
class EpcFeatures:
    """struct pci_epc_features, plus what our emulated controller is built with."""

    dynamic_inbound_mapping: bool = True
    subrange_mapping: bool = True
    msi_capable: bool = True
    msix_capable: bool = True
    intx_capable: bool = True
    bar: tuple[BarDesc, ...] = field(default_factory=lambda: (BarDesc(),) * NUM_BARS)
    align: int = 0


@dataclass(frozen=True)
class ControllerProfile:
    """A controller model: features and the hardware around it."""

    name: str
    features: EpcFeatures
    num_ib_windows: int = 8  # inbound iATU regions
    num_ob_windows: int = 8  # outbound iATU regions
    region_align: int = 0x1000  # iATU granule: what align_addr rounds PCI addresses to
    edma: bool = True
    edma_channels: int = 2  # per direction
    msi_controller: bool = True
    msi_mutable: bool = False  # messages change on affinity changes (the doorbell core refuses)
    edma_bar: int = NO_BAR  # a reserved BAR exposing the eDMA registers (RK3588 BAR4)


def _bars(**changes: BarDesc) -> tuple[BarDesc, ...]:
    bars = [BarDesc()] * NUM_BARS
    for name, desc in changes.items():
        bars[int(name.removeprefix("bar"))] = desc
    return tuple(bars)


_RESIZABLE = BarDesc(BarType.RESIZABLE)
_DISABLED = BarDesc(BarType.DISABLED)

PROFILES: dict[str, ControllerProfile] = {
    # A DesignWare EP with everything: platform MSI (ITS-like) and an eDMA.
    "generic": ControllerProfile("generic", EpcFeatures()),
    # R-Car S4 (pcie-rcar-gen4.c): MSI only, no platform MSI controller for doorbells.
    "rcar-s4": ControllerProfile(
        "rcar-s4",
        EpcFeatures(msix_capable=False, intx_capable=False, align=1 << 12,
                    bar=_bars(bar0=_RESIZABLE, bar1=_DISABLED, bar2=_RESIZABLE, bar3=_DISABLED,
                              bar4=BarDesc(BarType.FIXED, fixed_size=256), bar5=_DISABLED)),
        msi_controller=False,
    ),
    # i.MX8Q (pci-imx6.c, imx8q_pcie_epc_features): BARs 1, 3 and 5 disabled, 64 KiB
    # inbound alignment; its MSI controller and eDMA as in the generic model.
    "imx8q": ControllerProfile(
        "imx8q",
        EpcFeatures(align=1 << 16, bar=_bars(bar1=_DISABLED, bar3=_DISABLED, bar5=_DISABLED)),
    ),
    # J721E (pci-j721e.c on pcie-cadence-ep.c, cdns_pcie_epc_features): MSI and MSI-X, no
    # INTx, every BAR programmable, 256-byte alignment, 16 outbound regions (its device
    # tree's cdns,max-outbound-regions), no eDMA.  Modelled on the DesignWare core with the
    # same features: what a function sees of a controller is its features and its ops.
    # pci-epf-ntb is TI's function for it and needs the nonzero align (its MSI-X doorbells).
    "j721e": ControllerProfile(
        "j721e",
        EpcFeatures(intx_capable=False, align=256),
        num_ob_windows=16,
        edma=False,
    ),
    # RK3588 (pcie-dw-rockchip.c): BAR4 is reserved and shows the eDMA registers; as on the
    # Rock 5B in the seeds, the EP finds no MSI domain, so doorbells use the eDMA.
    "rk3588": ControllerProfile(
        "rk3588",
        EpcFeatures(intx_capable=False, align=1 << 16,
                    bar=_bars(bar0=_RESIZABLE, bar1=_RESIZABLE, bar2=_RESIZABLE,
                              bar3=_RESIZABLE, bar4=BarDesc(BarType.RESERVED),
                              bar5=_RESIZABLE)),
        msi_controller=False,
        edma_bar=4,
    ),
}


def profile(name: str, reserved_bars: tuple[int, ...] = (), msi_mutable: bool = False,
            edma: bool = True) -> ControllerProfile:
    """A named profile; ``reserved_bars`` marks more BARs reserved (e.g. to move the
    register BAR of pci-epf-test to BAR2 as on AM654); ``edma`` False takes its eDMA
    away (and the eDMA's registers from its reserved BAR)."""
    try:
        base = PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown controller profile {name!r}; known: "
                         f"{', '.join(sorted(PROFILES))}") from None
    bars = list(base.features.bar)
    for bar in reserved_bars:
        if not 0 <= bar < NUM_BARS:
            raise ValueError(f"reserved BAR {bar} out of range")
        bars[bar] = BarDesc(BarType.RESERVED)
    return replace(base, features=replace(base.features, bar=tuple(bars)),
                   msi_mutable=msi_mutable, edma=base.edma and edma,
                   edma_bar=base.edma_bar if edma else NO_BAR)


def get_next_free_bar(features: EpcFeatures | None, bar: int) -> int:
    """pci_epc_get_next_free_bar(): skip the upper half of 64-bit-only BARs, reserved, disabled."""
    if features is None:
        return 0
    if bar > 0 and features.bar[bar - 1].only_64bit:
        bar += 1
    for i in range(bar, NUM_BARS):
        if features.bar[i].type not in (BarType.RESERVED, BarType.DISABLED):
            return i
    return NO_BAR


def get_first_free_bar(features: EpcFeatures | None) -> int:
    return get_next_free_bar(features, 0)
