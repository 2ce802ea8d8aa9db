"""The files of the top-level ``qemu/`` folder (package data ``vfio_ep.qemu``), by role.

The guest side that is not Python lives there, as the design lays out: the kernel config
fragments per kernel line, the guest's suite scripts, guest C programs, and the Containerfile
(the image is built from a checkout: vfio_ep.guest.container).
"""

from __future__ import annotations

from vfio_ep.qemu_dir import QEMU

KERNEL_FRAGMENTS = QEMU / "kernel"  # kernel.config, plus kernel-<line>.config where one differs
GUEST_SCRIPTS = QEMU / "guest"
TAP_LIB = GUEST_SCRIPTS / "tap_lib.sh"  # sourced by the guest suites
PCITEST_TAP = GUEST_SCRIPTS / "pcitest_tap.sh"  # pcitest.sh's cases, as TAP
KSELFTEST = GUEST_SCRIPTS / "kselftest.sh"  # the kselftest, once its driver has the device
NTB_SUITE = GUEST_SCRIPTS / "ntb_suite.sh"
NTB_PAIR = GUEST_SCRIPTS / "ntb_pair.sh"
NVME_SUITE = GUEST_SCRIPTS / "nvme_suite.sh"  # the RC's side of an EP guest's nvmet-pci-epf
EP_GUEST = GUEST_SCRIPTS / "ep_guest.sh"  # the EP guest: EPC driver, functions, setup script
INSMOD = GUEST_SCRIPTS / "insmod.sh"  # the guest's insmod: busybox's + the cmdline's dyndbg
GUEST_PROGRAMS = QEMU / "bench"  # static C programs the benchmarks run in the guest
