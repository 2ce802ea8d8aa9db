"""PCI capability layouts (PM, MSI, MSI-X, PCI Express) and their write masks.

Each builder returns a :class:`CapabilityBlock`: the capability's bytes from
a construct layout and, byte for byte, which bits the host may write or clear.
The ``*_state`` readers decode what the host programmed, for the EPC's
get_msi/get_msix.
"""

from __future__ import annotations

from dataclasses import dataclass

from construct import Bytes, Int8ul, Int16ul, Int32ul, Struct

from vfio_ep.pci.config_space import CapabilityBlock, ConfigSpace

PCI_CAP_ID_PM = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11

PCI_MSI_FLAGS_ENABLE = 0x1
PCI_MSI_FLAGS_QMASK = 0x0E
PCI_MSI_FLAGS_QSIZE = 0x70
PCI_MSI_FLAGS_64BIT = 0x80
PCI_MSI_FLAGS_MASKBIT = 0x100
PCI_MSIX_FLAGS_QSIZE = 0x7FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_ENTRY_SIZE = 16

PmCap = Struct("id" / Int8ul, "next" / Int8ul, "pmc" / Int16ul, "pmcsr" / Int16ul,
               "bse" / Int8ul, "data" / Int8ul)
MsiCap = Struct("id" / Int8ul, "next" / Int8ul, "flags" / Int16ul, "address_lo" / Int32ul,
                "address_hi" / Int32ul, "data" / Int16ul, "reserved" / Int16ul,
                "mask" / Int32ul, "pending" / Int32ul)
MsixCap = Struct("id" / Int8ul, "next" / Int8ul, "flags" / Int16ul, "table" / Int32ul,
                 "pba" / Int32ul)
PcieCap = Struct(
    "id" / Int8ul, "next" / Int8ul, "flags" / Int16ul,
    "devcap" / Int32ul, "devctl" / Int16ul, "devsta" / Int16ul,
    "lnkcap" / Int32ul, "lnkctl" / Int16ul, "lnksta" / Int16ul,
    "slot" / Bytes(8), "root" / Bytes(8),
    "devcap2" / Int32ul, "devctl2" / Int16ul, "devsta2" / Int16ul,
    "lnkcap2" / Int32ul, "lnkctl2" / Int16ul, "lnksta2" / Int16ul,
    "slot2" / Bytes(8),
)

_ZERO8 = bytes(8)


def _block(layout: Struct, cap_id: int, values: dict[str, int], wmask: dict[str, int],
           w1c: dict[str, int] | None = None) -> CapabilityBlock:
    """Build the capability and its masks from three field dictionaries of one layout."""

    def fill(fields: dict[str, int]) -> bytes:
        full = {name: 0 for name in (s.name for s in layout.subcons)}
        full.update({k: _ZERO8 for k, v in full.items() if _is_bytes(layout, k)})
        full.update(fields)
        return bytes(layout.build(full))

    return CapabilityBlock(cap_id, fill({"id": cap_id, **values}), fill(wmask), fill(w1c or {}))


def _is_bytes(layout: Struct, name: str) -> bool:
    return any(s.name == name and isinstance(s.subcon, Bytes) for s in layout.subcons)


def pm_capability() -> CapabilityBlock:
    """PM 1.2: D0/D3hot with No_Soft_Reset, so a D3->D0 transition keeps state."""
    return _block(PmCap, PCI_CAP_ID_PM, {"pmc": 0x0003, "pmcsr": 0x0008},
                  wmask={"pmcsr": 0x0103}, w1c={"pmcsr": 0x8000})


def msi_capability(vectors: int) -> CapabilityBlock:
    """64-bit MSI with per-vector masking, advertising ``vectors`` (1..32, power of two)."""
    mmc = vectors.bit_length() - 1
    if vectors < 1 or vectors > 32 or vectors != 1 << mmc:
        raise ValueError(f"MSI vectors must be a power of two in 1..32, not {vectors}")
    flags = PCI_MSI_FLAGS_64BIT | PCI_MSI_FLAGS_MASKBIT | (mmc << 1)
    return _block(MsiCap, PCI_CAP_ID_MSI, {"flags": flags},
                  wmask={"flags": PCI_MSI_FLAGS_ENABLE | PCI_MSI_FLAGS_QSIZE,
                         "address_lo": 0xFFFFFFFC, "address_hi": 0xFFFFFFFF, "data": 0xFFFF,
                         "mask": (1 << vectors) - 1})


def msix_capability(vectors: int, table_bar: int, table_offset: int, pba_bar: int,
                    pba_offset: int) -> CapabilityBlock:
    if not 1 <= vectors <= 2048:
        raise ValueError(f"MSI-X vectors must be in 1..2048, not {vectors}")
    return _block(MsixCap, PCI_CAP_ID_MSIX,
                  {"flags": vectors - 1, "table": table_offset | table_bar,
                   "pba": pba_offset | pba_bar},
                  wmask={"flags": PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL})


def pcie_capability() -> CapabilityBlock:
    """PCIe v2 endpoint, Gen1 x1, MPS 256; DEVSTA error bits are RW1C."""
    return _block(
        PcieCap, PCI_CAP_ID_EXP,
        {"flags": 0x0002, "devcap": 0x00008001, "devctl": 0x2810, "lnkcap": 0x00000011,
         "lnksta": 0x0011, "lnkcap2": 0x2, "lnkctl2": 0x1},
        wmask={"devctl": 0x7CFF, "lnkctl": 0x0FC3, "devctl2": 0x001F, "lnkctl2": 0x000F},
        w1c={"devsta": 0x000F},
    )


@dataclass(frozen=True)
class MsiState:
    enabled: bool
    vectors: int  # the count the host enabled (Multiple Message Enable)
    address: int
    data: int
    mask: int


def msi_state(cfg: ConfigSpace, pos: int) -> MsiState:
    flags = cfg.u16(pos + 2)
    return MsiState(
        enabled=bool(flags & PCI_MSI_FLAGS_ENABLE),
        vectors=1 << ((flags & PCI_MSI_FLAGS_QSIZE) >> 4),
        address=cfg.u32(pos + 4) | cfg.u32(pos + 8) << 32,
        data=cfg.u16(pos + 12),
        mask=cfg.u32(pos + 16),
    )


@dataclass(frozen=True)
class MsixState:
    enabled: bool
    masked: bool
    vectors: int


def msix_state(cfg: ConfigSpace, pos: int) -> MsixState:
    flags = cfg.u16(pos + 2)
    return MsixState(bool(flags & PCI_MSIX_FLAGS_ENABLE), bool(flags & PCI_MSIX_FLAGS_MASKALL),
                     (flags & PCI_MSIX_FLAGS_QSIZE) + 1)
