"""The container recipe, for real: build the image with podman and run guest tests inside it.

podman, runc and debootstrap are installed when missing.  The first run on a machine builds
the base and project images (a few minutes); later runs reuse podman's layers and the shared
provisioning cache, so the kernel is never rebuilt for the container.

This is a host-side test (marked ``container``): the suite run inside the image
(``make container-test``) leaves it out, since the image has no podman, no package lists
and no network to get them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.guest, pytest.mark.container]

ROOT = Path(__file__).resolve().parents[1]
# A real slice of the integration suite: one kselftest run, one vNTB suite run, the NTB pair.
SELECTION = ("tests/test_guest.py", "tests/test_guest_ntb.py", "tests/test_guest_ntb_pair.py",
             "-k", "kselftest_passes_with_each_doorbell and poll or vntb_suite and msi "
             "or ntb_pair_suite")
TIMEOUT = 1800  # a cold image build (podman and debootstrap installed too) plus a guest boot


@pytest.mark.timeout(TIMEOUT)
def test_guest_suite_runs_in_the_container() -> None:
    """podman, runc and debootstrap are installed if missing (as make container-test does)."""
    command = ["test", *SELECTION]
    passed = "3 passed"
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep.guest.container", *command],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT - 120)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the module removes its container on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"container run timed out:\n{(stdout + stderr)[-6000:]}")
    output = stdout + stderr
    assert proc.returncode == 0, output[-6000:]
    assert passed in stdout, output[-6000:]
    # The container used the distribution's QEMU, not the host's cached sysroot.
    assert re.search(r"^qemu .*: /usr/bin/qemu-system-x86_64$", stdout, re.MULTILINE), \
        output[-6000:]
