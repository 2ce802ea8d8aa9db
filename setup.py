"""Build the optional C fast path (native/) with cffi; the package works without it."""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, "native")
from build import ffibuilder


class OptionalBuildExt(build_ext):
    """A missing compiler must not stop the install: the Python path is the fallback."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as e:
            print(f"vfio-ep: C fast path not built ({e}); using the Python path",
                  file=sys.stderr)

    def build_extension(self, ext) -> None:
        try:
            super().build_extension(ext)
        except Exception as e:
            print(f"vfio-ep: C fast path not built ({e}); using the Python path",
                  file=sys.stderr)


setup(ext_modules=[ffibuilder.distutils_extension()], cmdclass={"build_ext": OptionalBuildExt})
