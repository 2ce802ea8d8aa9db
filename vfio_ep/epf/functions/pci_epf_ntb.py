"""pci-epf-ntb, as drivers/pci/endpoint/functions/pci-epf-ntb.c in Linux 7.3.4: one function,
two controllers, two hosts talking through NTB.

Each host (a guest on its own socket) sees the J721E layout ntb_hw_epf expects: BAR0 the
control block (``epf_ntb_ctrl``, the MSI-X table, its own scratchpads), BAR1 a window onto
the other host's scratchpads, BAR2 the doorbell slots then MW1 at MW1_OFFSET, BAR3-5 MW2-4.
Both controllers sit on one SoC, so a host's DB/MW BARs translate into the *other*
controller's outbound aperture: whatever that controller's iATU maps there (the other
host's buffer after its CONFIGURE_MW, its MSI after its CONFIGURE_DOORBELL) is what the
host's writes reach.  Commands are trapped per interface instead of polled every 5 ms.

Emulation where 7.3.4 needs hardware: CONFIGURE_DOORBELL maps the doorbell slots with the
controller's ``map_msi_irq`` (Cadence's in 7.3.4, which vfio-ep's controller implements for
MSI and, since only QEMU sees the MSI-X table, for MSI-X too).  Guest input the kernel acts
on blindly (a memory window index out of range) gets CMD_STATUS ERROR.  A host that goes
away (QEMU gone, or a device reset on reboot) takes the link down on both sides, and the
other host gets the link interrupt, so it never waits on a dead peer.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from functools import partial
from typing import Annotated, Any

from vfio_ep.config import U8, U16, U32, U64, ConfigError, Range, parse_int
from vfio_ep.epc.address_space import Watch
from vfio_ep.epc.bar import PciEpfBar
from vfio_ep.epc.core import EpcError, EpcEvents, IrqType, PciEpc
from vfio_ep.epc.features import EpcFeatures, get_next_free_bar
from vfio_ep.epf.command import TrappedCommand
from vfio_ep.epf.core import PRIMARY_INTERFACE, SECONDARY_INTERFACE, PciEpf
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
from vfio_ep.pci.capabilities import PCI_MSIX_ENTRY_SIZE
from vfio_ep.pci.device import FunctionAttributes

# enum epf_ntb_bar
BAR_CONFIG, BAR_PEER_SPAD, BAR_DB_MW1, BAR_MW2, BAR_MW3, BAR_MW4 = range(6)
NTB_MW_OFFSET = 2  # MW i is epf_ntb_bar[i + NTB_MW_OFFSET]
DB_COUNT_MASK = 0xFFFF
MSIX_ENABLE = 1 << 16
LINK_IRQ = 1  # pci_epc_raise_irq(..., 1): slot 0, the link event
INTERFACE = ("PRIMARY", "SECONDARY")

CFS_ATTRIBUTES = ("db_count", "spad_count", "num_mws", "mw1", "mw2", "mw3", "mw4")


@dataclass(frozen=True)
class PciEpfNtbAttributes(FunctionAttributes):
    """configfs (kernel defaults: IDs ffff:ffff, class 05 memory, counts 0)."""

    vendorid: U16 = PCI_ANY_ID
    deviceid: U16 = PCI_ANY_ID
    baseclass_code: U8 = PCI_BASE_CLASS_MEMORY
    # The store takes any u32; the bind refuses the rest (the default 0 too).
    db_count: Annotated[U32, Range(1, MAX_DB_COUNT, why="checked at bind; ntb_hw_epf needs "
                                   "4 or more")] = 0
    spad_count: U32 = 0
    num_mws: Annotated[U32, Range(0, MAX_MW)] = 0
    mw1: U64 = 0
    mw2: U64 = 0
    mw3: U64 = 0
    mw4: U64 = 0

    def __post_init__(self) -> None:
        for n in range(self.num_mws + 1, MAX_MW + 1):
            if getattr(self, f"mw{n}"):
                raise ValueError(f"mw{n} set but num_mws is {self.num_mws}: -EINVAL")
        if self.num_mws < 1 or not self.mw1:
            raise ValueError("pci-epf-ntb needs num_mws >= 1 and mw1: MW1 shares BAR2 with "
                             "the doorbells")


# vfio-ep's defaults for the flat and TOML forms (a configfs script starts from the kernel's):
# ntb_hw_epf's J721E IDs, the only map with a peer-scratchpad BAR.
DEFAULTS: dict[str, Any] = {
    "vendorid": 0x104C, "deviceid": 0xB00D, "msi_interrupts": 32, "msix_interrupts": 32,
    "db_count": 16, "spad_count": 64, "num_mws": 1, "mw1": 0x100000,
}


def store(values: dict[str, Any], key: str, linked: bool) -> None:
    """One configfs write into pci_epf_ntb.N/ (its value checked already against the
    attribute's declaration), checked further as the kernel's _store functions."""
    if key in ("mw1", "mw2", "mw3", "mw4") and int(key[2]) > parse_int(
            values.get("num_mws", 0)):
        raise ConfigError(f"{key}: -EINVAL, MW{key[2]} beyond num_mws="
                          f"{values.get('num_mws', 0)}: write num_mws first")


def probe(a: PciEpfNtbAttributes) -> PciEpfNtb:
    """epf_ntb_probe()."""
    return PciEpfNtb(a)


@dataclass
class NtbInterface:
    """struct epf_ntb_epc: one side of the bridge."""

    ntb: PciEpfNtb
    type: int
    epc: PciEpc
    func_no: int
    features: EpcFeatures
    epf_bar: list[PciEpfBar | None]
    epf_ntb_bar: list[int] = field(default_factory=lambda: [-1] * 6)
    linkup: bool = False
    is_msix: bool = False
    msix_bar: int = -1
    msix_table_offset: int = 0
    spad_size: int = 0
    peer_mem: dict[int, tuple[int, int]] = field(default_factory=dict)  # barno -> (phys, size)
    watch: Watch | None = None
    command: TrappedCommand = field(init=False)

    def __post_init__(self) -> None:
        self.command = TrappedCommand(self.epc.spawn, partial(self.ntb._handle_command, self),
                                      f"{self.ntb.tag}-{self.name.lower()}-cmd")

    @property
    def name(self) -> str:
        return INTERFACE[self.type]

    @property
    def reg(self) -> RegisterBlock:
        b = self.epf_bar[self.epf_ntb_bar[BAR_CONFIG]]
        assert b is not None
        return RegisterBlock(EpfNtbCtrl, self.epc.ram, b.phys_addr)

    def bar(self, which: int) -> PciEpfBar:
        b = self.epf_bar[self.epf_ntb_bar[which]]
        assert b is not None
        return b

    # -- EpcEvents: what this side's controller says ----------------------------
    def epc_init(self) -> None:
        """PERST# is over (a reset finished): nothing to redo, the host reconfigures."""

    def epc_deinit(self) -> None:
        """A device reset (the host reboots): its command in flight is dropped, and this
        host is gone for the link."""
        self.command.reset()
        self.ntb.host_gone(self)

    def link_up(self) -> None:
        """The host's QEMU connected; the NTB link waits for its LINK_UP command."""

    def link_down(self) -> None:
        """The host's QEMU went away."""
        self.ntb.host_gone(self)


class PciEpfNtb(PciEpf):
    name = "pci_epf_ntb"

    def __init__(self, a: PciEpfNtbAttributes) -> None:
        super().__init__(a.header(), a.msi_interrupts, a.msix_interrupts)
        self.db_count = a.db_count
        self.spad_count = a.spad_count
        self.num_mws = a.num_mws
        self.mws_size = [a.mw1, a.mw2, a.mw3, a.mw4]
        self.intf: list[NtbInterface] = []

    def events_for(self, interface: int) -> Any:
        """Each controller's events go to the interface on it (created at bind)."""
        return _InterfaceEvents(self, interface)

    # -- bind ---------------------------------------------------------------------
    def bind(self) -> None:
        """epf_ntb_bind(): nothing until both controllers are linked."""
        if self.epc is None or self.sec_epc is None:
            return
        for epc, func_no, bars, t in ((self.epc, self.func_no, self.bar, PRIMARY_INTERFACE),
                                      (self.sec_epc, self.sec_epc_func_no, self.sec_epc_bar,
                                       SECONDARY_INTERFACE)):
            self.intf.append(NtbInterface(self, t, epc, func_no,
                                          epc.get_features(func_no, self.vfunc_no), bars))
        for x in self.intf:
            self._init_epc_bar(x)
        for x in self.intf:
            self._config_spad_bar_alloc(x)
        for x in self.intf:
            self._epc_init_interface(x)

    def _init_epc_bar(self, x: NtbInterface) -> None:
        """epf_ntb_init_epc_bar_interface(): CONFIG, PEER_SPAD, DB_MW1 then MW2.. from BAR0."""
        barno = 0
        for bar in (BAR_CONFIG, BAR_PEER_SPAD, BAR_DB_MW1):
            barno = get_next_free_bar(x.features, barno)
            if barno < 0:
                raise EpcError(errno.ENOENT, f"{x.name} intf: Fail to get NTB function BAR")
            x.epf_ntb_bar[bar] = barno
            barno += 1
        for i, bar in enumerate(range(BAR_MW2, BAR_MW2 + self.num_mws - 1), start=1):
            barno = get_next_free_bar(x.features, barno)
            if barno < 0:  # 7.3.4 goes on looping after this
                self.num_mws = i
                self.log.info("BAR not available for > MW%d", i + 1)
            x.epf_ntb_bar[bar] = barno
            barno += 1

    def _peer(self, x: NtbInterface) -> NtbInterface:
        return self.intf[1 - x.type]

    def _config_spad_bar_alloc(self, x: NtbInterface) -> None:
        """epf_ntb_config_spad_bar_alloc(): ctrl (+ MSI-X table and PBA), then the self
        scratchpads at SPAD_OFFSET, each region rounded up to the EPC align or a power of 2."""
        peer = self._peer(x)
        barno = x.epf_ntb_bar[BAR_CONFIG]
        size = x.features.bar[barno].fixed_size
        align = x.features.align
        # 7.3.4 looks the peer's fixed size up with this side's PEER_SPAD BAR number.
        peer_size = peer.features.bar[x.epf_ntb_bar[BAR_PEER_SPAD]].fixed_size
        if align and size % align:
            raise EpcError(errno.EINVAL, f"{x.name} intf: fixed BAR size not aligned")
        spad_count = self.spad_count
        ctrl_size = EpfNtbCtrl.sizeof()
        spad_size = spad_count * 4
        if x.features.msix_capable:
            ctrl_size = -(-ctrl_size // 8) * 8
            x.msix_table_offset = ctrl_size
            x.msix_bar = barno
            pba_size = _align(-(-self.db_count // 8), 8)
            ctrl_size += PCI_MSIX_ENTRY_SIZE * self.db_count + pba_size
        if align:
            ctrl_size, spad_size = _align(ctrl_size, align), _align(spad_size, align)
        else:
            ctrl_size, spad_size = _pow2(ctrl_size), _pow2(spad_size)
        if peer_size:
            if peer_size < spad_size:
                spad_count = peer_size // 4
            spad_size = peer_size
        ctrl_size = max(ctrl_size, spad_size)
        if not size:
            size = ctrl_size + spad_size
        elif size < ctrl_size + spad_size:
            raise EpcError(errno.EINVAL, f"{x.name} intf: fixed config BAR too small")
        if self.alloc_space(size, barno, x.features, x.type) is None:
            raise EpcError(errno.ENOMEM, f"{x.name} intf: Config/Status/SPAD alloc region fail")
        reg = x.reg
        reg["spad_offset"] = ctrl_size
        reg["spad_count"] = spad_count
        reg["num_mws"] = self.num_mws
        reg["db_entry_size"] = align or 4
        x.spad_size = spad_size

    def _epc_init_interface(self, x: NtbInterface) -> None:
        """epf_ntb_epc_init_interface(): config and peer-spad BARs, interrupts, DB/MW BARs,
        the header, then the command handler."""
        peer = self._peer(x)
        x.epc.set_bar(x.func_no, self.vfunc_no, x.bar(BAR_CONFIG))
        # BAR1: a window onto the other side's self scratchpads.
        barno = x.epf_ntb_bar[BAR_PEER_SPAD]
        x.epf_bar[barno] = PciEpfBar(barno, peer.bar(BAR_CONFIG).phys_addr +
                                     peer.reg["spad_offset"], peer.spad_size)
        x.epc.set_bar(x.func_no, self.vfunc_no, x.bar(BAR_PEER_SPAD))
        self._configure_interrupt(x)
        self._db_mw_bar_init(x)
        x.epc.write_header(x.func_no, self.vfunc_no, self.header)
        reg = x.reg
        x.watch = x.epc.space.watch(reg.addr + reg.offset("command"), 4, x.command.written)

    def _configure_interrupt(self, x: NtbInterface) -> None:
        """epf_ntb_configure_interrupt(): db_count MSI and/or MSI-X vectors."""
        if not (x.features.msix_capable or x.features.msi_capable):
            raise EpcError(errno.EINVAL, "MSI or MSI-X is required for doorbell")
        if x.features.msi_capable:
            x.epc.set_msi(x.func_no, self.vfunc_no, self.db_count)
        if x.features.msix_capable:
            x.epc.set_msix(x.func_no, self.vfunc_no, self.db_count, x.msix_bar,
                           x.msix_table_offset)

    def _db_mw_bar_init(self, x: NtbInterface) -> None:
        """epf_ntb_db_mw_bar_init(): the DB/MW BARs, each backed by space in the *other*
        controller's outbound aperture (epf_ntb_alloc_peer_mem)."""
        peer = self._peer(x)
        align = x.features.align
        for i, bar in enumerate(range(BAR_DB_MW1, BAR_DB_MW1 + self.num_mws)):
            if bar == BAR_DB_MW1:
                size = _align(self.db_count * (align or 4), self.mws_size[0])
                x.reg["mw1_offset"] = size
                size += self.mws_size[0]
            else:
                size = self.mws_size[i]
            size = _align(max(size, 128), align) if align else _pow2(max(size, 128))
            phys = peer.epc.mem_alloc_addr(size)
            if phys is None:
                raise EpcError(errno.ENOMEM, f"{peer.name} intf: Failed to allocate OB "
                               "address")
            barno = x.epf_ntb_bar[bar]
            x.peer_mem[barno] = (phys, size)
            x.epf_bar[barno] = PciEpfBar(barno, phys, size)
            x.epc.set_bar(x.func_no, self.vfunc_no, x.bar(bar))

    # -- the command handler -----------------------------------------------------
    async def _handle_command(self, x: NtbInterface) -> None:
        """epf_ntb_cmd_handler() for interface ``x``."""
        reg = x.reg
        command = reg["command"]
        if not command:
            return
        argument = reg["argument"]
        reg["command"] = 0
        reg["argument"] = 0
        if command == COMMAND_CONFIGURE_DOORBELL:
            status = self._configure_db(x, argument & DB_COUNT_MASK, bool(argument &
                                                                           MSIX_ENABLE))
        elif command == COMMAND_TEARDOWN_DOORBELL:
            x.epc.unmap_addr(x.func_no, self.vfunc_no, self._peer(x).bar(BAR_DB_MW1).phys_addr)
            status = COMMAND_STATUS_OK
        elif command == COMMAND_CONFIGURE_MW:
            status = self._configure_mw(x, argument)
        elif command == COMMAND_TEARDOWN_MW:
            phys = self._mw_phys(x, argument)
            if phys is not None:
                x.epc.unmap_addr(x.func_no, self.vfunc_no, phys)
            status = COMMAND_STATUS_OK
        elif command == COMMAND_LINK_UP:
            x.linkup = True
            status = COMMAND_STATUS_OK
            if all(i.linkup for i in self.intf):
                status = self._link(True)
        elif command == COMMAND_LINK_DOWN:
            x.linkup = False
            status = self._link(False)
        else:
            self.log.error("%s intf UNKNOWN command: %d (no status: the host times out)",
                           x.name, command)
            return
        reg["command_status"] = status
        self.log.debug("%s intf: %s(%#x) -> %s", x.name,
                       COMMAND_NAMES.get(command, command), argument,
                       "OK" if status == COMMAND_STATUS_OK else "ERROR")

    def _configure_db(self, x: NtbInterface, db_count: int, msix: bool) -> int:
        """epf_ntb_configure_db(): the other host's doorbell slots ring this host."""
        if not 1 <= db_count <= MAX_DB_COUNT:
            self.log.error("DB count %d out of range (1 - %d)", db_count, MAX_DB_COUNT)
            return COMMAND_STATUS_ERROR
        peer = self._peer(x)
        peer_reg = peer.reg
        entry_size = peer_reg["db_entry_size"]
        try:
            data, offset = x.epc.map_msi_irq(x.func_no, self.vfunc_no,
                                             peer.bar(BAR_DB_MW1).phys_addr, db_count,
                                             entry_size, msix)
        except EpcError as e:
            self.log.error("%s intf: Failed to map %s IRQ: %s", x.name,
                           "MSI-X" if msix else "MSI", e)
            return COMMAND_STATUS_ERROR
        for i in range(db_count):
            peer_reg.set("db_data", data | i, i)
            peer_reg.set("db_offset", offset, i)
        x.is_msix = msix
        return COMMAND_STATUS_OK

    def _mw_phys(self, x: NtbInterface, mw: int) -> int | None:
        """Where the other host's MW ``mw`` lands in this controller's outbound space."""
        if mw >= self.num_mws:
            self.log.warning("%s intf: memory window %d of %d", x.name, mw, self.num_mws)
            return None
        phys = self._peer(x).bar(mw + NTB_MW_OFFSET).phys_addr
        return phys + x.reg["mw1_offset"] if mw + NTB_MW_OFFSET == BAR_DB_MW1 else phys

    def _configure_mw(self, x: NtbInterface, mw: int) -> int:
        """epf_ntb_configure_mw(): the other host's MW ``mw`` reaches this host's buffer."""
        phys = self._mw_phys(x, mw)
        reg = x.reg
        addr, size = reg["addr"], reg["size"]
        if phys is None or size > self.mws_size[mw]:
            self.log.error("%s intf: MW: %d Req Sz:%#x > Supported Sz:%#x", x.name, mw, size,
                           self.mws_size[mw] if mw < MAX_MW else 0)
            return COMMAND_STATUS_ERROR
        try:
            x.epc.map_addr(x.func_no, self.vfunc_no, phys, addr, size)
        except EpcError as e:
            self.log.error("%s intf: Failed to map memory window %d address: %s", x.name, mw,
                           e)
            return COMMAND_STATUS_ERROR
        return COMMAND_STATUS_OK

    def _link(self, up: bool, gone: NtbInterface | None = None) -> int:
        """epf_ntb_link_up(): LINK_STATUS on both sides, the link interrupt on both hosts
        (not on a host that is ``gone``)."""
        status = COMMAND_STATUS_OK
        for x in self.intf:
            reg = x.reg
            link = reg["link_status"]
            reg["link_status"] = link | LINK_STATUS_UP if up else link & ~LINK_STATUS_UP
            if x is gone:
                continue
            try:
                x.epc.raise_irq(x.func_no, self.vfunc_no,
                                IrqType.MSIX if x.is_msix else IrqType.MSI, LINK_IRQ)
            except EpcError as e:
                self.log.error("%s intf: Failed to raise Link %s IRQ: %s", x.name,
                               "Up" if up else "Down", e)
                status = COMMAND_STATUS_ERROR
        self.log.info("NTB link %s", "up" if up else "down")
        return status

    def host_gone(self, x: NtbInterface) -> None:
        """A host went away or is rebooting: the link goes down for the other one too."""
        was_up = all(i.linkup for i in self.intf)
        x.linkup = False
        if was_up:
            self.log.info("%s host gone: taking the link down", x.name)
            self._link(False, gone=x)


class _InterfaceEvents(EpcEvents):
    """The controller events of one interface, forwarded once the interface exists."""

    def __init__(self, ntb: PciEpfNtb, interface: int) -> None:
        self.ntb = ntb
        self.interface = interface

    def _intf(self) -> NtbInterface | None:
        return self.ntb.intf[self.interface] if len(self.ntb.intf) > self.interface else None

    def epc_init(self) -> None:
        if (x := self._intf()) is not None:
            x.epc_init()

    def epc_deinit(self) -> None:
        if (x := self._intf()) is not None:
            x.epc_deinit()

    def link_up(self) -> None:
        if (x := self._intf()) is not None:
            x.link_up()

    def link_down(self) -> None:
        if (x := self._intf()) is not None:
            x.link_down()


def _align(value: int, align: int) -> int:
    return -(-value // align) * align if align else value


def _pow2(value: int) -> int:
    return 1 << (value - 1).bit_length()

