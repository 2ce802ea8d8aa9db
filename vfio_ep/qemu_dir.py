"""Where the top-level ``qemu/`` folder is (package data ``vfio_ep.qemu`` once installed).

A leaf module, so that any layer may name a file there: the device model reads the EP guest
driver's register header (:mod:`vfio_ep.epc.cpu_port`), the guest tooling everything else
(:mod:`vfio_ep.guest.assets`).
"""

from __future__ import annotations

from pathlib import Path


def _qemu_dir() -> Path:
    """``vfio_ep/qemu`` when installed from a wheel, the checkout's ``qemu/`` otherwise.

    Not found through importlib: a checkout's ``qemu/`` must stay a namespace portion (no
    ``__init__.py``), or run from the checkout it would hide the ``qemu.qmp`` library, and
    setuptools' editable finder does not resolve a namespace package inside a regular one.
    """
    package = Path(__file__).resolve().parent
    for candidate in (package / "qemu", package.parent / "qemu"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vfio-ep's qemu/ folder is neither in {package} nor beside it")


QEMU = _qemu_dir()
EPC_DRIVER = QEMU / "kernel" / "epc"  # the EP guest's EPC driver (built against each kernel)
EPC_HEADER = EPC_DRIVER / "vfio-ep-epc.h"  # its register interface, read by vfio_ep.epc.cpu_port
