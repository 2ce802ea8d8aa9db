"""The endpoint function drivers, by the names configfs gives their directories.

``functions/pci_epf_test/func1`` in configfs is ``type = "pci-epf-test"`` in a TOML
composition; both spellings name the same driver here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from vfio_ep.epf.core import PciEpf
from vfio_ep.epf.functions import pci_epf_ntb, pci_epf_test, pci_epf_vntb


@dataclass(frozen=True)
class EpfDriver:
    """struct pci_epf_driver, as the composition uses it.

    ``probe`` turns the attributes (an instance of the ``attributes`` dataclass) into a
    function not yet bound to a controller.  ``cfs_attributes`` are those configfs shows in
    the driver's ``<driver>.<N>/`` directory; ``store(values, key, linked)`` checks one
    configfs write there the way the driver's ``_store`` does beyond the value's own range
    (:func:`vfio_ep.config.store`): against the function's state and other attributes
    (ConfigError naming the kernel's errno).  ``interfaces`` is 2 for a function with a
    primary and a secondary controller.
    ``controller_defaults`` are controller attributes whose default the function decides (a
    period the kernel's driver has), unless the user set them.
    """

    name: str
    attributes: type
    probe: Callable[[Any], PciEpf]
    cfs_attributes: tuple[str, ...] = ()
    store: Callable[[dict[str, Any], str, bool], None] | None = None
    interfaces: int = 1
    defaults: dict[str, Any] = field(default_factory=dict)
    controller_defaults: dict[str, Any] = field(default_factory=dict)


DRIVERS: dict[str, EpfDriver] = {
    d.name: d for d in (
        EpfDriver("pci_epf_test", pci_epf_test.PciEpfTestAttributes, pci_epf_test.probe,
                  tuple(f"bar{i}_size" for i in range(6))),
        EpfDriver("pci_epf_vntb", pci_epf_vntb.PciEpfVntbAttributes, pci_epf_vntb.probe,
                  pci_epf_vntb.CFS_ATTRIBUTES, pci_epf_vntb.store,
                  defaults=pci_epf_vntb.DEFAULTS,
                  controller_defaults=pci_epf_vntb.CONTROLLER_DEFAULTS),
        EpfDriver("pci_epf_ntb", pci_epf_ntb.PciEpfNtbAttributes, pci_epf_ntb.probe,
                  pci_epf_ntb.CFS_ATTRIBUTES, pci_epf_ntb.store, interfaces=2,
                  defaults=pci_epf_ntb.DEFAULTS),
    )
}


def canonical(name: str) -> str:
    """``pci-epf-test`` and ``pci_epf_test`` are one driver (configfs uses underscores)."""
    return name.strip().replace("-", "_")
