"""Build the C fast path (native/) with cffi.

The fast path is part of the product: with a C compiler present, a build error fails the
install.  Only a machine with no compiler at all installs without it (the server then runs
every message through Python and says so); ``VFIO_EP_REQUIRE_C=1`` (CI) makes that an error
too.
"""

import os
import shutil
import sys

from setuptools import setup
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


setup(ext_modules=[ffibuilder.distutils_extension()], cmdclass={"build_ext": FastPathBuildExt})
