"""cffi build script for the fast path (``vfio_ep._native``), from the project's own C."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent

ffibuilder = FFI()
# The header is the declaration: cffi reads it as is, minus the preprocessor include.
ffibuilder.cdef("\n".join(line for line in (HERE / "vfu_fast.h").read_text().splitlines()
                          if not line.startswith("#include")))
# setuptools wants paths relative to the project root (where setup.py runs).
ffibuilder.set_source("vfio_ep._native", '#include "vfu_fast.h"',
                      sources=["native/vfu_fast.c"], include_dirs=["native"],
                      extra_compile_args=["-O2", "-Wall"])

