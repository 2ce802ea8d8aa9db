"""atheris target: the vfio-user request handlers on arbitrary payloads (coverage-guided).

Input: byte 0 picks a command, the rest is its payload, handed to the handler as the server
does once a message is framed, on a negotiated connection to a testdev device.  A handler
may refuse: an ErrnoError, or one of ``server.MALFORMED`` (the server replies EINVAL).
Anything else escaping is a bug the server would log as an internal error: the run fails.

Run by tests/test_fuzz.py (``-max_total_time`` from VFIO_EP_ATHERIS_SECONDS).
"""

import contextlib
import logging
import socket
import sys

import atheris

with atheris.instrument_imports():
    from vfio_ep.errors import ErrnoError
    from vfio_ep.pci import testdev
    from vfio_ep.vfio_user import server

import trio

HANDLERS = server._HANDLERS  # the dispatch table the server uses
COMMANDS = sorted(HANDLERS)
REFUSALS = (ErrnoError, *server.MALFORMED)


def _connection() -> server.Connection:
    ours, _peer = socket.socketpair()
    _KEEP.append(_peer)
    conn = server.Connection(trio.socket.from_stdlib_socket(ours), testdev.build({}), "fuzz")
    conn.negotiated = True
    return conn


_KEEP: list[socket.socket] = []
_CONN = [_connection()]
_RUNS = [0]


def one_input(data: bytes) -> None:
    if not data:
        return
    _RUNS[0] += 1
    if _RUNS[0] % 1000 == 0:  # DMA maps and the like pile up: start afresh now and then
        _CONN[0] = _connection()
    command = COMMANDS[data[0] % len(COMMANDS)]

    async def handle() -> None:
        with contextlib.suppress(REFUSALS):
            HANDLERS[command](_CONN[0], 1, data[1:], [])

    trio.run(handle)


if __name__ == "__main__":
    logging.disable(logging.WARNING)  # every refusal logs one: millions of lines otherwise
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
