"""The hot messages' struct parsers and builders against the construct declarations.

protocol.py declares every layout with construct; the messages that reach Python on every
access (headers, REGION_READ/WRITE and their replies, DMA requests) are read and written
with struct formats derived from those declarations.  Both must agree on every message:
bytes built either way are equal, and each parses the other's bytes to the same fields.
"""

from __future__ import annotations

import pytest
from construct import Bytes, Int32ul, Struct
from hypothesis import given
from hypothesis import strategies as st

from vfio_ep.vfio_user import protocol as p

u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
data = st.binary(max_size=64)


@given(u16, u16, u32, u32, u32)
def test_headers_agree(msg_id: int, command: int, size: int, flags: int, error: int) -> None:
    fields = {"msg_id": msg_id, "command": command, "size": size, "flags": flags,
              "error": error}
    built = p.pack_header(msg_id, command, size, flags, error)
    assert built == p.Header.build(fields)
    declared = {k: v for k, v in p.Header.parse(built).items() if not k.startswith("_")}
    assert p.HEADER.parse(built) == declared == fields


@given(u64, u32, u32, data)
def test_region_accesses_agree(offset: int, region: int, count: int, payload: bytes) -> None:
    """A read request (no data), a write or a read's reply (data after the access)."""
    built = p.pack_region_access(offset, region, count, payload)
    assert built == p.RegionAccess.build({"offset": offset, "region": region, "count": count,
                                          "data": payload})
    c = p.RegionAccess.parse(built)
    assert p.parse_region_access(built) == (c["offset"], c["region"], c["count"], c["data"]) \
        == (offset, region, count, payload)


@pytest.mark.parametrize("layout", list(p.DmaLayout))
@given(address=u64, count=u32, payload=data)
def test_dma_requests_agree(layout: p.DmaLayout, address: int, count: int,
                            payload: bytes) -> None:
    """DMA_READ/DMA_WRITE requests in both layouts (QEMU's with its 4 bytes of padding), and
    the data a DMA_READ reply carries."""
    declared = p.DmaAccessQemu if layout is p.DmaLayout.QEMU else p.DmaAccessSpec
    tail = bytes(4) if layout is p.DmaLayout.QEMU else b""
    built = p.pack_dma_request(layout, address, count, payload)
    assert built == declared.build({"address": address, "count": count,
                                    "data": payload + tail})
    reply = declared.build({"address": address, "count": len(payload), "data": payload})
    assert p.unpack_dma_read_reply(layout, reply, len(payload)) == payload


def test_the_fixed_parts_are_the_declarations_fields() -> None:
    assert p.HEADER.names == ("msg_id", "command", "size", "flags", "error")
    assert (p.HEADER.size, p.ACCESS.size) == (p.HEADER_SIZE, p.REGION_ACCESS_SIZE)
    assert p.ACCESS.names == ("offset", "region", "count")
    with pytest.raises(TypeError):  # a byte field before an integer: not a fixed prefix
        p.Fixed(Struct("data" / Bytes(8), "n" / Int32ul).compile())
