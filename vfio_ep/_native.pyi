"""What mypy knows of the cffi extension built from native/ (native/build.py).

cffi generates ``ffi`` and ``lib`` at build time without type information; the declarations
are the headers in native/, and vfio_ep.vfio_user.fastpath checks at import that the Python
side of the wire agrees with their constants.
"""

from typing import Any

ffi: Any
lib: Any
