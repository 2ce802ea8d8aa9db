"""vfio-ep: a userspace PCIe endpoint served to QEMU over vfio-user.

Data path: socket -> vfio_user (transport) -> pci (config space, BARs, IRQs)
-> epc (endpoint controller) -> epf (endpoint functions).
"""

__version__ = "0.1.0"
