"""The C/Python contract of the fast path: one source for the wire's numbers, and no Python
write into the I/O thread's state behind its back."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfio_ep.pci.bar import WindowTable
from vfio_ep.vfio_user import fastpath
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.protocol import Command


def test_the_python_side_of_the_wire_agrees_with_the_c_headers() -> None:
    assert fastpath.contract_mismatches() == []


def test_a_one_sided_change_is_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(p, "HEADER_SIZE", 17)
    monkeypatch.setattr(p, "FLAG_NO_REPLY", 0x40)
    found = fastpath.contract_mismatches()
    assert found == ["HEADER_SIZE: Python 17, C 16", "FLAG_NO_REPLY: Python 64, C 16"]


@pytest.fixture
def thread() -> Iterator[tuple[fastpath.FastPath, socket.socket]]:
    """A started I/O thread on one end of a socketpair (no windows: everything goes to
    Python), and the client's end."""
    ours, client = socket.socketpair()
    fast = fastpath.FastPath(ours.fileno(), WindowTable())
    fast.start()
    yield fast, client
    fast.stop()
    ours.close()
    client.close()


def _handed(fast: fastpath.FastPath) -> int:
    for _ in range(100):
        select.select([fast.notify_fd], [], [], 0.1)
        r = fast.handed()
        if r is not None:
            return r
    raise AssertionError("the I/O thread handed nothing over")


def test_the_message_buffer_is_released_only_while_the_thread_is_parked(
        thread: tuple[fastpath.FastPath, socket.socket]) -> None:
    fast, client = thread
    with pytest.raises(RuntimeError, match="reads on"):
        fast.drop()  # the thread is reading: its buffer is not Python's
    message = p.pack_header(7, Command.DEVICE_GET_INFO, p.HEADER_SIZE + 16, p.FLAG_REQUEST)
    r, w = os.pipe()
    try:
        socket.send_fds(client, [message + bytes(16)], [r])
        assert _handed(fast) == fast.MESSAGE
        data, fds, truncated = fast.take()  # parked: the message and its fd are ours now
    finally:
        os.close(r)
        os.close(w)
    assert (data[: p.HEADER_SIZE], len(fds), truncated) == (message, 1, False)
    os.close(fds[0])
    fast.resume()
    client.close()
    assert _handed(fast) == fast.EOF
    fast.drop()  # parked again: fine


def test_the_early_ack_is_set_through_c(thread: tuple[fastpath.FastPath, socket.socket]
                                        ) -> None:
    fast, _ = thread
    fast.allow_early_ack()
    assert fast.io.f.early_ack == 1


def test_the_server_serves_without_the_extension(tmp_path: Path) -> None:
    """A machine with no compiler has no vfio_ep._native: the server imports and serves on
    the Python path (the fast path's module, which needs C, is never imported)."""
    script = f"""
import sys
from pathlib import Path
sys.modules["vfio_ep._native"] = None  # as if it was never built
sys.path.insert(0, {str(Path(__file__).parent)!r})
from vfio_ep import native
from vfio_ep.pci import testdev
from vfio_user_client import Client, ServerThread
assert not native.available()[0], native.available()
with ServerThread(testdev.build({{}}), Path({str(tmp_path / "ep.sock")!r})) as s:
    c = Client(s.path)
    assert c.cfg_read32(0) == 0xEDDA16C3
    c.close()
assert "vfio_ep.vfio_user.fastpath" not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
