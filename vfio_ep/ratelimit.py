"""Warnings that a guest can repeat at will, logged once: dev_warn_ratelimited()'s purpose.

A function that raises an interrupt the host has not enabled, or writes through a dead link,
does it on every completion or every word of a memcpy: thousands of the same line would bury
the one that matters.  The reason is logged the first time, then counted; the count is
logged when a different reason comes, so nothing is hidden.
"""

from __future__ import annotations

import logging


class Repeats:
    """One logger's repeated warning, logged once per run of the same text."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._last: str | None = None
        self._repeated = 0

    def warning(self, fmt: str, *args: object) -> None:
        text = fmt % args
        if text == self._last:
            self._repeated += 1
            return
        self._flush()
        self._last = text
        self.log.warning("%s", text)

    def clear(self) -> None:
        """The condition is over (an access went through): the next warning is logged."""
        self._flush()
        self._last = None

    def _flush(self) -> None:
        if self._repeated:
            self.log.warning("(%s: %d more times)", self._last, self._repeated)
            self._repeated = 0
