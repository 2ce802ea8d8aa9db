"""What pci-epf-vntb and pci-epf-ntb share with the RC's ntb_hw_epf: ``struct epf_ntb_ctrl``,
the commands and their status, and the header both functions start from.

The RC reads and writes these fields at fixed offsets (drivers/ntb/hw/epf/ntb_hw_epf.c):
CMD_STATUS and LINK_STATUS are u16, DB_DATA/DB_OFFSET are indexed by interrupt slot, and
MW1_OFFSET (pci-epf-ntb only; "reserved" in vNTB) says where MW1 starts in the DB/MW1 BAR.
"""

from __future__ import annotations

from construct import Array, Int16ul, Int32ul, Int64ul, Struct

COMMAND_CONFIGURE_DOORBELL = 1
COMMAND_TEARDOWN_DOORBELL = 2
COMMAND_CONFIGURE_MW = 3
COMMAND_TEARDOWN_MW = 4
COMMAND_LINK_UP = 5
COMMAND_LINK_DOWN = 6
COMMAND_STATUS_OK = 1
COMMAND_STATUS_ERROR = 2
LINK_STATUS_UP = 1 << 0
COMMAND_NAMES = {COMMAND_CONFIGURE_DOORBELL: "CONFIGURE_DOORBELL",
                 COMMAND_TEARDOWN_DOORBELL: "TEARDOWN_DOORBELL",
                 COMMAND_CONFIGURE_MW: "CONFIGURE_MW", COMMAND_TEARDOWN_MW: "TEARDOWN_MW",
                 COMMAND_LINK_UP: "LINK_UP", COMMAND_LINK_DOWN: "LINK_DOWN"}

MAX_MW = 4
MAX_DB_COUNT = 32
PCI_BASE_CLASS_MEMORY = 0x05
PCI_ANY_ID = 0xFFFF

# struct epf_ntb_ctrl (__packed)
EpfNtbCtrl = Struct(
    "command" / Int32ul, "argument" / Int32ul, "command_status" / Int16ul,
    "link_status" / Int16ul, "topology" / Int32ul, "addr" / Int64ul, "size" / Int64ul,
    "num_mws" / Int32ul, "mw1_offset" / Int32ul, "spad_offset" / Int32ul,
    "spad_count" / Int32ul, "db_entry_size" / Int32ul,
    "db_data" / Array(MAX_DB_COUNT, Int32ul), "db_offset" / Array(MAX_DB_COUNT, Int32ul),
)
