"""`vfio-ep serve` as users run it: foreground until SIGINT/SIGTERM, socket removed on exit."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vfio_user_client import Client


def _wait_for(sock: Path) -> None:
    """Until the server's socket exists."""
    for _ in range(100):
        if sock.exists():
            return
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_until_signal_and_remove_socket(tmp_path: Path, sig: signal.Signals) -> None:
    sock = tmp_path / "new" / "ep.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                             "--set", "deviceid=0xb500", "--set", "vendorid=0x104c"],
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
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


def _serve(sock: Path, *sets: str) -> subprocess.CompletedProcess[str]:
    """``vfio-ep serve`` that is expected to refuse at once."""
    return subprocess.run([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                           *(a for s in sets for a in ("--set", s))],
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("bad", ["msi_interrupts=99", "msix_interrupts=4096"])
def test_values_the_controller_refuses_are_one_line(tmp_path: Path, bad: str) -> None:
    proc = _serve(tmp_path / "s", bad)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("vfio-ep: a function failed to bind")
    assert "errno 22" in proc.stderr


def test_serve_refuses_a_path_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "afile"
    path.write_text("mine")
    proc = _serve(path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == f"vfio-ep: {path} exists and is not a socket"
    assert path.read_text() == "mine"


def test_a_second_server_on_a_live_socket_is_refused_and_the_first_keeps_it(
        tmp_path: Path) -> None:
    sock = tmp_path / "ep.sock"
    first = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock)],
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
        proc = _serve(sock)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "another server is listening on it" in proc.stderr
        c = Client(sock)  # still the first server's
        assert c.cfg_read32(0) == 0xEDDA16C3
        c.close()
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=10)
    assert not sock.exists()


def test_print_qemu_args_gives_what_run_uses(tmp_path: Path) -> None:
    """The printed options come from the launcher's own list (memfd RAM, interrupt remapping
    for 32 MSI vectors, the root port, the device with its message timeout)."""
    sock = tmp_path / "ep.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                             "--print-qemu-args"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    args = shlex.split(line.split("...", 1)[1])
    assert "intel-iommu,intremap=on,dma-translation=off" in args
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in args
    device = json.loads(args[-1])
    assert device["socket"] == {"type": "unix", "path": str(sock)}
    assert device["driver"] == "vfio-user-pci" and device["x-msg-timeout"] > 0


def test_interrupt_pin_beyond_intd_is_one_line(tmp_path: Path) -> None:
    proc = _serve(tmp_path / "s", "interrupt_pin=5")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "interrupt_pin 5: 0 (no INTx) or 1-4 (INTA-INTD)" in proc.stderr
