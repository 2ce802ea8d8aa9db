"""The one QEMU command line of a guest that a vfio-ep endpoint attaches to.

The machine (q35, memfd RAM the server reaches directly, interrupt remapping, a PCIe root
port), the vfio-user-pci device, and what the user's ``run`` options add: memory, CPUs,
kernel arguments and debugging, virtio-9p shares, a gdbstub, their own QEMU options.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfio_ep.guest.provision import Qemu

# no_timer_check: what KVM, Hyper-V and VMware guests set for themselves.  A TCG guest is
# not seen as virtual, so it times its IO-APIC timer against the TSC at boot; on a busy host
# the ticks come late and, with interrupt remapping on, the kernel panics ("timer doesn't work
# through Interrupt-remapped IO-APIC"), seen in a loaded container suite.
DEFAULT_APPEND = "console=ttyS0 panic=-1 quiet no_timer_check"
DEFAULT_MEMORY_MB = 256
DEFAULT_MSG_TIMEOUT_MS = 10_000  # TCG guest + Python server: give slow replies room
ROOT_PORT = "rp0"
DEVICE_ID = "ep0"
# The guest's insmod (qemu/guest/insmod.sh, adding the command line's NAME.dyndbg as
# modprobe would), for commands that say `insmod`.
GUEST_INSMOD = 'insmod() { /sbin/insmod "$@"; }\n'


@dataclass(frozen=True)
class GuestOptions:
    """How every guest of a run boots, beyond its script: memory, CPUs, kernel arguments,
    QEMU arguments of the user's, and a gdbstub."""

    memory_mb: int = DEFAULT_MEMORY_MB
    append: str = ""  # after DEFAULT_APPEND, so the user's arguments win
    cpus: int = 1
    qemu_args: tuple[str, ...] = ()  # last on QEMU's command line
    gdb_port: int | None = None  # QEMU's gdbstub on 127.0.0.1:PORT
    interactive: bool = False  # the serial console on our terminal (stdin to the guest)
    shares: tuple[Share, ...] = ()  # host directories mounted in the guest (virtio-9p)
    dyndbg: tuple[str, ...] = ()  # dynamic debug queries, "module ntb_transport +p"
    trace_events: tuple[str, ...] = ()  # boot-time trace events, "irq:irq_handler_entry"
    ftrace_filter: tuple[str, ...] = ()  # functions for the boot-time function tracer
    workdir: str | None = None  # the guest's directory for the command (inside a share)
    accel: str = "tcg"  # a key of ACCELERATORS

    @property
    def cmdline(self) -> str:
        """The kernel command line: ours, the debugging options', then the user's own."""
        return " ".join(filter(None, (DEFAULT_APPEND, *debug_cmdline(
            self.dyndbg, self.trace_events, self.ftrace_filter), self.append)))

    def qemu_argv(self) -> list[str]:
        """The QEMU options these stand for (after the machine's own)."""
        gdb = ["-gdb", f"tcp:127.0.0.1:{self.gdb_port}"] if self.gdb_port is not None else []
        shares = [a for i, s in enumerate(self.shares) for a in s.qemu_args(i)]
        return ["-smp", str(self.cpus), *gdb, *shares, *self.qemu_args]

    def guest_setup(self) -> str:
        """Shell lines the guest runs before the command: our insmod for the command's own
        (busybox sh runs its applet before looking at PATH), the shares' mounts, then the
        working directory."""
        cd = f"cd '{self.workdir}' || exit 125\n" if self.workdir else ""
        return (GUEST_INSMOD + "".join(s.mount_script(i) for i, s in enumerate(self.shares))
                + cd)


@dataclass(frozen=True)
class Share:
    """A host directory the guest mounts over virtio-9p (``run --share``): at the same path
    by default, so a command names a file of the host's tree as it is written there."""

    host: Path
    guest: str
    readonly: bool = False

    @classmethod
    def parse(cls, spec: str) -> Share:
        """``HOST[:GUEST][:ro]``; GUEST defaults to HOST's absolute path."""
        parts = spec.split(":")
        readonly = parts[-1] == "ro" and len(parts) > 1
        if readonly:
            parts.pop()
        if not 1 <= len(parts) <= 2 or not parts[0]:
            raise ValueError(f"--share {spec!r}: expected HOST[:GUEST][:ro]")
        host = Path(parts[0]).expanduser().resolve()
        if not host.is_dir():
            raise ValueError(f"--share {spec!r}: {host} is not a directory")
        guest = parts[1] if len(parts) == 2 else str(host)
        if any(c in str(host) + guest for c in "'\n"):
            raise ValueError(f"--share {spec!r}: paths with quotes or newlines are refused")
        if not guest.startswith("/") or guest == "/":
            raise ValueError(f"--share {spec!r}: the guest path must be absolute, and not /")
        return cls(host, guest, readonly)

    def guest_path(self, host: Path) -> str | None:
        """Where the host's ``host`` (absolute) is in the guest, if inside this share (and
        quotable in the guest's shell)."""
        if not host.is_relative_to(self.host) or any(c in str(host) for c in "'\n"):
            return None
        rel = host.relative_to(self.host)
        return self.guest if rel == Path() else f"{self.guest.rstrip('/')}/{rel}"

    def tag(self, index: int) -> str:
        return f"vfio-ep-share{index}"

    def qemu_args(self, index: int) -> list[str]:
        """A virtio-9p device exporting the directory (no ID mapping: files are the user's)."""
        return ["-virtfs", f"local,path={_qemu_escape(str(self.host))},mount_tag="
                f"{self.tag(index)},security_model=none"
                + (",readonly=on" if self.readonly else "")]

    def mount_script(self, index: int) -> str:
        """The guest's mount, failing the run with a reason when the kernel cannot."""
        opts = "trans=virtio,version=9p2000.L,msize=262144" + (",ro" if self.readonly else "")
        return (f"mkdir -p '{self.guest}' && mount -t 9p -o {opts} {self.tag(index)} "
                f"'{self.guest}' || {{ echo 'vfio-ep: cannot mount the shared {self.host} at "
                f"{self.guest} (is CONFIG_9P_FS and CONFIG_NET_9P_VIRTIO in the kernel?)'; "
                "exit 125; }\n")


def _qemu_escape(value: str) -> str:
    """A value inside a QEMU -option list: commas doubled."""
    return value.replace(",", ",,")


def debug_cmdline(dyndbg: Sequence[str], trace_events: Sequence[str],
                  ftrace_filter: Sequence[str]) -> list[str]:
    """Kernel arguments for dynamic debug and boot-time tracing.  ``module NAME QUERY`` becomes
    ``NAME.dyndbg="QUERY"``, which the kernel applies when NAME loads (built in or a module
    loaded later); other queries go to ``dyndbg=``, applied at boot."""
    args = []
    plain = []
    for query in dyndbg:
        words = query.split(maxsplit=2)
        if len(words) == 3 and words[0] == "module":  # module names: dashes are underscores
            args.append(f'{words[1].replace("-", "_")}.dyndbg="{words[2]}"')
        else:
            plain.append(query)
    if plain:
        args.append(f'dyndbg="{"; ".join(plain)}"')
    if trace_events:
        args.append(f"trace_event={','.join(trace_events)}")
    if ftrace_filter:
        args += ["ftrace=function", f"ftrace_filter={','.join(ftrace_filter)}"]
    return args


DEFAULT_OPTIONS = GuestOptions()


def vfio_user_device(socket: Path, msg_timeout_ms: int = DEFAULT_MSG_TIMEOUT_MS,
                     device_id: str = DEVICE_ID, bus: str = ROOT_PORT) -> dict[str, Any]:
    """The vfio-user-pci device, as -device JSON or QMP ``device_add`` arguments."""
    return {"driver": "vfio-user-pci", "id": device_id, "bus": bus,
            "socket": {"type": "unix", "path": str(socket)}, "x-msg-timeout": msg_timeout_ms}


def qemu_command(qemu: Qemu, *, kernel: Path, initrd: Path, qmp: Path, options: GuestOptions,
                 device: dict[str, Any] | None, extra_args: Sequence[str] = (),
                 rescue: Path | None = None) -> list[str]:
    """The one QEMU command line: q35 under TCG (or KVM), memfd RAM (so the server can DMA
    directly), serial console on stdout, QMP to our socket, the rescue console's serial port on
    ``rescue``, a PCIe root port for the endpoint; then ``extra_args`` (the run's own
    devices) and the user's options."""
    argv = [
        *qemu.argv, *endpoint_machine_args(options.memory_mb, options.accel),
        "-nodefaults", "-nographic", "-no-reboot",
        # Interactive: QEMU's monitor multiplexed in too, so Ctrl-A X always gets out.
        "-serial", "mon:stdio" if options.interactive else "stdio", "-qmp", f"unix:{qmp}",
        *(["-serial", f"unix:{rescue},server=on,wait=off"] if rescue else []),
        "-kernel", str(kernel), "-initrd", str(initrd), "-append", options.cmdline,
    ]
    if device:
        argv += ["-device", json.dumps(device)]
    return argv + list(extra_args) + options.qemu_argv()



# -accel's options per accelerator.  Interrupt remapping (below) needs the IOAPIC in QEMU:
# under KVM the irqchip must be split (QEMU refuses intremap=on with the kernel's own).
ACCELERATORS = {"tcg": "tcg", "kvm": "kvm,kernel-irqchip=split"}


def endpoint_machine_args(memory_mb: int = DEFAULT_MEMORY_MB, accel: str = "tcg") -> list[str]:
    """What a QEMU machine needs for a vfio-user endpoint to work as in ``vfio-ep run``."""
    return [
        "-accel", ACCELERATORS[accel],
        # Guest RAM in a shared memfd: the server reaches it directly, not by messages; -m
        # must say the backend's size.
        "-machine", "q35,memory-backend=mem", "-m", str(memory_mb),
        "-object", f"memory-backend-memfd,id=mem,size={memory_mb}M,share=on",
        # Interrupt remapping only (x86 multi-MSI needs it); must come before PCI devices.
        "-device", "intel-iommu,intremap=on,dma-translation=off",
        "-device", f"pcie-root-port,id={ROOT_PORT},bus=pcie.0,chassis=1",
        # Native PCIe hot-plug (pciehp, in the guest kernel) instead of q35's ACPI hot-plug.
        "-global", "ICH9-LPC.acpi-pci-hotplug-with-bridge-support=off",
    ]


