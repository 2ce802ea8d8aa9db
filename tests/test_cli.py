"""`vfio-ep serve` as users run it: foreground until SIGINT/SIGTERM, socket removed on exit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vfio_user_client import Client


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_until_signal_and_remove_socket(tmp_path: Path, sig: signal.Signals) -> None:
    sock = tmp_path / "new" / "ep.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                             "--set", "deviceid=0xb500", "--set", "vendorid=0x104c"],
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.05)
        c = Client(sock)
        assert c.cfg_read32(0) == 0xB500104C
        c.close()
    finally:
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert not sock.exists()
    assert "connected" in err and "shutting down" in err


def test_serve_refuses_bad_configuration(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "vfio_ep", "serve", "--socket",
                           str(tmp_path / "s"), "--set", "msix_interrupts=lots"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0
    assert "msix_interrupts" in proc.stderr and "Traceback" not in proc.stderr
