"""The one errno-carrying error: every layer refuses with the errno the kernel (or the
vfio-user protocol) would give, and a reason a person can act on."""

from __future__ import annotations

import errno as _errno


class ErrnoError(Exception):
    """A refusal: ``errno`` (positive, as in ``errno.EINVAL``) and ``reason``."""

    def __init__(self, err: int, reason: str) -> None:
        super().__init__(reason)
        self.errno = err
        self.reason = reason

    def errno_name(self) -> str:
        return _errno.errorcode.get(self.errno, str(self.errno))
