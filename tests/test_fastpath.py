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

from vfio_ep.pci.bar import Window, WindowKind, WindowTable
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


def test_a_one_sided_change_of_the_queue_entry_is_found(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """struct vfu_posted, which Python unpacks from a copy of the queue: a field that
    Python reads narrower than C moves the ones after it."""
    fields = dict(fastpath._POSTED_FIELDS)
    monkeypatch.setattr(fastpath, "_POSTED_FIELDS", tuple({**fields, "region": "H"}.items()))
    assert fastpath.contract_mismatches() == ["vfu_posted.count: Python 10, C 12",
                                              "vfu_posted.data: Python 14, C 16",
                                              "vfu_posted.msg_id: Python 22, C 24"]


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


class _Registers:
    """An MMIO window whose writes Python applies: the thread queues them."""

    def read(self, offset: int, size: int) -> int:
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        raise AssertionError("the test applies nothing")


def _posted_writes(first: int, n: int) -> bytes:
    """``n`` posted 4-byte writes to BAR0 0x10, values (and ids) ``first``..."""
    return b"".join(p.pack_header(i, Command.REGION_WRITE, p.HEADER_SIZE + 20,
                                  p.FLAG_REQUEST | p.FLAG_NO_REPLY)
                    + p.ACCESS.pack(0x10, 0, 4) + i.to_bytes(4, "little")
                    for i in range(first, first + n))


def _queued(fast: fastpath.FastPath, n: int) -> list[tuple[int, int, bytes, int]]:
    for _ in range(200):
        entries = fast.posted()
        if len(entries) == n:
            return entries
        select.select([], [], [], 0.01)
    raise AssertionError(f"{len(fast.posted())} writes queued, not {n}")


def test_queued_writes_signal_once_and_are_copied_in_order_across_the_ring() -> None:
    """The thread signals Python for a write into an empty queue only (Python applies all
    that is queued when it looks, and looks again after), and the queue's copy keeps the
    stream's order where the ring wraps."""
    ours, client = socket.socketpair()
    windows = WindowTable()
    windows.add(Window(0, 0, 0x100, WindowKind.MMIO, _Registers()))
    fast = fastpath.FastPath(ours.fileno(), windows)
    fast.start()
    try:
        fast.allow_early_ack()
        first = fastpath.lib.VFU_POSTED_MAX - 8  # the second batch wraps past the ring's end
        client.sendall(_posted_writes(1, first))
        assert len(_queued(fast, first)) == first
        assert os.eventfd_read(fast.notify_fd) == 1  # one signal for the whole stream
        fast.posted_done(first)
        client.sendall(_posted_writes(first + 1, 16))
        entries = _queued(fast, 16)
        assert entries == [(0, 0x10, i.to_bytes(4, "little"), i)
                           for i in range(first + 1, first + 17)]
        assert os.eventfd_read(fast.notify_fd) == 1
    finally:
        fast.stop()
        ours.close()
        client.close()


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
