"""A guest's repeated warning is logged once, and how often it came again."""

from __future__ import annotations

import logging

import pytest

from vfio_ep.ratelimit import Repeats


def test_a_repeated_warning_is_logged_once_then_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.ratelimit")
    repeats = Repeats(log)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for _ in range(1000):
            repeats.warning("MSI-X vector %d not raised", 0)
        repeats.warning("MSI-X vector %d not raised", 1)
        repeats.clear()
        repeats.warning("MSI-X vector %d not raised", 1)
    assert [r.getMessage() for r in caplog.records] == [
        "MSI-X vector 0 not raised", "(MSI-X vector 0 not raised: 999 more times)",
        "MSI-X vector 1 not raised", "MSI-X vector 1 not raised"]


def test_repeats_alike_by_key_are_counted_too(caplog: pytest.LogCaptureFixture) -> None:
    """A dead link's accesses each name their own address: one line, then the count."""
    repeats = Repeats(logging.getLogger("test.ratelimit"))
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for addr in range(0, 16, 4):
            repeats.warning("read at %#x: all ones", addr, key="read")
        repeats.clear()
    assert [r.getMessage() for r in caplog.records] == [
        "read at 0x0: all ones", "(read at 0x0: all ones: 3 more times, alike)"]
