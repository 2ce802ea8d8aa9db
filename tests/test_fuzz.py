"""Property-based fuzzing of the vfio-user server, on the C and the Python path.

Hypothesis builds streams of messages: every command, with payloads that are the command's
own layout filled with arbitrary values (far likelier to reach the handlers than random
bytes), or arbitrary bytes, or a header that lies about its size; sometimes after a
VERSION handshake and a DMA map of a memfd, sometimes with eventfds attached.  Whatever
the stream, the property is the same: the server neither crashes nor hangs, logs no
traceback for it, and a fresh client is then served as if nothing had happened.

Two coverage-guided targets: the C fast path's framing and window look-up under libFuzzer
with ASan and UBSan (``native/fuzz_vfu_fast.c``), and every request handler on the Python
side under atheris (``tests/fuzz/fuzz_handlers.py``).

``VFIO_EP_FUZZ_EXAMPLES`` sets the number of streams per path, ``VFIO_EP_LIBFUZZER_SECONDS``
and ``VFIO_EP_ATHERIS_SECONDS`` the coverage-guided runs, ``VFIO_EP_FUZZ_CORPUS`` a corpus
kept between runs (``make fuzz`` runs long).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vfio_user_client import Client, ServerThread, eventfd

from vfio_ep.guest.host import ensure_host_packages
from vfio_ep.pci import testdev
from vfio_ep.vfio_user import protocol as p
from vfio_ep.vfio_user.protocol import Command

EXAMPLES = int(os.environ.get("VFIO_EP_FUZZ_EXAMPLES", "150"))
VENDOR_DEVICE = 0xEDDA16C3
GUEST = 0x100000
GUEST_SIZE = 1 << 20

u8, u16, u32 = (st.integers(0, (1 << n) - 1) for n in (8, 16, 32))
u64 = st.one_of(st.integers(0, (1 << 64) - 1),
                st.sampled_from([0, 0xFFFFFFFFFFFFFFF0, 1 << 63, GUEST, GUEST + GUEST_SIZE - 4]))
small = st.integers(0, 0x5000)  # offsets and counts near the regions' real sizes
region = st.integers(0, 10)
json_caps = st.sampled_from([
    b"", b"{}", b'{"capabilities": {}}', b'{"capabilities": null}', b"[]", b"{",
    b'{"capabilities": {"max_data_xfer_size": 0}}', b'{"capabilities": {"max_msg_fds": 1e400}}',
    b'{"capabilities": {"max_data_xfer_size": 4096, "max_msg_fds": 16}}'])


def _access(write: bool) -> st.SearchStrategy[bytes]:
    def build(off: int, reg: int, count: int, data: bytes) -> bytes:
        return struct.pack("<QII", off, reg, count) + (data if write else b"")
    return st.builds(build, st.one_of(small, u64), region, st.one_of(small, u32),
                     st.binary(max_size=64))


PAYLOADS: dict[int, st.SearchStrategy[bytes]] = {
    Command.VERSION: st.builds(lambda ma, mi, j: struct.pack("<HH", ma, mi) + j + b"\0",
                               st.sampled_from([0, 0, 1]), u16, json_caps),
    Command.DMA_MAP: st.builds(lambda f, o, i, s: struct.pack("<IIQQQ", 32, f, o, i, s),
                               u32, st.one_of(small, u64), u64, st.one_of(small, u64)),
    Command.DMA_UNMAP: st.builds(lambda f, i, s: struct.pack("<IIQQ", 24, f, i, s),
                                 st.sampled_from([0, 2, 7]), u64, u64),
    Command.DEVICE_GET_INFO: st.builds(lambda a: struct.pack("<IIII", a, 0, 0, 0), u32),
    Command.DEVICE_GET_REGION_INFO: st.builds(
        lambda a, i: struct.pack("<IIIIQQ", a, 0, i, 0, 0, 0), u32, region),
    Command.DEVICE_GET_IRQ_INFO: st.builds(lambda a, i: struct.pack("<IIII", a, 0, i, 0),
                                           u32, st.integers(0, 8)),
    Command.DEVICE_SET_IRQS: st.builds(lambda a, f, i, s, c: struct.pack("<5I", a, f, i, s, c),
                                       st.sampled_from([20, 0, 1 << 31]), u32,
                                       st.integers(0, 6), st.one_of(small, u32),
                                       st.one_of(st.integers(0, 4), u32)),
    Command.REGION_READ: _access(write=False),
    Command.REGION_WRITE: _access(write=True),
    Command.REGION_WRITE_MULTI: st.builds(
        lambda n, entries: struct.pack("<Q", n) + b"".join(entries),
        st.one_of(st.integers(0, 4), u64),
        st.lists(st.builds(lambda o, r, c, d: struct.pack("<QII", o, r, c) + d.ljust(8, b"\0")
                           [:8], st.one_of(small, u64), region, st.integers(0, 12),
                           st.binary(max_size=8)), max_size=4)),
    Command.DEVICE_RESET: st.just(b""),
}


@st.composite
def messages(draw: st.DrawFn) -> tuple[bytes, int]:
    """One message (bytes, number of eventfds to send with it)."""
    cmd = draw(st.one_of(st.sampled_from(list(PAYLOADS)), u16))
    payload = draw(PAYLOADS[cmd] if cmd in PAYLOADS and draw(st.booleans())
                   else st.binary(max_size=96))
    flags = draw(st.sampled_from([p.FLAG_REQUEST, p.FLAG_REQUEST | p.FLAG_NO_REPLY,
                                  p.FLAG_REPLY, p.FLAG_REPLY | p.FLAG_ERROR, 0x7]))
    size = 16 + len(payload)
    if draw(st.integers(0, 9)) == 0:  # a header that lies about its size
        size = draw(st.one_of(st.integers(0, 15), st.integers(size + 1, size + 64), u32))
    fds = draw(st.integers(0, 3)) if cmd in (Command.DMA_MAP, Command.DEVICE_SET_IRQS) else 0
    return p.pack_header(draw(u16), cmd, size, flags, draw(u32)) + payload, fds


def _released(server: ServerThread) -> None:
    for _ in range(500):
        if server.listener.active is None:
            return
        time.sleep(0.01)
    raise AssertionError("a closed client's connection was never released")


def _serves_again(server: ServerThread) -> None:
    """A fresh client is served as if nothing had happened (and is gone again after)."""
    _released(server)
    c = Client(server.path)
    c.sock.settimeout(10)
    assert c.cfg_read32(0) == VENDOR_DEVICE
    c.close()
    _released(server)


def _drain(sock: socket.socket) -> None:
    """Read what the server answered (it must never wait on us to stay alive)."""
    sock.settimeout(0.02)
    try:
        while sock.recv(1 << 16):
            pass
    except (TimeoutError, ConnectionResetError):
        pass


_SERVERS: dict[str, ServerThread] = {}  # one per path, shared by a test's examples


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for server in _SERVERS.values():
        server.__exit__()
    _SERVERS.clear()


def _server(path: str, where: Path) -> ServerThread:
    """The path's server, started by the first example: later streams meet whatever state
    the earlier ones left (a device lives that long in production too)."""
    if path not in _SERVERS:
        _SERVERS[path] = ServerThread(testdev.build({}), where / f"fuzz-{path}.sock")
        _SERVERS[path].__enter__()
    return _SERVERS[path]


@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(stream=st.lists(messages(), min_size=1, max_size=6), handshake=st.booleans(),
       dma_map=st.booleans())
def test_any_message_stream_leaves_the_server_serving(
        tmp_path_factory: pytest.TempPathFactory, path: str, caplog: pytest.LogCaptureFixture,
        stream: list[tuple[bytes, int]], handshake: bool, dma_map: bool) -> None:
    # WARNING and up only: pytest keeps every record of a test for its report, and thousands
    # of streams at DEBUG grew this process by GBs (which a libFuzzer run started from it
    # then inherits as its peak RSS); a traceback is logged at ERROR, refusals at WARNING.
    caplog.set_level(logging.WARNING, logger="vfio_ep")
    caplog.clear()
    server = _server(path, tmp_path_factory.getbasetemp())
    _serves_again(server)  # the last example's client is gone
    c = Client(server.path, negotiate=handshake)
    if handshake and dma_map:
        c.guest_memory(GUEST, GUEST_SIZE).close()
    try:
        for data, nfds in stream:
            fds = [eventfd() for _ in range(nfds)]
            try:
                c.send_raw(data, fds)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server closed an untrustworthy stream: allowed
            finally:
                for fd in fds:
                    os.close(fd)
            _drain(c.sock)
    finally:
        c.close()
    _serves_again(server)
    tracebacks = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not tracebacks, tracebacks


LIBFUZZER_SECONDS = int(os.environ.get("VFIO_EP_LIBFUZZER_SECONDS", "20"))
# libFuzzer's RSS limit reads the process's peak RSS, which Linux carries across fork and
# exec: started from this pytest (hundreds of MB after thousands of streams) it would fire
# at once.  A single allocation is still capped, and ASan's leak check runs at exit.
MEMORY_LIMITS = ("-rss_limit_mb=0", "-malloc_limit_mb=2048")
NATIVE = Path(__file__).resolve().parents[1] / "native"
SANITIZERS = "-fsanitize=fuzzer,address,undefined"


def _seeds(corpus: Path) -> None:
    """Messages the fast path serves (so the fuzzer starts from served paths, not framing)."""
    def msg(cmd: int, payload: bytes, flags: int = 0) -> bytes:
        return p.pack_header(1, cmd, 16 + len(payload), flags) + payload
    seeds = {
        "read_ram1": msg(Command.REGION_READ, struct.pack("<QII", 0x10, 1, 8)),
        "write_ram2": msg(Command.REGION_WRITE, struct.pack("<QII", 0x3000, 2, 4) + b"abcd"),
        "doorbell": msg(Command.REGION_WRITE, struct.pack("<QII", 0x40, 2, 4)
                        + struct.pack("<I", 0x1234), p.FLAG_NO_REPLY),
        "multi": msg(Command.REGION_WRITE_MULTI, struct.pack("<Q", 2) + b"".join(
            struct.pack("<QII", o, r, 4) + b"wxyz\0\0\0\0" for o, r in ((8, 1), (0x40, 2)))),
        "mmio": msg(Command.REGION_READ, struct.pack("<QII", 0, 0, 4)),
    }
    corpus.mkdir(parents=True, exist_ok=True)
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)


def _ensure_clang_with_runtimes() -> None:
    """clang, and the libFuzzer and sanitizer runtimes it links (``libclang_rt.*.a``).

    Debian ships those runtimes apart from the compiler (``libclang-rt-N-dev`` beside
    ``clang-N``, only recommended by it), and host packages are installed without
    recommends: a machine that has just clang cannot link ``-fsanitize=fuzzer``.  The
    runtime package is named after the major version of the clang that is installed.
    """
    ensure_host_packages(("clang",))
    version = subprocess.run(["clang", "-dumpversion"], capture_output=True, text=True,
                             check=True).stdout.strip()
    ensure_host_packages((f"libclang-rt-{version.split('.')[0]}-dev",))


def test_fast_path_under_libfuzzer_and_asan(tmp_path: Path) -> None:
    """Coverage-guided: native/fuzz_vfu_fast.c feeds arbitrary streams to the C fast path
    built with ASan and UBSan; any out-of-bounds access or undefined behaviour fails."""
    _ensure_clang_with_runtimes()
    binary = tmp_path / "fuzz_vfu_fast"
    build = subprocess.run(["clang", "-g", "-O1", SANITIZERS, "-fno-sanitize-recover=all",
                            str(NATIVE / "fuzz_vfu_fast.c"), str(NATIVE / "vfu_fast.c"), "-o",
                            str(binary)], capture_output=True, text=True, check=False)
    assert build.returncode == 0, f"building the fuzz target failed:\n{build.stderr[-5000:]}"
    corpus = Path(os.environ.get("VFIO_EP_FUZZ_CORPUS", tmp_path / "corpus"))
    _seeds(corpus)
    proc = subprocess.run([str(binary), f"-max_total_time={LIBFUZZER_SECONDS}",
                           "-max_len=8192", *MEMORY_LIMITS, f"-artifact_prefix={tmp_path}/",
                           str(corpus)],
                          capture_output=True, text=True, timeout=LIBFUZZER_SECONDS + 120)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Done" in proc.stderr


ATHERIS_SECONDS = int(os.environ.get("VFIO_EP_ATHERIS_SECONDS", "20"))


def test_request_handlers_under_atheris(tmp_path: Path) -> None:
    """Coverage-guided over the Python side: tests/fuzz/fuzz_handlers.py hands arbitrary
    payloads to every request handler; a refusal is fine, any other exception fails."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("fuzz") / "fuzz_handlers.py"),
         f"-max_total_time={ATHERIS_SECONDS}", "-max_len=4096", *MEMORY_LIMITS,
         f"-artifact_prefix={tmp_path}/"],
        capture_output=True, text=True, timeout=ATHERIS_SECONDS + 120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Done" in proc.stderr
