"""The C side (``native/``, built by cffi as ``vfio_ep._native``), for each layer that has one.

The vfio-user fast path, the bulk random fill and the poll doorbell's poller each have a C
and a Python version.  C is used when the extension was built, unless
``VFIO_EP_FASTPATH=0`` asks for Python everywhere (the tests run both ways).
"""

from __future__ import annotations

import os
from typing import Any

try:
    from vfio_ep._native import ffi, lib

    _IMPORT_ERROR = ""
except ImportError as e:  # no compiler at install time: the Python versions serve
    ffi = lib = None
    _IMPORT_ERROR = str(e)


def available() -> tuple[bool, str]:
    """Whether the C versions will be used, and why not."""
    if os.environ.get("VFIO_EP_FASTPATH", "1") == "0":
        return False, "disabled by VFIO_EP_FASTPATH=0"
    if lib is None:
        return False, f"extension not built ({_IMPORT_ERROR})"
    return True, "C fast path"


def native() -> tuple[Any, Any] | None:
    """(ffi, lib) when the C versions are to be used (see :func:`available`), else None."""
    return (ffi, lib) if available()[0] else None
