"""The last lines of a log or an output, for error messages that show what went wrong."""

from __future__ import annotations


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])
