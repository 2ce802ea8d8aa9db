"""The EP guest of ``vfio-ep run --ep-guest``: Linux's own endpoint functions on vfio-ep's
controller, and the RC guests booted against them (``ep_run`` picks the suite).

One server serves the controller twice: its CPU side to the EP guest, whose kernel drives it
with vfio-ep's EPC driver (``qemu/kernel/epc``), and its RC side to the RC guest, from the
moment the EP guest starts it.  The EP guest loads the driver and the function modules,
mounts configfs and runs a board's setup script (``--configfs SCRIPT`` verbatim, else
a howto's steps for the function); once its controller is started, the RC guest boots and
runs its side of the suite.  Then the EP guest is stopped, its dmesg taken.  The run
directory has each guest's console and dmesg (``ep/``, ``rc/``), the server's log, and
``trace.log``: both guests and the server on one time line.

With ``--ep-shell`` the EP guest's console is the user's terminal instead, and a shell there
is what the run waits for: the RC guest boots once the controller is started and idles with
its driver bound, the shell comes once it is, and the shell's exit ends the run
(:func:`boot_ep_shell`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from vfio_ep import cmdline
from vfio_ep.composition import DEFAULT_FUNCTION, EP_GUEST_CONTROLLER, Composition
from vfio_ep.config import ConfigError
from vfio_ep.configfs_script import board_script, parse_script
from vfio_ep.epf.functions import DRIVERS
from vfio_ep.guest.assets import EP_GUEST, KSELFTEST
from vfio_ep.guest.children import run_async
from vfio_ep.guest.guests import Cue, Cues
from vfio_ep.guest.kernel_build import (
    EPC_MODULE,
    build_epc_driver,
    users_kernel,
)
from vfio_ep.guest.launcher import GuestBoot, GuestResult, GuestRun, Live
from vfio_ep.guest.provision import GuestAssets, ProvisionError, provision_all
from vfio_ep.guest.qemu_cmdline import DEFAULT_OPTIONS, GuestOptions, vfio_user_device
from vfio_ep.guest.runner import Target
from vfio_ep.guest.server import running_server
from vfio_ep.presets import preset_sets

EP_READY = "vfio-ep: EP guest ready"  # ep_guest.sh, once its controller is started
EP_EXITED = "vfio-ep: EP command exited "  # ep_guest.sh, then the command's exit status
SETUP_TRACE = "vfio-ep: setup: "  # ep_guest.sh, before each command of the setup script
SETUP = "ep-setup.sh"  # the board's script, in the EP guest's /
# --ep-shell's command in the EP guest, as runner.SHELL is --shell's in the RC guest: a shell
# with the console as its controlling terminal (job control, Ctrl-C reaching its foreground
# job); its exit status ends the run.
EP_SHELL = ("echo 'vfio-ep: a shell in the EP guest (configfs: /sys/kernel/config/pci_ep, "
            "debugfs: /sys/kernel/debug); exit ends the run with its status, Ctrl-A X stops "
            "QEMU'\nsetsid cttyhack sh")
# The EP guest's cue port for --ep-shell (ep_guest.sh's CUE): its console is the user's
# terminal, so the host hears "ready" and tells of the RC guest on a serial port of its own.
# COM4, not COM3: an ISA interrupt line has one level in QEMU (the last device's to set it),
# and COM4 shares IRQ 3 with the rescue console, which stays quiet, where COM3 would share
# IRQ 4 with the busy console and could lose one of its interrupts.
CUE_INDEX = 3
CUE_PORT = f"/dev/ttyS{CUE_INDEX}"
# The line an RC guest's script prints under --ep-shell once its driver has the function
# (what has it after the prefix); until then, its lines starting "vfio-ep: " say why not.
RC_BOUND = "vfio-ep: bound: "
# The functions an EP guest runs (the kernel's), and the attributes each default setup
# script writes, in its order: pci-test-howto.rst's for pci-epf-test, the seeds' vNTB block
# (pci-vntb-howto.rst's, with R-Car's IDs) for pci-epf-vntb, pci-ntb-howto.rst's for
# pci-epf-ntb (with vfio-ep's NTB pair's counts).
SCRIPT_ATTRIBUTES = {
    "pci_epf_test": ("vendorid", "deviceid", "msi_interrupts", "msix_interrupts"),
    "pci_epf_vntb": ("vendorid", "deviceid", "msi_interrupts", "db_count", "spad_count",
                     "num_mws", "mw1", "vntb_vid", "vntb_pid", "vbus_number", "ctrl_bar",
                     "db_bar", "mw1_bar"),
    "nvmet_pci_epf": (),  # its script is the NVMe target's as well: NVMET_SETUP
    "pci_epf_ntb": ("vendorid", "deviceid", "db_count", "spad_count", "num_mws", "mw1",
                    "mw2"),
}
# nvmet-pci-epf's DMA: private slave channels, which the eDMA offers as dw-edma does.
# pci-epf-ntb: TI J721E's controller (see its profile), whose nonzero align the function's
# MSI-X doorbells need: epf_ntb_configure_msix() maps ALIGN_DOWN(msg_addr, align), which
# is PCI address 0 for align 0, and points the peer at msg_addr & (align - 1), past its BAR.
FUNCTION_CONTROLLER_SETS = {"nvmet_pci_epf": ("dma_channels=slave",),
                            "pci_epf_ntb": ("controller=j721e",)}
# Documentation/nvme/nvme-pci-endpoint-target.rst's steps (insmod for modprobe: the EP
# guest's modules are files in /lib/modules), the namespace a memory-backed null_blk in the
# EP guest's RAM (the howto's has no memory: what the RC writes would read back as zeros).
NVMET_SETUP = """insmod /lib/modules/null_blk.ko nr_devices=1 memory_backed=1 gb=1
insmod /lib/modules/nvmet.ko
insmod /lib/modules/nvmet-pci-epf.ko
cd /sys/kernel/config/nvmet/subsystems
mkdir nvmepf.0.nqn
echo -n "Linux-pci-epf" > nvmepf.0.nqn/attr_model
echo "0x1b96" > nvmepf.0.nqn/attr_vendor_id
echo "0x1b96" > nvmepf.0.nqn/attr_subsys_vendor_id
echo 1 > nvmepf.0.nqn/attr_allow_any_host
echo 4 > nvmepf.0.nqn/attr_qid_max
mkdir nvmepf.0.nqn/namespaces/1
echo -n "/dev/nullb0" > nvmepf.0.nqn/namespaces/1/device_path
echo 1 > "nvmepf.0.nqn/namespaces/1/enable"
cd /sys/kernel/config/nvmet/ports
mkdir 1
echo -n "pci" > 1/addr_trtype
ln -s /sys/kernel/config/nvmet/subsystems/nvmepf.0.nqn \\
        /sys/kernel/config/nvmet/ports/1/subsystems/nvmepf.0.nqn
cd /sys/kernel/config/pci_ep/functions/nvmet_pci_epf
mkdir nvmepf.0
echo 0xBEEF > nvmepf.0/deviceid
echo 32 > nvmepf.0/msix_interrupts
echo 1 > nvmepf.0/nvme/portid
echo "nvmepf.0.nqn" > nvmepf.0/nvme/subsysnqn
cd /sys/kernel/config/pci_ep
ln -s functions/nvmet_pci_epf/nvmepf.0 controllers/CONTROLLER/
echo 1 > controllers/CONTROLLER/start
"""
# The controllers a default setup script links and starts: the seeds' board's, and
# pci-ntb-howto.rst's primary and secondary for pci-epf-ntb, with the howto's values (its
# doorbells each take an outbound iATU region: vfio-ep's NTB pair's 16 would not fit).
SCRIPT_CONTROLLERS = {"pci_epf_ntb": ("2900000.pcie-ep", "2910000.pcie-ep")}
SCRIPT_DEFAULTS: dict[str, dict[str, object]] = {
    "pci_epf_ntb": {"db_count": 4, "spad_count": 128, "num_mws": 2, "mw1": 0x100000,
                    "mw2": 0x100000}}


@dataclass(frozen=True)
class EpGuestRun:
    """What ``run --ep-guest`` was asked: the controller's attributes (``--set``, a preset's
    profile), the EP guest's function and setup script, and the RC guest's arguments (the
    kselftest's, or the NTB phases)."""

    sets: tuple[str, ...] = ()
    preset: str | None = None
    configfs: Path | None = None
    guest_args: tuple[str, ...] = ()
    ep_kernel: Path | None = None  # the EP side's own kernel build directory
    ep_exec: str | None = None  # run in the EP guest once its controller is started
    ep_dyndbg: tuple[str, ...] = ()  # the EP guest's dynamic debug queries
    xfail: tuple[str, ...] = ()  # [KEY=VALUE:]TEST: known behaviour, as run --xfail
    function: str | None = None  # --function: the kernel's function the EP guest sets up
    ep_linux: str | None = None  # --ep-linux: the EP guest's kernel line (else --linux's)
    ep_shell: bool = False  # --ep-shell: a shell in the EP guest on the terminal (boot_ep_shell)

    def controller(self) -> Composition:
        """The controller vfio-ep serves: its profile, nothing of the function's."""
        return cmdline.load(None, None, self.controller_sets(), preset=self.preset,
                            ep_sockets=["unused"])

    def controller_sets(self) -> list[str]:
        """The controller's ``--set`` items: the command line's, after what the function
        needs of it (nvmet-pci-epf's slave DMA channels) unless the command line says."""
        own = cmdline.controller_items(self.sets)
        given = {item.partition("=")[0] for item in own}
        implied = FUNCTION_CONTROLLER_SETS.get(self.driver(), ())
        return [*(i for i in implied if i.partition("=")[0] not in given), *own]

    def driver(self) -> str:
        """The function the EP guest runs: ``--function``, else what ``--configfs``'s script
        makes (when vfio-ep can read it), else pci-epf-test."""
        if self.function is not None:
            driver = self.function.replace("-", "_")
            if driver not in SCRIPT_ATTRIBUTES:
                raise ConfigError(f"--ep-guest runs {', '.join(SCRIPT_ATTRIBUTES)} in the EP "
                                  f"guest, not {self.function}")
            return driver
        if self.configfs is not None:
            with contextlib.suppress(ConfigError, StopIteration):
                return next(iter(self.script_composition().functions.values())).driver
        return DEFAULT_FUNCTION

    def setup_script(self) -> str:
        """The board's script: ``--configfs`` as written, else the howto's steps for the
        function with its attributes (a preset's IDs, ``--set`` ones)."""
        if self.configfs is not None:
            try:
                return self.configfs.read_text()
            except OSError as e:
                raise ConfigError(f"{self.configfs}: {e.strerror}") from None
        driver = self.driver()
        if driver == "nvmet_pci_epf":
            return NVMET_SETUP.replace("CONTROLLER", EP_GUEST_CONTROLLER)
        values = _function_defaults(driver)
        items = [*(cmdline.function_items(preset_sets(self.preset, driver))
                   if self.preset else []), *cmdline.function_items(self.sets)]
        for item in items:
            key, _, value = item.partition("=")
            values[key.strip()] = value.strip()
        return board_script(driver, {a: _written(a, values[a]) for a in SCRIPT_ATTRIBUTES[driver]},
                            *SCRIPT_CONTROLLERS.get(driver, (EP_GUEST_CONTROLLER,)))

    def target(self) -> Target:
        """The run as a suite run knows one: its settings, and --xfail scoped by them."""
        return Target(None, None, self.configfs, self.sets, self.preset, self.xfail)

    def expected_failures(self) -> tuple[str, ...]:
        """The --xfail tests that apply to this run."""
        return self.target().expected_failures()

    def values(self) -> dict[str, object]:
        """The function's attributes as the setup script leaves them (defaults where vfio-ep
        cannot read the script: it runs all the same, in the EP guest)."""
        driver = self.driver()
        if driver not in DRIVERS:  # no model of it in vfio-ep: the kernel's values alone
            return {}
        values = _function_defaults(driver)
        with contextlib.suppress(ConfigError, StopIteration):
            values |= next(iter(self.script_composition().functions.values())).values
        return values

    def device(self) -> tuple[str, str]:
        """The IDs the setup script gives the function (for the RC's kselftest.sh, which
        names the device when no driver binds it)."""
        values = self.values()
        vendor, device = (f"{int(str(values[k]), 0):#06x}" for k in ("vendorid", "deviceid"))
        return vendor, device

    def script_composition(self) -> Composition:
        return parse_script(self.setup_script(), str(self.configfs or "the setup"))


def setup_complaints(output: str, script: str) -> list[str]:
    """What the EP guest's shell said while it ran the setup ``script`` (a write the kernel
    refused: ``sh: write error: Invalid argument``), each after the script line it came
    from (the shell's trace of the command when the script is more than one command a
    line), as a board's shell would leave it for its user to read."""
    lines = [(n, raw.strip()) for n, raw in enumerate(script.splitlines(), 1)
             if raw.strip() and not raw.strip().startswith("#")]
    traced = [t[len(SETUP_TRACE):] for t in output.splitlines() if t.startswith(SETUP_TRACE)]
    by_line = len(traced) == len(lines)
    complaints, command = [], -1
    for text in output.splitlines():
        if text.startswith(SETUP_TRACE):
            command += 1
        elif text == EP_READY or text.startswith("vfio-ep: "):
            break
        elif command >= 0 and text.strip() and not text.startswith("["):  # not the kernel's
            where = (f"line {lines[command][0]}: {lines[command][1]}" if by_line
                     else traced[command])
            complaints.append(f"{where}: {text.strip()}")
    return complaints


def _function_defaults(driver: str) -> dict[str, object]:
    """A function's attributes as vfio-ep's own model of it has them by default (a default
    setup script's own values over them)."""
    attrs = DRIVERS[driver]
    return {f.name: f.default for f in dataclasses.fields(attrs.attributes)} | attrs.defaults \
        | SCRIPT_DEFAULTS.get(driver, {})


def _written(attr: str, value: object) -> str:
    """A value as a board's script writes it: IDs and sizes in hex, quoted for the guest's
    shell."""
    if isinstance(value, int) and (attr in _IDS or value > 0xFF):
        return f"{value:#06x}"
    return shlex.quote(str(value))


_IDS = frozenset({"vendorid", "deviceid", "vntb_vid", "vntb_pid"})


def boot_ep_pair(run: EpGuestRun, assets: GuestAssets, top: Path, rc_script: str, *,
                 timeout: float, options: GuestOptions = DEFAULT_OPTIONS,
                 rc_options: GuestOptions | None = None,
                 rc_files: dict[str, Path | bytes] | None = None,
                 ep_files: dict[str, Path | bytes] | None = None,
                 ep_finish: float = 0, rc_again: tuple[str, ...] = ()) -> PairResult:
    """The EP guest as ``run`` asks (its controller, setup script, kernel, ``--ep-exec``
    command, with ``ep_files`` in its initramfs), then the RC guest running ``rc_script``
    with ``rc_files`` (``run --ep-guest``'s kselftest, an NTB suite's side, a benchmark's
    programs), each guest's records under ``top``.  ``rc_options`` (default ``options``)
    lets the RC guest alone have more (a benchmark's ivshmem floor).  Once the RC guest is
    done, the EP guest's command has ``ep_finish`` more seconds to end (the other side of a
    suite), then the EP guest is stopped.  Each of ``rc_again`` is the script of one more
    RC guest, booted after the one before it is gone (an RC's reboots, the EP guest up all
    along), its records in ``rc2``, ``rc3``..."""
    name = next(iter(run.controller().controllers))
    with cpu_placement(run):
        return boot_ep_guests(run, assets, top, [name], [RcGuest("rc", name, rc_script)],
                              timeout=timeout, options=options, rc_options=rc_options,
                              rc_files=rc_files, ep_files=ep_files, ep_finish=ep_finish,
                              rc_again=rc_again)


@dataclass(frozen=True)
class RcGuest:
    """An RC guest of an EP guest run: ``script`` on ``controller``'s RC side, its records
    in ``label``/ under the run's directory and its lines so labelled; with ``cue``, it
    boots once an RC guest before it has printed the line, as a ``GuestSpec``'s."""

    label: str
    controller: str
    script: str
    cue: Cue | None = None


def boot_ep_guests(run: EpGuestRun, assets: GuestAssets, top: Path, controllers: Sequence[str],
                   rcs: Sequence[RcGuest], *, timeout: float,
                   options: GuestOptions = DEFAULT_OPTIONS,
                   rc_options: GuestOptions | None = None,
                   rc_files: dict[str, Path | bytes] | None = None,
                   ep_files: dict[str, Path | bytes] | None = None,
                   ep_finish: float = 0, rc_again: tuple[str, ...] = ()) -> PairResult:
    """:func:`boot_ep_pair` with an EP guest holding a device per controller (pci-epf-ntb's
    primary and secondary) and the RC guests ``rcs``, booted at once."""
    return run_async(_boot_pair(
        _ep_side(run, assets, top, controllers, options), assets, controllers, top, timeout,
        rc_options or options, rcs, (ep_files or {}, rc_files or {}), ep_finish, rc_again))


def boot_ep_shell(run: EpGuestRun, assets: GuestAssets, top: Path, rc_script: str, *,
                  timeout: float, options: GuestOptions = DEFAULT_OPTIONS,
                  files: dict[str, Path | bytes] | None = None) -> PairResult:
    """``run --ep-guest --ep-shell``: the EP guest as ``run`` asks, its console on our
    terminal; once its controller is started, the RC guest running ``rc_script``, which
    prints an RC_BOUND line once its driver has the function and then idles; then the EP
    guest's shell, whose exit ends the run (the RC guest stopped, its dmesg taken, then the
    server).  Of the RC guest the terminal shows only the line the EP guest prints before
    its shell (the driver bound, or why not): the rest is in ``top/rc/console.log``.
    ``files`` go into both guests' initramfs; ``run.ep_exec`` runs before the shell."""
    name = next(iter(run.controller().controllers))
    with cpu_placement(run):
        return run_async(_boot_shell(_ep_side(run, assets, top, [name], options), assets, name,
                                     top, timeout, options, rc_script, files or {}))


@dataclass(frozen=True)
class _EpSide:
    """The EP guest of a run, as ``vfio-ep serve`` and its QEMU need it."""

    assets: GuestAssets
    server_args: list[str]  # its controller's attributes
    options: GuestOptions
    script: str  # ep_guest.sh, with the controllers, the setup script and the command
    setup: str  # the board's setup script


def _ep_side(run: EpGuestRun, assets: GuestAssets, top: Path, controllers: Sequence[str],
             options: GuestOptions) -> _EpSide:
    """The EP guest ``run`` asks for on ``controllers``: its kernel (``assets``'s unless
    --ep-linux or --ep-kernel says), ``options`` with its own dynamic debug and no gdbstub
    (the RC guest's), our terminal only for its shell, and ep_guest.sh's command line."""
    ep_base = assets if run.ep_linux in (None, assets.linux) else \
        dataclasses.replace(provision_all(linux=run.ep_linux), qemu=assets.qemu)
    server_args = [a for item in run.controller_sets() for a in ("--set", item)]
    if run.preset:
        server_args += ["--preset", run.preset]
    command = "; ".join(filter(None, (run.ep_exec, EP_SHELL))) if run.ep_shell \
        else run.ep_exec
    script = f"sh /ep_guest.sh {shlex.quote(' '.join(controllers))} /{SETUP} " + \
        (shlex.quote(command) if command else "") + (f" {CUE_PORT}" if run.ep_shell else "")
    return _EpSide(ep_guest_assets(ep_base, run.ep_kernel, top / "epc-driver"), server_args,
                   dataclasses.replace(options, dyndbg=run.ep_dyndbg, gdb_port=None,
                                       interactive=run.ep_shell),
                   script, run.setup_script())


# EP functions that spin a CPU while they wait for the RC: nvmet-pci-epf's SQ poller runs
# for 5 s after each command (NVMET_PCI_EPF_SQ_POLL_IDLE), the guest's one vCPU with it.
SPINNING_FUNCTIONS = frozenset({"nvmet_pci_epf"})


@contextlib.contextmanager
def cpu_placement(run: EpGuestRun) -> Iterator[None]:
    """The server and both QEMUs (started meanwhile: they inherit it) on one CPU, unless the
    EP guest's function spins (SPINNING_FUNCTIONS).

    In an EP guest run nearly every step is a trapped access: a vCPU's QEMU waits for
    vfio-ep's I/O thread, which waits for the next message.  Woken on its own CPU, either
    answers in about half the time it takes across CPUs (README, Benchmarks: 21-29 us
    against 64-93 us a round trip), which is what keeps pci-epf-test's memcpy transfers
    (2 MiB of 4-byte reads through the aperture: ~12 s here, 22-30 s across CPUs) inside the
    kselftest's 30 s a test.  The two guests seldom run at once: the RC waits on the EP.
    A spinning EP vCPU, though, would take that one CPU from the server and the RC's QEMU,
    which answer it: nvmet-pci-epf's 64 MiB reads take 1.5x as long there as across the
    two CPUs (11.7-12.1 s against 7.4-8.1 s, writes 1.4-1.8 s against 1.0-1.1 s)."""
    allowed = os.sched_getaffinity(0)
    if run.driver() not in SPINNING_FUNCTIONS:
        os.sched_setaffinity(0, {max(allowed)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, allowed)


@dataclass
class PairResult:
    """The guests' results (no RC's: they never booted) and the server's log."""

    ep: GuestResult
    rcs: list[GuestResult]
    server_log: str
    error: str | None = None
    rc_again: tuple[GuestResult, ...] = ()  # the RC guests booted after the first

    @property
    def rc(self) -> GuestResult | None:
        """The RC guest's result, of a pair (None: it never booted)."""
        return self.rcs[0] if self.rcs else None


def ep_guest_assets(assets: GuestAssets, ep_kernel: Path | None, work: Path) -> GuestAssets:
    """What the EP guest boots: the provisioned kernel and its EPC driver, or the EP side's
    own kernel build directory (``make O=DIR bzImage modules``), its modules, and the EPC
    driver built against it into ``work``."""
    if ep_kernel is None:
        if assets.epc_driver is None:
            raise ProvisionError(f"no EPC driver for Linux {assets.linux}")
        return assets
    build = ep_kernel if ep_kernel.is_dir() else ep_kernel.parents[3]  # arch/x86/boot/bzImage
    if not (build / "Module.symvers").is_file():
        raise ProvisionError(f"--ep-kernel {ep_kernel}: not a kernel build directory with its "
                             "modules built (make O=DIR bzImage modules); the EPC driver is "
                             "built against it")
    image, modules = users_kernel(build)
    return dataclasses.replace(assets, kernel=image, modules=modules,
                               epc_driver=build_epc_driver(build, work))


@contextlib.asynccontextmanager
async def _ep_guest_up(ep: _EpSide, names: Sequence[str], log: Path, run_dir: Path,
                       files: dict[str, Path | bytes], live: Live | None,
                       more_qemu_args: Sequence[str] = ()
                       ) -> AsyncIterator[tuple[GuestRun, dict[str, Path]]]:
    """``vfio-ep serve`` (its output in ``log``) with each controller ``names`` names
    served twice, and the EP guest's QEMU started on their CPU sides (``files`` beside its
    script in its initramfs); yields the EP guest and the RC sides' sockets, and stops both."""
    ep_dir = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
    ep_sockets = [ep_dir / f"cpu{i}.sock" for i in range(len(names))]
    args = [*ep.server_args, *(a for name, path in zip(names, ep_sockets, strict=True)
                               for a in ("--ep-socket", f"{name}={path}"))]
    try:
        async with running_server(names, args, log) as served:
            assert ep.assets.epc_driver is not None
            async with GuestRun(GuestBoot(
                    ep.script, socket=ep_sockets[0], assets=ep.assets, run_dir=run_dir,
                    files={"ep_guest.sh": EP_GUEST, SETUP: ep.setup.encode(),
                           f"lib/modules/{EPC_MODULE}": ep.assets.epc_driver, **files},
                    options=ep.options, qemu_args=(*_more_devices(ep_sockets), *more_qemu_args),
                    live=live)) as ep_run:
                yield ep_run, served.sockets
    finally:
        shutil.rmtree(ep_dir, ignore_errors=True)


def _rc_guest(script: str, assets: GuestAssets, socket: Path, run_dir: Path,
              options: GuestOptions, live: Live | None,
              files: dict[str, Path | bytes]) -> GuestRun:
    """An RC guest on a controller's RC side, kselftest.sh and ``files`` beside its script."""
    return GuestRun(GuestBoot(script, socket=socket, assets=assets, run_dir=run_dir,
                              files={"kselftest.sh": KSELFTEST, **files}, options=options,
                              live=live))


async def _boot_pair(ep: _EpSide, rc_assets: GuestAssets, names: Sequence[str], top: Path,
                     timeout: float, rc_options: GuestOptions, rcs: Sequence[RcGuest],
                     files: tuple[dict[str, Path | bytes], dict[str, Path | bytes]],
                     ep_finish: float, rc_again: tuple[str, ...]) -> PairResult:
    """The EP guest with a device per controller ``names`` names, then, once its
    controllers are started, the RC guests ``rcs`` (``files``: the EP's and the RCs' beside
    their scripts in their initramfs), then each of ``rc_again`` on the first RC guest's
    controller, one after the other."""
    started = time.monotonic()
    log = top / "server.log"
    ready, exited = asyncio.Event(), asyncio.Event()

    def seen(line: str) -> None:
        if line == EP_READY:
            ready.set()
        elif line.startswith(EP_EXITED):
            exited.set()

    async with _ep_guest_up(ep, names, log, top / "ep", files[0], _live("ep", seen)) \
            as (ep_run, sockets):
        ep_done = asyncio.create_task(ep_run.wait(timeout))
        waiting = asyncio.create_task(ready.wait())
        await asyncio.wait({ep_done, waiting}, timeout=timeout,
                           return_when=asyncio.FIRST_COMPLETED)
        waiting.cancel()
        if not ready.is_set():
            ep_done.cancel()
            result = await ep_run.collect() if not ep_done.done() else ep_done.result()
            return PairResult(result, [], log.read_text(errors="replace"),
                              "the EP guest did not start its controller: "
                              + (result.error or last_words(result.output)))
        left = timeout - (time.monotonic() - started)
        cues = Cues(rc.cue for rc in rcs)
        rc_results = list(await asyncio.gather(*(
            cues.boot(rc.label, _rc_guest(rc.script, rc_assets, sockets[rc.controller],
                                          top / rc.label, rc_options,
                                          _live(rc.label, partial(cues.heard, rc.label)),
                                          files[1]), left, cue=rc.cue)
            for rc in rcs)))
        again = []
        for boot, script in enumerate(rc_again, len(rcs) + 1):
            label = f"rc{boot}"
            rc = _rc_guest(script, rc_assets, sockets[rcs[0].controller], top / label,
                           rc_options, _live(label, None), files[1])
            again.append(await rc.run(timeout - (time.monotonic() - started)))
        if ep_finish:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(exited.wait(), ep_finish)
        ep_done.cancel()
        ep_result = await ep_run.collect()
    return PairResult(ep_result, rc_results, log.read_text(errors="replace"),
                      ep_result.error and f"EP guest: {ep_result.error}", tuple(again))


async def _boot_shell(ep: _EpSide, rc_assets: GuestAssets, name: str, top: Path,
                      timeout: float, rc_options: GuestOptions, rc_script: str,
                      files: dict[str, Path | bytes]) -> PairResult:
    """:func:`boot_ep_shell`'s guests: the EP guest with its cue port; once it says "ready"
    there, the RC guest, whose lines go nowhere but its console.log; once its driver has
    the function (or it has ended), one line on the cue port says so, the EP guest shows it
    and runs its shell, and the shell's end (or QEMU's, Ctrl-A X) ends the RC guest too."""
    started = time.monotonic()
    log = top / "server.log"
    cue_dir = Path(tempfile.mkdtemp(prefix="vfio-ep-"))  # short: sun_path <= 107
    cue = cue_dir / "cue.sock"
    cue_args = ["-chardev", f"socket,id=cue,path={cue},server=on,wait=off",
                "-device", f"isa-serial,chardev=cue,index={CUE_INDEX}"]
    said: list[str] = []  # the RC guest's "vfio-ep: " lines
    bound = asyncio.Event()

    def heard(line: str) -> None:
        if line.startswith("vfio-ep: "):
            said.append(line)
            if line.startswith(RC_BOUND):
                bound.set()

    try:
        async with _ep_guest_up(ep, [name], log, top / "ep", files, None, cue_args) \
                as (ep_run, sockets):
            ep_done = asyncio.create_task(ep_run.wait(timeout))
            reader, writer = await asyncio.open_unix_connection(str(cue))
            try:
                ready = asyncio.create_task(_cue(reader, EP_READY))
                await asyncio.wait({ep_done, ready}, return_when=asyncio.FIRST_COMPLETED)
                if not (ready.done() and ready.result()):
                    ready.cancel()
                    result = await ep_done  # the cue port closes with QEMU
                    return PairResult(result, [], log.read_text(errors="replace"),
                                      "the EP guest did not start its controller: "
                                      + (result.error or last_words(result.output)))
                rc_run = _rc_guest(rc_script, rc_assets, sockets[name], top / "rc", rc_options,
                                   heard, files)
                async with rc_run:
                    rc_done = asyncio.create_task(
                        rc_run.wait(timeout - (time.monotonic() - started)))
                    waiting = asyncio.create_task(bound.wait())
                    await asyncio.wait({rc_done, waiting, ep_done},
                                       return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
                    if not ep_done.done():
                        writer.write(_rc_news(said, rc_done, top / "rc").encode() + b"\n")
                        with contextlib.suppress(ConnectionError):
                            await writer.drain()
                    ep_result = await ep_done
                    if rc_done.done():
                        rc_result = rc_done.result()
                    else:
                        rc_done.cancel()
                        rc_result = await rc_run.collect()
            finally:
                writer.close()
    finally:
        shutil.rmtree(cue_dir, ignore_errors=True)
    return PairResult(ep_result, [rc_result], log.read_text(errors="replace"),
                      ep_result.error and f"EP guest: {ep_result.error}")


async def _cue(reader: asyncio.StreamReader, line: str) -> bool:
    """Whether the EP guest says ``line`` on its cue port before the port closes (QEMU
    gone)."""
    with contextlib.suppress(ConnectionError):
        while text := await reader.readline():
            if text.decode(errors="replace").strip() == line:
                return True
    return False


def _rc_news(said: list[str], rc_done: asyncio.Task[GuestResult], run_dir: Path) -> str:
    """The line the EP guest shows before its shell: what the RC guest's driver has, or,
    the RC guest ended, why it has nothing; one line (the cue port's reader reads one)."""
    if bound := next((line for line in said if line.startswith(RC_BOUND)), None):
        return (f"vfio-ep: the RC guest's driver has the function ({bound[len(RC_BOUND):]}); "
                f"its console, kernel messages included: {run_dir}/console.log")
    result = rc_done.result()
    why = said[-1].removeprefix("vfio-ep: ") if said else \
        result.error or f"it exited {result.exit_status}"
    return (f"vfio-ep: the RC guest's driver did not bind ({' '.join(why.split())}); its "
            f"console: {run_dir}/console.log")


def _more_devices(sockets: Sequence[Path]) -> tuple[str, ...]:
    """QEMU arguments for the EP guest's devices after the first: each on a root port of
    its own, as a SoC's controllers are each a device of their own."""
    args = []
    for i, socket in enumerate(sockets[1:], 1):
        port = f"rp{i}"
        args += ["-device", f"pcie-root-port,id={port},bus=pcie.0,chassis={i + 1}",
                 "-device", json.dumps(vfio_user_device(socket, device_id=f"ep{i}", bus=port))]
    return tuple(args)


def _live(label: str, seen: Callable[[str], object] | None) -> Callable[[str], None]:
    def echo(line: str) -> None:
        print(f"{label}: {line}", flush=True)
        if seen is not None:
            seen(line)
    return echo


# A kernel's report of its own crash, as the console prints it after the timestamp.
_CRASH = re.compile(r"^\[ *[\d.]+\] ((?:BUG|Oops|Kernel panic)\b.*)$")
_RIP = re.compile(r"\] RIP: [0-9a-f]{4}:(\S+)")
_FRAME = re.compile(r"^\[ *[\d.]+\]  (?:\? )?(\w\S*\+0x\S+(?: \[\w+\])?)$")
CRASH_FRAMES = 4  # call-trace frames named, innermost first


def last_words(output: str) -> str:
    """Why the EP guest stopped short: where its kernel crashed (the first report, its RIP
    and the call trace's first frames: a function's bind error path, say), else its last
    line.  The crash ends the setup script's shell, whose own last words ("Killed", a
    syntax error of a half-read script) say nothing of it."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        crash = _CRASH.match(line)
        if crash is None:
            continue
        after = lines[i + 1 :]
        rip = next((m.group(1) for m in map(_RIP.search, after) if m), None)
        start = next((j for j, a in enumerate(after) if a.endswith("Call Trace:")), len(after))
        frames = [m.group(1) for m in map(_FRAME.match, after[start + 1 :]) if m]
        where = ([f"RIP {rip}"] if rip else []) + (
            [" <- ".join(frames[:CRASH_FRAMES])] if frames else [])
        return crash.group(1) + (f" ({'; '.join(where)})" if where else "")
    return lines[-1] if lines else "it printed nothing (see ep/console.log)"


# What pci-ep-msi.c and the functions tell of the doorbell they got, in the EP guest's dmesg.
DOORBELL_LINES = (("Using embedded (DMA) doorbell fallback", "embedded (the eDMA's)"),
                  ("Failed to allocate doorbell", "none: the function polls"))


def ep_facts(ep: GuestResult, script: str) -> dict[str, Any]:
    """What the EP guest's boot tells of the run: the doorbell its function got, and the
    setup script's lines it refused (printed too)."""
    dmesg = ep.run_dir / "dmesg.txt"
    text = dmesg.read_text(errors="replace") if dmesg.is_file() else ""
    facts: dict[str, Any] = {}
    for line, doorbell in DOORBELL_LINES:
        if line in text:
            facts["doorbell"] = doorbell
    return facts | _refused_setup(ep, script)


def _refused_setup(ep: GuestResult, script: str) -> dict[str, list[str]]:
    """The setup script's lines the EP guest refused, printed and for the run's facts
    (none: no fact)."""
    complaints = setup_complaints(ep.output, script)
    for complaint in complaints:
        print(f"vfio-ep run: the EP guest's setup script, {complaint}", file=sys.stderr)
    return {"setup_refused": complaints} if complaints else {}
