"""Make the tests' own vfio-user client importable and log the server at DEBUG."""

import logging
import sys
from pathlib import Path

import pytest

from vfio_ep import native

sys.path.insert(0, str(Path(__file__).parent))
logging.getLogger("vfio_ep").setLevel(logging.DEBUG)


@pytest.fixture(params=["c", "python"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test on the C fast path and on the Python path: both face the same input.

    The C path is part of the product, so a build without it fails here instead of skipping.
    """
    if request.param == "c":
        usable, why = native.available()
        if not usable:
            pytest.fail(f"the C fast path is required by the test suite: {why}")
    monkeypatch.setenv("VFIO_EP_FASTPATH", "1" if request.param == "c" else "0")
    return request.param
