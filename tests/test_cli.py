"""`vfio-ep serve` as users run it: foreground until SIGINT/SIGTERM, socket removed on exit."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vfio_ep_cli import readme_example
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


def test_directories_made_for_the_socket_are_logged_and_removed_at_exit(
        tmp_path: Path) -> None:
    """Missing directories are created 0700 and go again at exit; one that something else
    moved into stays (with its parents)."""
    sock, kept = tmp_path / "a" / "b" / "ep.sock", tmp_path / "c" / "d" / "ep.sock"
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--function",
                             "pci-epf-ntb", "--socket", f"ep0={sock}", "--socket",
                             f"ep1={kept}"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
        _wait_for(kept)
        modes = {d: d.stat().st_mode & 0o777 for d in (sock.parent, sock.parent.parent)}
        (kept.parent / "mine").write_text("not the server's")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err
    assert modes == {sock.parent: 0o700, sock.parent.parent: 0o700}
    for d in (tmp_path / "a", tmp_path / "a" / "b", tmp_path / "c", tmp_path / "c" / "d"):
        assert f"created {d} (700) for the socket; removed at exit" in err
    assert f"removed {tmp_path / 'a'}, made for the socket" in err
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["c", "c/d", "c/d/mine"]


def test_a_refused_socket_leaves_nothing_behind(tmp_path: Path) -> None:
    """The second controller's path is a file: the first one's socket and directory, bound
    already, go again."""
    (tmp_path / "afile").write_text("mine")
    proc = _vfio_ep("serve", "--function", "pci-epf-ntb", "--socket",
                    f"ep0={tmp_path / 'new' / 'A.sock'}", "--socket", f"ep1={tmp_path / 'afile'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.endswith(f"vfio-ep: {tmp_path / 'afile'} exists and is not a socket\n")
    assert [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_a_socket_path_longer_than_sun_path_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / ("d" * 120) / "ep.sock"
    proc = _serve(sock)
    size = len(str(sock).encode())
    assert proc.returncode == 1 and not proc.stdout
    assert proc.stderr == (f"vfio-ep: {sock}: too long for a UNIX socket ({size} bytes; "
                           "sun_path holds 107 and the NUL)\n")
    assert not sock.parent.exists()


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


@pytest.mark.parametrize(("bad", "refusal"), [
    ("vendorid=0x12345", "vendorid: 0x12345 is out of range 0..0xffff (-ERANGE)"),
    ("deviceid=-1", "deviceid: -1 is out of range 0..0xffff (-EINVAL)"),
    ("revid=256", "revid: 256 is out of range 0..0xff (-ERANGE)"),
    ("msi_interrupts=64", "msi_interrupts: 64 is out of range 1..32 (-EINVAL: what "
     "pci_epc_set_msi() takes)"),
    ("msix_interrupts=4096", "msix_interrupts: 4096 is out of range 1..2048 (-EINVAL: what "
     "pci_epc_set_msix() takes)"),
    ("interrupt_pin=5", "interrupt_pin: 5 is out of range 0..4 (-EINVAL: 0 no INTx, 1-4 "
     "INTA-INTD: QEMU takes no other)"),
])
def test_values_the_store_refuses_are_one_line(tmp_path: Path, bad: str, refusal: str) -> None:
    """As configfs refuses the write: the attribute, the value, its range, the errno."""
    proc = _serve(tmp_path / "s", bad)
    assert proc.returncode == 1 and not proc.stdout, proc.stdout
    assert proc.stderr == f"vfio-ep: functions/pci_epf_test/func1/{refusal}\n"
    assert not (tmp_path / "s").exists()


def test_the_readmes_refused_writes() -> None:
    """The README's two examples, socket and all: refused before any socket is made."""
    for args, refusal in (
            (readme_example("vfio-ep serve --socket /tmp/ep.sock --set vendorid=0x12345"),
             "vendorid: 0x12345 is out of range 0..0xffff (-ERANGE)"),
            (readme_example("vfio-ep serve --socket /tmp/ep.sock --set msi_interrupts=64"),
             "msi_interrupts: 64 is out of range 1..32 (-EINVAL: what pci_epc_set_msi() "
             "takes)")):
        proc = _vfio_ep(*args)
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr == f"vfio-ep: functions/pci_epf_test/func1/{refusal}\n"


def test_a_bar_larger_than_ep_ram_is_refused_not_skipped(tmp_path: Path) -> None:
    """The kernel would drop the BAR and the kselftest skip it: a run that passes."""
    proc = _serve(tmp_path / "s", "bar1_size=1G")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "bar1_size 0x40000000 is larger than the controller's EP RAM" in proc.stderr
    assert "errno 12" in proc.stderr


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
    """A command line per controller that runs as printed: this vfio-ep's `qemu` (the
    QEMU runs use), then the launcher's own options (memfd RAM and -m of its size,
    interrupt remapping for 32 MSI vectors, the root port, the device with its message
    timeout).  tests/test_guest.py boots a guest with it."""
    sock = Path("/tmp/ep.sock")
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", *readme_example(
        "vfio-ep serve --socket /tmp/ep.sock --print-qemu-args")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        comment, line = proc.stdout.readline(), proc.stdout.readline()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert comment == "# ep0:\n"
    args = shlex.split(line)
    assert args[:5] == [sys.executable, "-m", "vfio_ep", "qemu", "--"]
    assert "intel-iommu,intremap=on,dma-translation=off" in args
    assert "memory-backend-memfd,id=mem,size=256M,share=on" in args
    assert args[args.index("-m", 5) + 1] == "256"  # after python -m vfio_ep
    device = json.loads(args[-1])
    assert device["socket"] == {"type": "unix", "path": str(sock)}
    assert device["driver"] == "vfio-user-pci" and device["x-msg-timeout"] > 0


def _vfio_ep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfio_ep", *args], capture_output=True,
                          text=True, timeout=60, check=False)


def test_version() -> None:
    run = _vfio_ep(*readme_example("vfio-ep --version"))
    assert run.returncode == 0 and run.stdout.startswith("vfio-ep 0."), run.stdout


def test_attributes_lists_each_settable_name_with_its_default(tmp_path: Path) -> None:
    """Every line of `vfio-ep attributes` is a name the configuration accepts, and the
    listed default is what the server then uses."""
    run = _vfio_ep("attributes", "pci-epf-test")
    assert run.returncode == 0, run.stderr
    rows = dict(line.split(None, 1) for line in run.stdout.splitlines())
    assert rows["controllers/NAME/ram_size"] == "256M"
    assert rows["functions/pci_epf_test/NAME/pci_epf_test.0/bar5_size"] == "1M"
    assert rows["functions/pci_epf_test/NAME/vendorid"] == "0x16c3"
    # each function attribute is accepted by --set as printed
    sock = tmp_path / "ep.sock"
    sets = [f"--set={path.rsplit('/', 1)[1]}={value}" for path, value in rows.items()
            if path.startswith("functions/")]
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                             *sets], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(sock)
        assert sock.exists(), proc.stderr.read() if proc.poll() is not None else "no socket"
        c = Client(sock)
        assert c.cfg_read32(0) == 0xEDDA16C3
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)


def test_attributes_of_an_unknown_function_name_the_known_ones() -> None:
    run = _vfio_ep("attributes", "pci-epf-nope")
    assert run.returncode == 1
    assert "known: pci-epf-ntb, pci-epf-test, pci-epf-vntb, testdev" in run.stderr


def test_ready_fd_and_pidfile_for_scripts(tmp_path: Path) -> None:
    """--ready-fd: READY=1 once the socket accepts clients (then EOF); --pidfile: our pid
    while serving, gone after; a bad fd is a one-line error that leaves no socket behind."""
    sock, pidfile = tmp_path / "ep.sock", tmp_path / "ep.pid"
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", "serve", "--socket", str(sock),
                             "--ready-fd", str(w), "--pidfile", str(pidfile)],
                            pass_fds=(w,), stderr=subprocess.PIPE, text=True)
    os.close(w)
    try:
        with os.fdopen(r, "rb") as ready:
            assert ready.read() == b"READY=1\n"  # read to EOF: the server closed it
        assert pidfile.read_text() == f"{proc.pid}\n"
        c = Client(sock)  # no waiting: it accepts now
        assert c.cfg_read32(0) == 0xEDDA16C3
        c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0 and not pidfile.exists() and not sock.exists()

    bad = _vfio_ep("serve", "--socket", str(sock), "--ready-fd", "99")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "vfio-ep: --ready-fd 99: Bad file descriptor" in bad.stderr
    assert not sock.exists()


def test_serve_both_controllers_of_the_ntb_function(tmp_path: Path) -> None:
    """The README's pair for your own QEMUs: one socket per controller, relative paths."""
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", *readme_example(
        "vfio-ep serve --function pci-epf-ntb --socket ep0=A.sock --socket ep1=B.sock")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "A.sock").exists() and (tmp_path / "B.sock").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        for name in ("A.sock", "B.sock"):
            c = Client(tmp_path / name)
            assert c.cfg_read32(0) == 0xB00D104C  # pci-epf-ntb's 104c:b00d on both
            c.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
    assert proc.returncode == 0


def test_serve_an_ep_guest_controller(tmp_path: Path) -> None:
    """The README's controller for your own two QEMUs: the EP guest's side answers at once,
    the RC's is refused until the EP guest starts the controller."""
    proc = subprocess.Popen([sys.executable, "-m", "vfio_ep", *readme_example(
        "vfio-ep serve --socket RC.sock --ep-socket EP.sock")],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not ((tmp_path / "RC.sock").exists() and (tmp_path / "EP.sock").exists()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
            time.sleep(0.05)
        ep = Client(tmp_path / "EP.sock")
        assert ep.cfg_read32(0) == 0x10EE1B36  # the controller's CPU side, 1b36:10ee
        ep.close()
        with pytest.raises(OSError):  # refused: no EP guest started the controller
            Client(tmp_path / "RC.sock").device_info()
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert "not started yet" in err


@pytest.mark.parametrize("function", ["pci-epf-ntb", "pci-epf-vntb"])
def test_an_ep_guest_setup_a_preset_does_not_fit_is_refused_before_anything_boots(
        tmp_path: Path, function: str) -> None:
    """--preset rk3588 is pci-epf-test's: with another function's EP guest it is refused
    with that reason, before the run directory is made, as often as it is asked (it once
    left a phase directory behind, and the second try was a traceback)."""
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "vfio_ep", "run", "--ep-guest",
                               "--function", function, "--preset", "rk3588", "--run-dir",
                               str(tmp_path / "r")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert f"preset rk3588 is for pci-epf-test, not {function}" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("args", "refusal"), [
    (["--ep-shell"], "--ep-shell and --ep-dyndbg go with --ep-guest"),
    (["--ep-guest", "--ep-shell", "--shell"], "--shell and --ep-shell each give a guest"),
    (["--ep-guest", "--ep-shell", "--ep-exec", "ls"], "--ep-exec and --ep-shell both say"),
    (["--ep-guest", "--ep-shell", "--matrix", "doorbell=msi,poll"],
     "--matrix runs the suite in every cell: not with --shell, --ep-shell or --exec"),
    (["--ep-guest", "--ep-shell", "--", "-r", "pci_ep_bar.BAR0.BAR_TEST"],
     "the RC guest runs no test, so -r pci_ep_bar.BAR0.BAR_TEST selects none"),
    (["--ep-guest", "--ep-shell", "--function", "nvmet-pci-epf"],
     "--ep-shell comes with pci-epf-test's and pci-epf-vntb's EP guest"),
])
def test_ep_shell_refuses_what_makes_no_sense_with_it(tmp_path: Path, args: list[str],
                                                      refusal: str) -> None:
    """--ep-shell gives the terminal to the EP guest's shell: another shell, another command
    for the EP guest, a matrix or the kselftest's arguments are refused, naming the options,
    before anything boots."""
    proc = subprocess.run([sys.executable, "-m", "vfio_ep", "run", "--run-dir",
                           str(tmp_path / "r"), *args], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert refusal in " ".join(proc.stderr.split()), proc.stderr
    assert not (tmp_path / "r").exists()
