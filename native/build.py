"""cffi build script for the C side (``vfio_ep._native``), from the project's own C.

vfu_fast: the vfio-user fast path; vfu_io: the connection's I/O thread running it; vfu_fill:
random fill at memory speed (bulk transfers); vfu_poll: the poll doorbell's poller thread.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent
UNITS = ("vfu_fast", "vfu_io", "vfu_fill", "vfu_poll")

ffibuilder = FFI()
# The headers are the declarations: cffi reads them as they are, minus includes and pragmas.
ffibuilder.cdef("\n".join(line for unit in UNITS
                          for line in (HERE / f"{unit}.h").read_text().splitlines()
                          if not line.startswith(("#include", "#pragma"))))
# setuptools wants paths relative to the project root (where setup.py runs).
ffibuilder.set_source("vfio_ep._native", "".join(f'#include "{unit}.h"\n' for unit in UNITS),
                      sources=[f"native/{unit}.c" for unit in UNITS], include_dirs=["native"],
                      extra_compile_args=["-O2", "-Wall"])
