"""Bulk data over views (vfio_ep.bulk): copy, CRC32, random fill, on the C and Python paths."""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable

import pytest
import trio

from vfio_ep import bulk


def test_copy_between_scatter_lists_with_different_cuts() -> None:
    src = memoryview(bytes(range(256)) * 40000)  # 10,240,000 bytes: several steps
    dst = memoryview(bytearray(len(src)))
    trio.run(bulk.copy_views, [dst[:3], dst[3:2_000_001], dst[2_000_001:]],
             [src[:1_048_577], src[1_048_577:]])
    assert dst == src


def test_copy_of_unequal_lengths_is_refused_before_anything_moves() -> None:
    dst = memoryview(bytearray(8))
    with pytest.raises(ValueError, match="copy of 9 bytes into 8"):
        trio.run(bulk.copy_views, [dst], [memoryview(bytes(9))])
    assert dst == bytes(8)


def test_crc32_over_pieces_is_the_crc_of_their_concatenation() -> None:
    data = bytes(range(256)) * 9000
    view = memoryview(data)
    assert trio.run(bulk.crc32_views, [view[:5], view[5:1_500_000], view[1_500_000:]]) \
        == zlib.crc32(data)


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 4095, (1 << 20) + 3])
def test_fill_writes_exactly_the_view(path: str, length: int) -> None:
    guard = 64
    buf = bytearray(b"\xa5" * (length + 2 * guard))
    trio.run(bulk.fill_random, [memoryview(buf)[guard : guard + length]])
    assert buf[:guard] == b"\xa5" * guard and buf[guard + length :] == b"\xa5" * guard
    if length >= 8:  # random bytes: not all one value
        assert len(set(buf[guard : guard + length])) > 1


def test_fills_differ_and_pieces_continue_one_stream(path: str) -> None:
    a, b = bytearray(3 << 20), bytearray(3 << 20)
    trio.run(bulk.fill_random, [memoryview(a)])
    trio.run(bulk.fill_random, [memoryview(b)[:5], memoryview(b)[5:]])
    assert a != b
    # no step repeats another (a stream restarted per step would)
    steps = [bytes(a[i : i + 4096]) for i in range(0, len(a), bulk.BULK_STEP)]
    assert len(set(steps)) == len(steps)


def _ticks_during(work: Callable[[], Awaitable[None]]) -> int:
    """How many times a task sharing the loop ran while ``work`` did."""
    ticks = 0

    async def main() -> None:
        nonlocal ticks

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            await trio.lowlevel.checkpoint()
            before = ticks
            await work()
            ticks -= before
            nursery.cancel_scope.cancel()

    trio.run(main)
    return ticks


def test_a_long_copy_lets_other_tasks_run() -> None:
    """16 MiB in 1 MiB steps: a task sharing the loop runs between the steps."""
    size = 16 << 20
    src, dst = memoryview(bytearray(size)), memoryview(bytearray(size))
    assert _ticks_during(lambda: bulk.copy_views([dst], [src])) >= size // bulk.BULK_STEP - 1


def test_small_copies_share_one_yield() -> None:
    """A 4 KiB transfer's copy and CRC do not each pay the scheduler a pass: other tasks run
    once per BULK_STEP of work, however it is split among calls."""
    src, dst = memoryview(bytes(4096)), memoryview(bytearray(4096))

    async def copies() -> None:
        for _ in range(2 * bulk.BULK_STEP // 4096):
            await bulk.copy_views([dst], [src])

    assert 1 <= _ticks_during(copies) <= 3  # two steps' worth of work: two yields
