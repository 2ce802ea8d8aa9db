"""A function's register block: a packed C struct in EP RAM, read and written by field name.

Functions keep their RC-visible registers in the EP RAM behind a BAR, as the kernel's do
(``struct pci_epf_test_reg``, ``struct epf_ntb_ctrl``).  The layout is declared once with
construct; fields are reached through the block's EP address on every access, never through
a kept view, because a directly mapped BAR may move EP RAM pages (``EpRam.place``).
"""

from __future__ import annotations

import functools

from construct import Array, Struct

from vfio_ep.epc.address_space import EpRam


def field_offsets(layout: Struct) -> dict[str, tuple[int, int]]:
    """{field: (offset, size of one element)} of a packed, fixed-size Struct."""
    out: dict[str, tuple[int, int]] = {}
    pos = 0
    for sub in layout.subcons:
        element = sub.subcon.subcon if isinstance(sub.subcon, Array) else sub
        out[sub.name] = (pos, element.sizeof())
        pos += sub.sizeof()
    return out


@functools.cache
def _layout(layout: Struct) -> tuple[dict[str, tuple[int, int]], int]:
    """A layout's field offsets and size, worked out once: construct's sizeof walks every
    field, and a block is made on each access of a function's registers (a doorbell's
    handler among them)."""
    return field_offsets(layout), layout.sizeof()


class RegisterBlock:
    """``layout`` at EP address ``addr`` of ``ram``; array fields take an index."""

    def __init__(self, layout: Struct, ram: EpRam, addr: int) -> None:
        self.fields, self.size = _layout(layout)
        self.ram = ram
        self.addr = addr

    def offset(self, name: str, index: int = 0) -> int:
        """Offset of ``name`` (element ``index``) from the start of the block."""
        off, size = self.fields[name]
        return off + index * size

    def get(self, name: str, index: int = 0) -> int:
        size = self.fields[name][1]
        return int.from_bytes(self.ram.read(self.addr + self.offset(name, index), size),
                              "little")

    def set(self, name: str, value: int, index: int = 0) -> None:
        size = self.fields[name][1]
        self.ram.write(self.addr + self.offset(name, index),
                       (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def __getitem__(self, name: str) -> int:
        return self.get(name)

    def __setitem__(self, name: str, value: int) -> None:
        self.set(name, value)
