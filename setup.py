"""Build the C fast path (native/) with cffi.

The fast path is part of the product: with a C compiler present, a build error fails the
install.  Only a machine with no compiler at all installs without it (the server then runs
every message through Python and says so); ``VFIO_EP_REQUIRE_C=1`` (CI) makes that an error
too.
"""

import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, "native")
from build import ffibuilder


class FastPathBuildExt(build_ext):
    def run(self) -> None:
        compiler = os.environ.get("CC", "cc").split()[0]
        if shutil.which(compiler) is None and shutil.which("gcc") is None:
            if os.environ.get("VFIO_EP_REQUIRE_C") == "1":
                raise SystemExit("vfio-ep: no C compiler, and VFIO_EP_REQUIRE_C=1: install gcc")
            print("vfio-ep: no C compiler: the C fast path is not built; the server will use "
                  "the Python path (install gcc and reinstall for the fast path)",
                  file=sys.stderr)
            return
        super().run()


# The top-level qemu/ folder (guest-side files that are not Python) installs as vfio_ep.qemu,
# its sub-folders as data packages.
QEMU_DATA = {"": ["Containerfile"], ".kernel": ["*.config"],
             ".kernel.epc": ["*.c", "*.h", "Kbuild"], ".guest": ["*.sh"], ".bench": ["*.c"]}
setup(packages=[*find_packages(include=["vfio_ep*"]), *(f"vfio_ep.qemu{sub}" for sub in QEMU_DATA)],
      package_dir={"vfio_ep.qemu": "qemu"},
      package_data={"vfio_ep.bench": ["*.c", "*.h"],
                    **{f"vfio_ep.qemu{sub}": files for sub, files in QEMU_DATA.items()}},
      ext_modules=[ffibuilder.distutils_extension()], cmdclass={"build_ext": FastPathBuildExt})
