"""The files of the top-level ``qemu/`` folder (package data ``vfio_ep.qemu``), by role.

The guest side that is not Python lives there, as the design lays out: the kernel config
fragments per kernel line, the guest's suite scripts, guest C programs, and the Containerfile
(the image is built from a checkout: vfio_ep.guest.container).
"""

from __future__ import annotations

from pathlib import Path


def _qemu_dir() -> Path:
    """``vfio_ep/qemu`` when installed from a wheel, the checkout's ``qemu/`` otherwise.

    Not found through importlib: a checkout's ``qemu/`` must stay a namespace portion (no
    ``__init__.py``), or run from the checkout it would hide the ``qemu.qmp`` library, and
    setuptools' editable finder does not resolve a namespace package inside a regular one.
    """
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "qemu", package.parent / "qemu"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vfio-ep's qemu/ folder is neither in {package} nor beside it")


QEMU = _qemu_dir()

KERNEL_FRAGMENTS = QEMU / "kernel"  # kernel.config, plus kernel-<line>.config where one differs
EPC_DRIVER = QEMU / "kernel" / "epc"  # the EP guest's EPC driver (built against each kernel)
EPC_HEADER = EPC_DRIVER / "vfio-ep-epc.h"  # its register interface, read by vfio_ep.epc.cpu_port
GUEST_SCRIPTS = QEMU / "guest"
TAP_LIB = GUEST_SCRIPTS / "tap_lib.sh"  # sourced by the guest suites
PCITEST_TAP = GUEST_SCRIPTS / "pcitest_tap.sh"  # pcitest.sh's cases, as TAP
KSELFTEST = GUEST_SCRIPTS / "kselftest.sh"  # the kselftest, once its driver has the device
NTB_SUITE = GUEST_SCRIPTS / "ntb_suite.sh"
NTB_PAIR = GUEST_SCRIPTS / "ntb_pair.sh"
EP_GUEST = GUEST_SCRIPTS / "ep_guest.sh"  # the EP guest: EPC driver, functions, setup script
INSMOD = GUEST_SCRIPTS / "insmod.sh"  # the guest's insmod: busybox's + the cmdline's dyndbg
GUEST_PROGRAMS = QEMU / "bench"  # static C programs the benchmarks run in the guest
