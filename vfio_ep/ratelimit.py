"""Warnings that a guest can repeat at will, logged once: dev_warn_ratelimited()'s purpose.

A function that raises an interrupt the host has not enabled, or writes through a dead link,
does it on every completion or every word of a memcpy: thousands of the same line would bury
the one that matters.  The reason is logged the first time, then counted; the count is
logged when a different reason comes, so nothing is hidden.
"""

from __future__ import annotations

import logging


class Repeats:
    """One logger's repeated warning, logged once per run of the same text (or of the same
    ``key``, where each repeat names another address, say)."""

    def __init__(self, log: logging.Logger) -> None:
        self.log = log
        self._last: object = None
        self._text = ""
        self._repeated = 0

    def warning(self, fmt: str, *args: object, key: object = None) -> None:
        text = fmt % args
        same = text if key is None else key
        if self._last is not None and same == self._last:
            self._repeated += 1
            return
        self._flush()
        self._last, self._text = same, text
        self.log.warning("%s", text)

    def clear(self) -> None:
        """The condition is over (an access went through): the next warning is logged."""
        self._flush()
        self._last = None

    def _flush(self) -> None:
        if self._repeated:
            self.log.warning("(%s: %d more times%s)", self._text, self._repeated,
                             "" if self._text == self._last else ", alike")
            self._repeated = 0
