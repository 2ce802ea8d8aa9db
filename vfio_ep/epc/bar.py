"""``struct pci_epf_bar``: a BAR as a function hands it to the controller.

Declared here, beside the controller that programs it, so that the EPC needs nothing from
the function layer above it (the kernel declares it in pci-epf.h for the same callers).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class PciEpfBarSubmap:
    """One piece of a BAR's address-match (subrange) translation."""

    phys_addr: int
    size: int


@dataclass
class PciEpfBar:
    """struct pci_epf_bar: ``phys_addr`` is the EP address backing the BAR."""

    barno: int
    phys_addr: int = 0
    size: int = 0
    mem_size: int = 0
    flags: int = 0
    submap: list[PciEpfBarSubmap] = field(default_factory=list)
    # Emulator hint: EP addresses of the doorbell registers the function may point this BAR
    # at; the controller keeps the pages they would land on trapped (see vfio_ep.epc.dw).
    doorbell_addrs: frozenset[int] = frozenset()

    def copy(self) -> PciEpfBar:
        return replace(self, submap=list(self.submap))
