"""The processes a run owns: started in their own session, dying with us, stopped in order;
and the event loop they are supervised from.

Why asyncio here, when the server is trio: the launcher's one library that needs an event
loop, QMP (PyPI ``qemu.qmp``, QEMU's own client), is asyncio-only, and the launcher is a
process of its own; the trio server never shares a loop with it.  So this edge stays asyncio.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from vfio_ep.guest.interrupt import SIGNALS, Interrupted

GRACE = 5.0  # seconds a child has between SIGTERM and SIGKILL (and QMP quit)
_PR_SET_PDEATHSIG = 1

T = TypeVar("T")


class LaunchError(RuntimeError):
    """The server or QEMU could not be started; the message carries the tail of its log."""


async def spawn(argv: Sequence[str], *, stdout: Any, stderr: Any = asyncio.subprocess.STDOUT,
                 env: dict[str, str] | None = None,
                 terminal: bool = False) -> asyncio.subprocess.Process:
    """Start a child in its own session (the terminal's Ctrl-C reaches only us, and we stop it
    in order) that dies with us even if we are SIGKILLed.  With ``terminal`` it reads our
    stdin instead, in our session (a background reader of a terminal would be stopped)."""
    env = dict(env or os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # `-m vfio_ep` from any cwd
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    try:
        return await asyncio.create_subprocess_exec(
            *argv, stdin=None if terminal else asyncio.subprocess.DEVNULL, stdout=stdout,
            stderr=stderr, env=env, start_new_session=not terminal,
            preexec_fn=_die_with_parent, limit=1 << 20)
    finally:
        for stream in (stdout, stderr):
            if hasattr(stream, "close"):
                stream.close()


def _die_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


async def terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the child's process group, SIGKILL it after :data:`GRACE` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), GRACE)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run, with SIGINT and SIGTERM cancelling ``coro`` (its processes are torn down
    on the way out) and then raising :class:`Interrupted`.  A second signal during the
    teardown cannot cut it short."""
    caught: list[int] = []

    def on_signal(signum: int, task: asyncio.Task[T]) -> None:
        if not caught:
            caught.append(signum)
            task.cancel()

    async def main() -> T:
        task = asyncio.current_task()
        assert task is not None
        if in_main_thread:
            for sig in SIGNALS:
                asyncio.get_running_loop().add_signal_handler(sig, on_signal, sig, task)
        try:
            return await coro
        except asyncio.CancelledError:
            if caught:
                raise Interrupted(caught[0]) from None
            raise

    in_main_thread = threading.current_thread() is threading.main_thread()
    # The loop's close resets the signals it handled to their defaults: put back ours.
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS} if in_main_thread else {}
    try:
        return asyncio.run(main())
    finally:
        for sig, handler in previous.items():
            if handler is not None:
                signal.signal(sig, handler)


