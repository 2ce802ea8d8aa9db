"""pci-epf-vntb, as drivers/pci/endpoint/functions/pci-epf-vntb.c in Linux 7.3.4.

The RC sees an NTB endpoint that ``ntb_hw_epf`` drives (control BAR with ``epf_ntb_ctrl``
and both scratchpad arrays, a doorbell BAR, memory-window BARs); the EP gets a virtual NTB
device (:class:`VntbNtbDev`) that an EP-side client binds to, as the kernel's "pci-vntb"
driver registers one on its virtual PCI bus.  BAR assignment (including 7.3.4's skipped
last MW), the command protocol with u16 CMD_STATUS/LINK_STATUS, the legacy doorbell slot
layout (slot 0 link, slot 1 unused, DB#n on slot n+2), ``db_valid_mask``,
``db_vector_count``/``mask`` and the deferred ``peer_db_set`` follow the kernel.

Differences, all on purpose: COMMAND is trapped instead of polled every 5 ms; RC->EP
doorbells come from the project's doorbell API (``doorbell = msi | embedded | poll |
auto``), where ``poll`` (and ``auto`` when no interrupt doorbell exists) selects the
kernel's own polled doorbell BAR, scanned every ``doorbell_poll_interval_us`` (5 ms by
default, as the kernel's command handler scans it); guest input
the kernel would act on blindly (a memory window index or size out of range) gets
CMD_STATUS ERROR and a log line; and losing the PCIe link (the RC's QEMU went away) takes
the NTB link down, so EP clients see the peer leave.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Annotated, Any

import trio

from vfio_ep.config import S32, U8, U16, U32, U64, ConfigError, Range, parse_int
from vfio_ep.epc.address_space import PAGE, AddressError, Watch
from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.core import EpcError, IrqType
from vfio_ep.epc.doorbell import PolledWords
from vfio_ep.epc.features import NO_BAR, get_next_free_bar
from vfio_ep.epc.irq import IRQ_HANDLED, IrqError
from vfio_ep.epf.command import TrappedCommand
from vfio_ep.epf.core import PciEpf, required_bar_size
from vfio_ep.epf.doorbell import CHOICES as DOORBELL_CHOICES
from vfio_ep.epf.doorbell import DoorbellError, pci_epf_alloc_doorbell, pci_epf_free_doorbell
from vfio_ep.epf.functions.ntb_ctrl import (
    COMMAND_CONFIGURE_DOORBELL,
    COMMAND_CONFIGURE_MW,
    COMMAND_LINK_DOWN,
    COMMAND_LINK_UP,
    COMMAND_NAMES,
    COMMAND_STATUS_ERROR,
    COMMAND_STATUS_OK,
    COMMAND_TEARDOWN_DOORBELL,
    COMMAND_TEARDOWN_MW,
    LINK_STATUS_UP,
    MAX_DB_COUNT,
    MAX_MW,
    PCI_ANY_ID,
    PCI_BASE_CLASS_MEMORY,
    EpfNtbCtrl,
)
from vfio_ep.epf.regs import RegisterBlock
from vfio_ep.ntb.clients import NtbClientAttributes, create_client
from vfio_ep.ntb.core import SZ_4K, NtbDev, NtbIoError
from vfio_ep.pci.bar import NUM_BARS, PCI_BASE_ADDRESS_MEM_TYPE_64
from vfio_ep.pci.device import FunctionAttributes
from vfio_ep.pci.host import RcBusError

log = logging.getLogger(__name__)

EPF_IRQ_LINK, EPF_IRQ_RESERVED_DB, EPF_IRQ_DB_START = 0, 1, 2  # the legacy slot layout
MIN_DB_COUNT = EPF_IRQ_DB_START + 1
VNTB_MSI_VECTORS = 16  # epf_ntb_configure_interrupt: pci_epc_set_msi(..., 16)
VNTB_PEER_DB_WORK_BUDGET = 5

# enum epf_ntb_bar: the slots of epf_ntb_bar[]
BAR_CONFIG, BAR_DB, BAR_MW1 = 0, 1, 2
VNTB_BAR_NUM = 6

CTRL_SIZE = (EpfNtbCtrl.sizeof() + 3) // 4 * 4  # ALIGN(sizeof(struct epf_ntb_ctrl), 4)

# EPF_NTB_BAR_W: kstrtoint, then NO_BAR..BAR_5.
BAR_OR_AUTO = Range(NO_BAR, NUM_BARS - 1, why="-1: the first free one")

# The attributes configfs shows in functions/pci_epf_vntb/<func>/pci_epf_vntb.<N>/.
CFS_ATTRIBUTES = ("spad_count", "db_count", "num_mws", "mw1", "mw2", "mw3", "mw4",
                  "vbus_number", "vntb_pid", "vntb_vid", "ctrl_bar", "db_bar", "mw1_bar",
                  "mw2_bar", "mw3_bar", "mw4_bar")


@dataclass(frozen=True)
class PciEpfVntbAttributes(FunctionAttributes, NtbClientAttributes):
    """configfs (kernel defaults: IDs ffff:ffff, class 05 memory, db_count 0 = unset), the
    doorbell backend, and the EP-side NTB client (:mod:`vfio_ep.ntb.clients`)."""

    vendorid: U16 = PCI_ANY_ID
    deviceid: U16 = PCI_ANY_ID
    baseclass_code: U8 = PCI_BASE_CLASS_MEMORY
    spad_count: U32 = 0
    # The store's own check; the kernel's default 0 (unset) fails at bind.
    db_count: Annotated[U32, Range(MIN_DB_COUNT, MAX_DB_COUNT, why="it counts the link and "
                                   "the reserved slot: 4 gives 2 doorbells")] = 0
    num_mws: Annotated[U32, Range(0, MAX_MW)] = 0
    mw1: U64 = 0
    mw2: U64 = 0
    mw3: U64 = 0
    mw4: U64 = 0
    vbus_number: U32 = 0xFF
    vntb_pid: U32 = 0
    vntb_vid: U32 = 0
    ctrl_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    db_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    mw1_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    mw2_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    mw3_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    mw4_bar: Annotated[S32, BAR_OR_AUTO] = NO_BAR
    doorbell: str = "auto"

    def __post_init__(self) -> None:
        """The checks of the configfs stores that involve more than one attribute."""
        NtbClientAttributes.__post_init__(self)
        if self.doorbell not in DOORBELL_CHOICES:
            raise ValueError(f"doorbell must be one of {', '.join(DOORBELL_CHOICES)}")
        for n in range(1, MAX_MW + 1):
            if getattr(self, f"mw{n}") and n > self.num_mws:
                raise ValueError(f"mw{n} set but num_mws is {self.num_mws}: -ERANGE (set "
                                 "num_mws first)")


# vfio-ep's defaults for the flat and TOML forms (a configfs script starts from the kernel's):
# the seeds' R-Car setup, which ntb_hw_epf binds with its 1912:0030 BAR map (0/4/2).
DEFAULTS: dict[str, Any] = {
    "vendorid": 0x1912, "deviceid": 0x0030, "msi_interrupts": 32, "db_count": 4,
    "spad_count": 128, "num_mws": 1, "mw1": 0x100000, "vntb_vid": 0x1912, "vntb_pid": 0x0030,
    "vbus_number": 0x10, "ctrl_bar": 0, "db_bar": 4, "mw1_bar": 2,
}


# The controller attributes pci-epf-vntb brings when unset: the kernel's polled doorbell BAR
# is scanned by epf_ntb_cmd_handler, which re-queues itself every 5 ms without an MSI
# doorbell (the seeds measured 4-12 ms round trips on R-Car with it, 0.9 ms with MSI).
CONTROLLER_DEFAULTS: dict[str, Any] = {"doorbell_poll_interval_us": 5000}


def store(values: dict[str, Any], key: str, linked: bool) -> None:
    """One configfs write into pci_epf_vntb.N/ (its value checked already against the
    attribute's declaration), checked further as the kernel's _store functions."""
    if linked:
        raise ConfigError(f"{key}: -EOPNOTSUPP, the function is linked to a controller "
                          "already (7.3.4 refuses stores once attached)")
    if key in ("mw1", "mw2", "mw3", "mw4") and int(key[2]) > parse_int(
            values.get("num_mws", 0)):
        raise ConfigError(f"{key}: -ERANGE, MW{key[2]} out of range (num_mws="
                          f"{values.get('num_mws', 0)}): write num_mws first")


def probe(a: PciEpfVntbAttributes) -> PciEpfVntb:
    """epf_ntb_probe(): the function with its configfs values, not yet bound."""
    return PciEpfVntb(a)


class PciEpfVntb(PciEpf):
    name = "pci_epf_vntb"

    def __init__(self, a: PciEpfVntbAttributes) -> None:
        super().__init__(a.header(), a.msi_interrupts, a.msix_interrupts, a.doorbell)
        self.attrs = a
        self.spad_count = a.spad_count
        self.db_count = a.db_count
        self.num_mws = a.num_mws
        self.mws_size = [a.mw1, a.mw2, a.mw3, a.mw4]
        self.epf_ntb_bar = [a.ctrl_bar, a.db_bar, a.mw1_bar, a.mw2_bar, a.mw3_bar, a.mw4_bar]
        self.vpci_mw_phy = [0] * MAX_MW
        self.msi_doorbell = False
        self.db = 0  # atomic64 db: doorbell bits the RC rang, for db_read/db_clear
        self.peer_db_pending = 0
        self._peer_db_work = False
        self.epf_db: int | None = None  # polled doorbell entries (EP address)
        self.ntb: VntbNtbDev | None = None
        self._watch: Watch | None = None
        self.command: TrappedCommand | None = None  # made at bind, named after the tag
        self._db_poll: PolledWords | None = None  # the polled doorbell BAR's slots

    @property
    def reg(self) -> RegisterBlock:
        """struct epf_ntb_ctrl at the start of the config BAR."""
        b = self.bar[self.epf_ntb_bar[BAR_CONFIG]]
        assert b is not None
        return RegisterBlock(EpfNtbCtrl, self.controller.ram, b.phys_addr)

    def facts(self) -> dict[str, object]:
        """Its driver, the doorbell backend it got ("poll" when none: it polls its BAR), how
        many doorbells the peer can ring (its db_count less the link and reserved slots),
        and whether they share one register (the embedded doorbell: any ring sets them
        all)."""
        return super().facts() | {"doorbell": self.db_backend or "poll",
                                  "doorbells": self.db_count - EPF_IRQ_DB_START,
                                  "db_shared": self.db_backend == "embedded"}

    # -- bind: BARs, interrupts, doorbells, memory windows, the NTB device ------------
    def bind(self) -> None:
        """epf_ntb_bind(); raises EpcError with the errno the kernel's bind returns."""
        self._init_epc_bar()
        self._config_spad_bar_alloc()
        self._epc_init()
        self.ntb = VntbNtbDev(self)
        log.info("%s: virtual NTB device %02x:00.0 [%04x:%04x] registered", self.tag,
                 self.attrs.vbus_number, self.attrs.vntb_vid, self.attrs.vntb_pid)
        if self.attrs.ntb_client != "none":
            self.ntb.register_client(create_client(self.attrs))
        # The command handler: trapped COMMAND, plus the doorbell poller when polling.
        self.command = TrappedCommand(self.spawn, self._handle_command, f"{self.tag}-cmd")
        self._watch = self.controller.space.watch(self.reg.addr + self.reg.offset("command"),
                                                  4, self.command.written)
        if not self.msi_doorbell:
            self._start_doorbell_poll()

    def _init_epc_bar(self) -> None:
        """epf_ntb_init_epc_bar(): explicit BARs first, the mandatory ones automatically."""
        self._check_explicit_bars()
        features = self.features
        barno = 0
        for bar in (BAR_CONFIG, BAR_DB, BAR_MW1):
            barno = self._find_bar(features, bar, barno)
            if barno < 0:
                raise EpcError(errno.ENOENT, "Fail to get NTB function BAR")
        # 7.3.4 starts the optional loop at the MW1 slot, so the last MW never gets a BAR.
        for i, bar in enumerate(range(BAR_MW1, BAR_MW1 + self.num_mws - 1), start=1):
            barno = self._find_bar(features, bar, barno)
            if barno < 0:
                self.num_mws = i
                log.info("%s: BAR not available for > MW%d", self.tag, i + 1)
        for i in range(self.num_mws):
            if self.epf_ntb_bar[BAR_MW1 + i] == NO_BAR:
                raise EpcError(errno.EINVAL, f"MW{i + 1} got no BAR: Linux 7.3.4's automatic "
                               "assignment skips the last memory window (it would index "
                               f"bar[-1]); set mw{i + 1}_bar")

    def _check_explicit_bars(self) -> None:
        """Each region a BAR of its own: 7.3.4 takes two slots naming one BAR as written and
        lays both regions over each other (the ctrl block in the doorbell BAR, say)."""
        names = ("ctrl_bar", "db_bar", *(f"mw{i + 1}_bar" for i in range(self.num_mws)))
        seen: dict[int, str] = {}
        for name, barno in zip(names, self.epf_ntb_bar, strict=False):
            if barno in seen:
                raise EpcError(errno.EINVAL, f"{seen[barno]} and {name} are both BAR{barno}: "
                               "each NTB region needs a BAR of its own")
            if barno != NO_BAR:
                seen[barno] = name

    def _find_bar(self, features: Any, bar: int, barno: int) -> int:
        """epf_ntb_find_bar()."""
        while self.epf_ntb_bar[bar] < 0:
            barno = get_next_free_bar(features, barno)
            if barno < 0:
                break
            if barno not in self.epf_ntb_bar:
                self.epf_ntb_bar[bar] = barno
            barno += 1
        return barno

    def _config_spad_bar_alloc(self) -> None:
        """epf_ntb_config_spad_bar_alloc(): ctrl + 2 scratchpad arrays, then the ctrl
        fields the RC reads at probe."""
        features = self.features
        barno = self.epf_ntb_bar[BAR_CONFIG]
        if self.alloc_space(CTRL_SIZE + 2 * self.spad_count * 4, barno, features) is None:
            raise EpcError(errno.ENOMEM, "Config/Status/SPAD alloc region fail")
        reg = self.reg
        reg["spad_offset"] = CTRL_SIZE
        reg["spad_count"] = self.spad_count
        reg["num_mws"] = self.num_mws
        reg["db_entry_size"] = 4
        for i in range(self.db_count):
            reg.set("db_data", 1 + i, i)
            reg.set("db_offset", 0, i)

    def _epc_init(self) -> None:
        """epf_ntb_epc_init()."""
        epc = self.controller
        self._set_bar(self.epf_ntb_bar[BAR_CONFIG])
        features = self.features
        if not (features.msix_capable or features.msi_capable):
            raise EpcError(errno.EINVAL, "MSI or MSI-X is required for doorbell")
        if features.msi_capable:
            epc.set_msi(self.func_no, self.vfunc_no, VNTB_MSI_VECTORS)
        self._db_bar_init()
        self._mw_bar_init()
        epc.write_header(self.func_no, self.vfunc_no, self.header)

    def _set_bar(self, barno: int) -> None:
        b = self.bar[barno]
        assert b is not None
        self.controller.set_bar(self.func_no, self.vfunc_no, b)

    # -- RC -> EP doorbells ---------------------------------------------------
    def _db_bar_init(self) -> None:
        """epf_ntb_db_bar_init(): an interrupt doorbell, else the polled doorbell BAR."""
        if self.doorbell != "poll":
            try:
                self._db_bar_init_msi_doorbell()
                return
            except (DoorbellError, EpcError, IrqError) as e:
                log.info("%s: no interrupt doorbell (%s): polling the doorbell BAR every "
                         "%.0f us", self.tag, e, self.controller.doorbell_poll_interval * 1e6)
        else:
            log.info("%s: doorbell = poll: polling the doorbell BAR every %.0f us", self.tag,
                     self.controller.doorbell_poll_interval * 1e6)
        barno = self.epf_ntb_bar[BAR_DB]
        b = self.alloc_space(4 * self.db_count, barno, self.features)
        if b is None:
            raise EpcError(errno.ENOMEM, "Failed to allocate OB address")
        self.epf_db = b.phys_addr
        self.controller.set_bar(self.func_no, self.vfunc_no, b)

    def _db_bar_init_msi_doorbell(self) -> None:
        """epf_ntb_db_bar_init_msi_doorbell()."""
        epc = self.controller
        barno = self.epf_ntb_bar[BAR_DB]
        pci_epf_alloc_doorbell(self, self.db_count, allow_poll=False)
        requested: list[int] = []
        try:
            if self.db_msg[0].bar not in (NO_BAR, barno):
                raise EpcError(errno.EINVAL, f"the doorbell is pre-exposed in BAR"
                               f"{self.db_msg[0].bar}, not in db_bar {barno}")
            for msg in self.db_msg:
                if msg.virq not in requested:
                    epc.irqs.request_irq(msg.virq, self._doorbell_handler, msg.irq_flags,
                                         "pci_epf_vntb_db", self)
                    requested.append(msg.virq)
            reg = self.reg
            if self.db_msg[0].bar != NO_BAR:
                for i, msg in enumerate(self.db_msg):
                    reg.set("db_data", msg.msg.data, i)
                    reg.set("db_offset", msg.offset, i)
            else:
                addrs = [m.msg.address for m in self.db_msg]
                self._assign_bar_space(max(addrs) - min(addrs) + 4, barno, min(addrs))
                self._set_bar(barno)
                for i, msg in enumerate(self.db_msg):
                    _, offset = self.align_inbound_addr(barno, msg.msg.address)
                    reg.set("db_data", msg.msg.data, i)
                    reg.set("db_offset", offset, i)
            reg["db_entry_size"] = 0
            self.msi_doorbell = True
            log.info("%s: %s doorbells in BAR%d", self.tag, self.db_backend, barno)
        except (EpcError, IrqError):
            for virq in requested:
                epc.irqs.free_irq(virq, self)
            pci_epf_free_doorbell(self)
            raise

    def _assign_bar_space(self, size: int, barno: int, bar_addr: int) -> None:
        """pci_epf_assign_bar_space(): a BAR (no memory of its own) onto [bar_addr, +size)."""
        limit = bar_addr + size - 1
        pos = max((limit ^ bar_addr).bit_length() - 1, 0)
        try:
            bar_size, mem_size = required_bar_size(1 << (pos + 1), barno,
                                                   self.features)
        except ValueError as e:
            raise EpcError(errno.ENOMEM, str(e)) from None
        phys = bar_addr // mem_size * mem_size
        if phys + bar_size < limit:
            raise EpcError(errno.ENOMEM, f"BAR{barno} of {bar_size:#x} bytes cannot cover "
                           f"[{bar_addr:#x}, {limit:#x}]")
        flags = PCI_BASE_ADDRESS_MEM_TYPE_64 if (
            size >> 32 or self.features.bar[barno].only_64bit) else 0
        self.bar[barno] = PciEpfBar(barno, phys, bar_size, mem_size, flags,
                                    doorbell_addrs=frozenset(m.msg.address
                                                             for m in self.db_msg))

    def _doorbell_handler(self, virq: int, dev_id: object) -> int:
        """epf_ntb_doorbell_handler(): slot i >= 2 is doorbell vector i - 2."""
        if self.ntb is None:
            return IRQ_HANDLED
        for i in range(EPF_IRQ_DB_START, self.db_count):
            if virq == self.db_msg[i].virq:
                log.debug("%s: doorbell slot %d (DB#%d)", self.tag, i, i - EPF_IRQ_DB_START)
                self.db |= 1 << (i - EPF_IRQ_DB_START)
                self.ntb.db_event(i - EPF_IRQ_DB_START)
        return IRQ_HANDLED

    def _start_doorbell_poll(self) -> None:
        """The polled doorbell BAR's slots (DB#0 on) watched by the C poller, which wakes
        the event loop only once one is rung (each period on the Python path)."""
        assert self.epf_db is not None
        epc = self.controller
        self._db_poll = PolledWords(epc.ram, self.epf_db + 4 * EPF_IRQ_DB_START,
                                    self.db_count - EPF_IRQ_DB_START,
                                    epc.doorbell_poll_interval)
        epc.spawn(self._poll_doorbells, f"{self.tag}-db-poll")

    async def _poll_doorbells(self) -> None:
        """The polled doorbell BAR: entry i nonzero means slot i was rung (DB#i-2)."""
        words, ntb = self._db_poll, self.ntb
        assert words is not None and ntb is not None
        while True:
            await words.wait()
            for bit in range(words.count):
                if words.take(bit):
                    self.db |= 1 << bit
                    ntb.db_event(bit)

    # -- memory windows -------------------------------------------------------
    def _mw_bar_init(self) -> None:
        """epf_ntb_mw_bar_init(): each MW BAR (no backing until the EP's mw_set_trans), and
        an outbound window the EP writes the RC's buffer through."""
        epc = self.controller
        for i in range(self.num_mws):
            size = self.mws_size[i]
            barno = self.epf_ntb_bar[BAR_MW1 + i]
            self.bar[barno] = PciEpfBar(barno, 0, size,
                                        flags=PCI_BASE_ADDRESS_MEM_TYPE_64 if size >> 32 else 0)
            self._set_bar(barno)
            phys = epc.mem_alloc_addr(size)
            if phys is None:
                raise EpcError(errno.ENOMEM, f"Failed to allocate source address for MW{i + 1}"
                               f" ({size:#x} bytes of outbound space)")
            self.vpci_mw_phy[i] = phys

    # -- the command handler --------------------------------------------------
    async def _handle_command(self) -> None:
        """epf_ntb_cmd_handler(): one command, its status in CMD_STATUS."""
        reg = self.reg
        command = reg["command"]
        if not command:
            return
        argument = reg["argument"]
        reg["command"] = 0
        reg["argument"] = 0
        name = COMMAND_NAMES.get(command, f"command {command}")
        if command in (COMMAND_CONFIGURE_DOORBELL, COMMAND_TEARDOWN_DOORBELL):
            status = COMMAND_STATUS_OK
        elif command == COMMAND_CONFIGURE_MW:
            status = self._configure_mw(argument, reg["addr"], reg["size"])
        elif command == COMMAND_TEARDOWN_MW:
            if argument < self.num_mws:
                self.controller.unmap_addr(self.func_no, self.vfunc_no, self.vpci_mw_phy[argument])
            else:
                log.warning("%s: TEARDOWN_MW of MW index %d (num_mws %d) ignored", self.tag,
                            argument, self.num_mws)
            status = COMMAND_STATUS_OK
        elif command in (COMMAND_LINK_UP, COMMAND_LINK_DOWN):
            self._set_link(command == COMMAND_LINK_UP)
            status = COMMAND_STATUS_OK
        else:
            log.error("%s: UNKNOWN command: %d (no status: the RC times out)", self.tag,
                      command)
            return
        reg["command_status"] = status
        log.debug("%s: %s(%#x) -> %s", self.tag, name, argument,
                  "OK" if status == COMMAND_STATUS_OK else "ERROR")

    def _configure_mw(self, mw: int, addr: int, size: int) -> int:
        """epf_ntb_configure_mw(): the outbound window of MW ``mw`` onto the RC's buffer."""
        if mw >= self.num_mws or not 0 < size <= self.mws_size[mw]:
            log.warning("%s: CONFIGURE_MW %d [%#x+%#x] refused: %d memory windows of %s "
                        "bytes", self.tag, mw, addr, size, self.num_mws,
                        "/".join(f"{s:#x}" for s in self.mws_size[:self.num_mws]))
            return COMMAND_STATUS_ERROR
        try:
            self.controller.map_addr(self.func_no, self.vfunc_no, self.vpci_mw_phy[mw], addr, size)
        except EpcError as e:  # no free outbound iATU region
            log.error("%s: Failed to map memory window %d address: %s", self.tag, mw, e)
            return COMMAND_STATUS_ERROR
        return COMMAND_STATUS_OK

    def _set_link(self, up: bool) -> None:
        """epf_ntb_link_up(): LINK_STATUS, then the EP client's link event."""
        reg = self.reg
        status = reg["link_status"]
        reg["link_status"] = status | LINK_STATUS_UP if up else status & ~LINK_STATUS_UP
        log.info("%s: NTB link %s", self.tag, "up" if up else "down")
        if self.ntb is not None:
            self.ntb.link_event()

    # -- controller events ----------------------------------------------------
    def epc_deinit(self) -> None:
        """PERST#: a command in flight is dropped (the host that sent it is resetting)."""
        if self.command is not None:
            self.command.reset()

    def link_down(self) -> None:
        """The PCIe link went away (the RC's QEMU is gone): the NTB link with it."""
        if self.bar[self.epf_ntb_bar[BAR_CONFIG]] is not None and \
                self.reg["link_status"] & LINK_STATUS_UP:
            self._set_link(False)

    # -- EP -> RC doorbells ---------------------------------------------------
    def peer_db_set(self, bits: int) -> None:
        """vntb_epf_peer_db_set(): coalesce, raise from a work item."""
        bits &= self.ntb.db_valid_mask() if self.ntb else 0
        if bits:
            self.peer_db_pending |= bits
            self._queue_peer_db_work()

    def _queue_peer_db_work(self) -> None:
        if not self._peer_db_work:
            self._peer_db_work = True
            self.controller.spawn(self._peer_db_worker, f"{self.tag}-peer-db")

    async def _peer_db_worker(self) -> None:
        """vntb_epf_peer_db_work(): MSI bit + 3 (slot bit + 2) per pending bit, lowest first."""
        try:
            for _ in range(VNTB_PEER_DB_WORK_BUDGET):
                bits, self.peer_db_pending = self.peer_db_pending, 0
                if not bits:
                    return
                while bits:
                    bit = (bits & -bits).bit_length() - 1
                    bits &= bits - 1
                    interrupt_num = bit + EPF_IRQ_DB_START + 1
                    try:
                        self.controller.raise_irq(self.func_no, self.vfunc_no, IrqType.MSI,
                                                  interrupt_num)
                    except EpcError as e:
                        log.error("%s: Failed to raise IRQ for interrupt_num %d: %s", self.tag,
                                  interrupt_num, e)
                await trio.sleep(0)
        finally:
            self._peer_db_work = False
        if self.peer_db_pending:  # the budget ran out: requeue, as queue_work() does
            self._queue_peer_db_work()


class VntbNtbDev(NtbDev):
    """The virtual NTB device the EP's clients see (vntb_epf_ops)."""

    def __init__(self, epf: PciEpfVntb) -> None:
        # pci_name() of the function on the virtual bus: the name EP clients' debugfs uses.
        super().__init__(f"0000:{epf.attrs.vbus_number:02x}:00.0", epf.controller.spawn)
        self.epf = epf
        self.epc = epf.controller

    def _ctrl(self) -> tuple[RegisterBlock, int, int]:
        reg = self.epf.reg
        return reg, reg["spad_offset"], reg["spad_count"]

    def _spad_addr(self, idx: int, peer: bool) -> int:
        reg, off, count = self._ctrl()
        if not 0 <= idx < count:
            raise IndexError(f"scratchpad {idx} out of range ({count})")
        return reg.addr + off + (0 if peer else count * 4) + 4 * idx

    def mw_count(self, pidx: int = 0) -> int:
        return self.epf.num_mws

    def mw_get_align(self, pidx: int, idx: int) -> tuple[int, int, int]:
        return SZ_4K, 1, self.epf.mws_size[idx]

    def mw_set_trans(self, pidx: int, idx: int, addr: int, size: int) -> None:
        """vntb_epf_mw_set_trans(): the MW BAR's inbound translation onto ``addr``."""
        barno = self.epf.epf_ntb_bar[BAR_MW1 + idx]
        b = self.epf.bar[barno]
        assert b is not None
        b.phys_addr, b.size = addr, size
        try:
            self.epc.set_bar(0, 0, b)  # func 0 hard-coded, as in 7.3.4
        except EpcError as e:
            raise OSError(e.errno, f"failure set mw trans: {e}") from None

    def mw_clear_trans(self, pidx: int, idx: int) -> None:
        """A no-op in 7.3.4: the BAR keeps pointing at the old buffer."""

    def peer_mw_count(self) -> int:
        return self.epf.num_mws

    def peer_mw_get_addr(self, idx: int) -> tuple[int, int]:
        return self.epf.vpci_mw_phy[idx], self.epf.mws_size[idx]

    def link_is_up(self) -> bool:
        return bool(self.epf.reg["link_status"])

    def link_enable(self) -> None:
        """A no-op: the EP cannot bring the link up; the RC's LINK_UP does."""

    def link_disable(self) -> None:
        """A no-op, as link_enable."""

    def db_vector_count(self) -> int:
        count = self.epf.db_count
        return count - EPF_IRQ_DB_START if MIN_DB_COUNT <= count <= MAX_DB_COUNT else 0

    def db_valid_mask(self) -> int:
        return (1 << self.db_vector_count()) - 1

    def db_vector_mask(self, vector: int) -> int:
        return 1 << vector if 0 <= vector < self.db_vector_count() else 0

    def db_read(self) -> int:
        return self.epf.db

    def db_clear(self, bits: int) -> None:
        self.epf.db &= ~bits

    def peer_db_set(self, bits: int) -> None:
        self.epf.peer_db_set(bits)

    def spad_count(self) -> int:
        return self.epf.spad_count

    def spad_read(self, idx: int) -> int:
        """The second array: what the RC writes as its peer scratchpads."""
        return int.from_bytes(self.epc.ram.read(self._spad_addr(idx, peer=False), 4), "little")

    def spad_write(self, idx: int, value: int) -> None:
        self.epc.ram.write(self._spad_addr(idx, peer=False), (value & 0xFFFFFFFF).to_bytes(4,
                                                                                   "little"))

    def peer_spad_read(self, pidx: int, idx: int) -> int:
        """The first array: the RC's own scratchpads."""
        return int.from_bytes(self.epc.ram.read(self._spad_addr(idx, peer=True), 4), "little")

    def peer_spad_write(self, pidx: int, idx: int, value: int) -> None:
        self.epc.ram.write(self._spad_addr(idx, peer=True), (value & 0xFFFFFFFF).to_bytes(4,
                                                                                  "little"))

    def dma_alloc(self, size: int, align: int) -> int:
        return self.epc.ram.alloc(size, align=max(align, PAGE))

    def dma_free(self, addr: int, size: int) -> None:
        self.epc.ram.free(addr, size)

    def mem_read(self, addr: int, size: int) -> bytes:
        return self.epc.ram.read(addr, size)

    def mem_write(self, addr: int, data: bytes | memoryview) -> None:
        self.epc.ram.write(addr, data)

    async def io_read(self, addr: int, size: int) -> bytes:
        try:
            return await self.epc.space.read(addr, size)
        except (AddressError, RcBusError) as e:
            raise NtbIoError(errno.EFAULT, str(e)) from None

    async def io_write(self, addr: int, data: bytes | memoryview) -> None:
        try:
            await self.epc.space.write(addr, data)
        except (AddressError, RcBusError) as e:
            raise NtbIoError(errno.EFAULT, str(e)) from None

