"""cffi build script for the C side (``vfio_ep._native``), from the project's own C.

vfu_fast: the vfio-user fast path; vfu_io: the connection's I/O thread running it; vfu_fill:
random fill at memory speed (bulk transfers); vfu_poll: the poll doorbell's poller thread.
"""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).parent
UNITS = ("vfu_fast", "vfu_io", "vfu_fill", "vfu_poll")


def declarations(header: str) -> str:
    """A header as cffi reads it: as it is, minus includes, pragmas and the packed attribute
    (a packed header is declared packed as a whole)."""
    return "\n".join(line for line in (HERE / header).read_text().splitlines()
                     if not line.startswith(("#include", "#pragma"))
                     ).replace(" __attribute__((packed))", "")


ffibuilder = FFI()
# The headers are the declarations; vfu_wire.h too, so that Python can check its own wire
# constants and sizes against C's (vfio_ep/vfio_user/fastpath.py, at import).
ffibuilder.cdef("\n".join(declarations(f"{unit}.h") for unit in UNITS))
ffibuilder.cdef(declarations("vfu_wire.h"), packed=True)
# The register reads the I/O thread answers by calling Python (struct vfu_fast.read_reg),
# defined by vfio_ep/vfio_user/fastpath.py.
ffibuilder.cdef('extern "Python" int vfu_py_read_reg(void *, uint64_t, uint32_t, uint64_t *);')
# setuptools wants paths relative to the project root (where setup.py runs).
ffibuilder.set_source("vfio_ep._native",
                      "".join(f'#include "{h}.h"\n' for h in (*UNITS, "vfu_wire")),
                      sources=[f"native/{unit}.c" for unit in UNITS], include_dirs=["native"],
                      extra_compile_args=["-O2", "-Wall"])
