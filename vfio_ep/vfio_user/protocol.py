"""vfio-user wire format, as QEMU >= 10.1 speaks it.

Every layout QEMU uses is declared here with construct and compiled once; the
rest of the package never slices message bytes by hand.  All integers are
little-endian (the host order on x86-64 and arm64, which is what QEMU sends).

The hot messages (every header, REGION_READ/WRITE and their replies, DMA requests) are
parsed and built with ``struct`` formats derived from those declarations (:class:`Fixed`):
construct costs 7-10 us a message, struct well under 1 us, and each message that reaches
Python pays it.  tests/test_protocol.py checks that both read and write every hot message
alike.
"""

from __future__ import annotations

import enum
import errno
import json
import struct
from typing import Any

from construct import (
    Array,
    Bytes,
    Compiled,
    CString,
    FormatField,
    GreedyBytes,
    Int16ul,
    Int32ul,
    Int64ul,
    Struct,
    this,
)

from vfio_ep.errors import ErrnoError

# The region and IRQ indices and the region flags are the device's; re-exported for the wire.
from vfio_ep.pci.regions import REGION_INFO_FLAG_MMAP as REGION_INFO_FLAG_MMAP
from vfio_ep.pci.regions import REGION_INFO_FLAG_READ as REGION_INFO_FLAG_READ
from vfio_ep.pci.regions import REGION_INFO_FLAG_WRITE as REGION_INFO_FLAG_WRITE
from vfio_ep.pci.regions import Irq as Irq
from vfio_ep.pci.regions import Region as Region

HEADER_SIZE = 16

# A parsed layout's fields by name (construct's Container, a dict): its values are as
# untyped as construct itself, checked where a handler reads them.
Fields = dict[str, Any]


class Fixed:
    """The leading fixed-size integer fields of a construct layout as one ``struct`` format
    (what follows them, a GreedyBytes tail, is the caller's): the hot path's parser and
    builder, derived from the declaration so that the wire is declared once."""

    def __init__(self, layout: Compiled) -> None:
        fields = layout.defersubcon.subcons
        ints = [f for f in fields if isinstance(f.subcon, FormatField)]
        if fields[: len(ints)] != ints or any(f.subcon is not GreedyBytes
                                              for f in fields[len(ints):]):
            raise TypeError(f"{layout.name}: not integers then at most a byte tail")
        self.names: tuple[str, ...] = tuple(f.name for f in ints)
        self.struct = struct.Struct("<" + "".join(f.subcon.fmtstr.lstrip("<") for f in ints))
        self.size = self.struct.size
        self.pack = self.struct.pack
        self.unpack_from = self.struct.unpack_from

    def parse(self, data: bytes | bytearray | memoryview) -> Fields:
        """The fields by name, as construct's parse gives them (without the tail)."""
        return dict(zip(self.names, self.struct.unpack_from(data), strict=True))


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    REGION_WRITE_MULTI = 15


# Header flags: low nibble is the message type.
FLAG_TYPE_MASK = 0xF
FLAG_REQUEST = 0x0
FLAG_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20

# DEVICE_GET_INFO flags and the PCI region/IRQ index spaces.
DEVICE_FLAGS_RESET = 0x1
DEVICE_FLAGS_PCI = 0x2
NUM_REGIONS = 9
NUM_IRQS = 5


REGION_INFO_FLAG_CAPS = 0x8
REGION_INFO_CAP_SPARSE_MMAP = 1

IRQ_INFO_EVENTFD = 0x1
IRQ_INFO_MASKABLE = 0x2
IRQ_INFO_AUTOMASKED = 0x4

IRQ_SET_DATA_NONE = 0x1
IRQ_SET_DATA_BOOL = 0x2
IRQ_SET_DATA_EVENTFD = 0x4
IRQ_SET_DATA_MASK = 0x7
IRQ_SET_ACTION_MASK = 0x8
IRQ_SET_ACTION_UNMASK = 0x10
IRQ_SET_ACTION_TRIGGER = 0x20
IRQ_SET_ACTION_MASK_ALL = 0x38

DMA_FLAG_READ = 0x1
DMA_FLAG_WRITE = 0x2
DMA_UNMAP_FLAG_ALL = 0x2

# What we offer in VERSION.  QEMU refuses max_msg_fds > 16 and
# max_data_xfer_size > 64 MiB; 1 MiB matches QEMU's own default.
MAX_MSG_FDS = 16
MAX_DATA_XFER_SIZE = 1 << 20
# The smallest max_data_xfer_size a client may ask for (a page; smaller would only make DMA
# crawl through tiny messages).
MIN_DATA_XFER_SIZE = 4096
# Largest message we accept: a REGION_WRITE of max_data_xfer_size, or a full
# WRITE_MULTI (200 entries).  Anything bigger means the stream is corrupt.
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE
# A larger message whose size is still below this is read to its end and refused with an
# error (a client that ignored max_data_xfer_size; QEMU allows at most 64 MiB); above it,
# the stream is closed.
MAX_DRAIN_SIZE = HEADER_SIZE + 16 + (64 << 20)
WRITE_MULTI_MAX = 200

Header = Struct(
    "msg_id" / Int16ul,
    "command" / Int16ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "error" / Int32ul,
).compile()

Version = Struct("major" / Int16ul, "minor" / Int16ul, "json" / CString("utf8"))

DmaMap = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "offset" / Int64ul, "iova" / Int64ul, "size" / Int64ul
).compile()
DmaUnmap = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "iova" / Int64ul, "size" / Int64ul
).compile()

DeviceInfo = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "num_regions" / Int32ul, "num_irqs" / Int32ul
).compile()

RegionInfo = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "cap_offset" / Int32ul,
    "size" / Int64ul,
    "offset" / Int64ul,
).compile()
REGION_INFO_SIZE = 32

SparseMmapCap = Struct(
    "id" / Int16ul,
    "version" / Int16ul,
    "next" / Int32ul,
    "nr_areas" / Int32ul,
    "reserved" / Int32ul,
    "areas" / Array(this.nr_areas, Struct("offset" / Int64ul, "size" / Int64ul)),
)

IrqInfo = Struct(
    "argsz" / Int32ul, "flags" / Int32ul, "index" / Int32ul, "count" / Int32ul
).compile()

IrqSet = Struct(
    "argsz" / Int32ul,
    "flags" / Int32ul,
    "index" / Int32ul,
    "start" / Int32ul,
    "count" / Int32ul,
    "data" / GreedyBytes,
).compile()

RegionAccess = Struct(
    "offset" / Int64ul, "region" / Int32ul, "count" / Int32ul, "data" / GreedyBytes
).compile()
REGION_ACCESS_SIZE = 16

WriteMultiEntry = Struct(
    "offset" / Int64ul, "region" / Int32ul, "count" / Int32ul, "data" / Bytes(8)
)
WriteMulti = Struct("wr_cnt" / Int64ul, "entries" / Array(this.wr_cnt, WriteMultiEntry)).compile()

# Server -> client DMA.  QEMU 10.1/11.x declare ``{u64 offset; u32 count; data[]}``,
# so data starts at message byte 28 and the message carries 4 bytes of tail
# padding; the specification puts a u64 count and data at byte 32.
DmaAccessQemu = Struct("address" / Int64ul, "count" / Int32ul, "data" / GreedyBytes).compile()
DmaAccessSpec = Struct("address" / Int64ul, "count" / Int64ul, "data" / GreedyBytes).compile()


class DmaLayout(enum.Enum):
    """Which DMA_READ/DMA_WRITE layout the client expects (a per-connection setting)."""

    QEMU = "qemu-10.1"
    SPEC = "spec"


# The hot layouts' fixed parts, for struct (see the module's docstring).
HEADER = Fixed(Header)
ACCESS = Fixed(RegionAccess)
DMA_ACCESS = {DmaLayout.QEMU: Fixed(DmaAccessQemu), DmaLayout.SPEC: Fixed(DmaAccessSpec)}


def pack_dma_request(layout: DmaLayout, address: int, count: int, data: bytes = b"") -> bytes:
    """Payload of a DMA_READ (no data) or DMA_WRITE request for ``layout``."""
    head = DMA_ACCESS[layout].pack(address, count)
    # QEMU's struct is 32 bytes with data at 28: pad so size >= 32 + count.
    return head + data + bytes(4) if layout is DmaLayout.QEMU else head + data


def unpack_dma_read_reply(layout: DmaLayout, payload: bytes, count: int) -> bytes:
    """The data bytes of a DMA_READ reply."""
    start = DMA_ACCESS[layout].size
    data = payload[start : start + count]
    if len(data) != count:
        raise ProtocolError(errno.EIO, f"DMA_READ reply carries {len(data)} of {count} bytes")
    return data


def pack_header(msg_id: int, command: int, size: int, flags: int, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, command, size, flags, error)


def parse_region_access(body: bytes) -> tuple[int, int, int, bytes]:
    """A REGION_READ/REGION_WRITE payload (or a reply's): offset, region, count, data."""
    offset, region, count = ACCESS.unpack_from(body)
    return offset, region, count, body[ACCESS.size :]


def pack_region_access(offset: int, region: int, count: int, data: bytes = b"") -> bytes:
    return ACCESS.pack(offset, region, count) + data


def version_capabilities() -> bytes:
    """The JSON we answer VERSION with; it must stay shorter than QEMU's (214 bytes)."""
    caps = {
        "capabilities": {
            "max_msg_fds": MAX_MSG_FDS,
            "max_data_xfer_size": MAX_DATA_XFER_SIZE,
            "pgsizes": 4096,
            "max_dma_maps": 65535,
            "write_multiple": True,
        }
    }
    return json.dumps(caps, separators=(",", ":")).encode()


class ProtocolError(ErrnoError):
    """A request we refuse: answered with an error reply carrying ``errno``."""


class StreamError(Exception):
    """The byte stream cannot be trusted any more: the connection is closed."""
