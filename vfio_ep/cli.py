"""The ``vfio-ep`` command line: serve a device, or boot a guest against one."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from vfio_ep.guest.kernel_build import DEFAULT_LINUX, EP_GUEST_LINES, LINUX_LINES
from vfio_ep.presets import PRESETS

if TYPE_CHECKING:  # the guest tooling is imported by the commands that boot guests
    from vfio_ep.guest.ep_guest import EpGuestRun
    from vfio_ep.guest.runner import RunSpec


def _verbosity(ctx: click.Context, _param: click.Parameter, count: int) -> None:
    """-v counts wherever it stands (``vfio-ep -v run`` or ``vfio-ep run -v``): INFO, then DEBUG.

    Each occurrence adds to the total kept on the shared context, and the root logger follows.
    """
    total = ctx.meta.get("vfio_ep.verbose", 0) + count
    ctx.meta["vfio_ep.verbose"] = total
    logging.getLogger().setLevel(logging.WARNING - 10 * min(total + 1, 2))


verbose_option = click.option(
    "-v", "--verbose", count=True, expose_value=False, callback=_verbosity,
    help="More logging (-vv for per-message traces); also after the subcommand.")


# run --topology: named shapes of guests and endpoint, by the function that makes them
TOPOLOGIES = {"ntb-pair": "pci-epf-ntb"}


@click.group()
@click.version_option(package_name="vfio-ep", message="vfio-ep %(version)s")
@verbose_option
def main() -> None:
    """A userspace PCIe endpoint for QEMU guests, over vfio-user."""
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def composition_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """--function / --config / --configfs / --set: what to serve (vfio_ep.composition)."""
    for option in reversed([
        click.option("--function", default=None,
                     help="The function of a one-function endpoint (pci-epf-test, "
                     "pci-epf-vntb, pci-epf-ntb, testdev); its attributes: `vfio-ep "
                     "attributes FUNCTION`."),
        click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
                     help="TOML: configfs-named attributes, flat or [controllers.*] and "
                     "[functions.*] tables."),
        click.option("--configfs", type=click.Path(exists=True, path_type=Path),
                     help="A pci_ep configfs shell script (cd/mkdir/echo/ln -s) to set up "
                     "controllers and functions from."),
        click.option("--preset", type=click.Choice(sorted(PRESETS)),
                     help="Look like this board to the host's drivers: its IDs, controller "
                     "profile and BARs (--set items after it win)."),
        click.option("--set", "sets", multiple=True, metavar="[NAME.]KEY=VALUE",
                     help="Set one attribute (repeatable); NAME picks a controller or "
                     "function."),
    ]):
        fn = option(fn)
    return fn


@main.command()
@verbose_option
@click.option("--socket", "sockets", multiple=True, metavar="[CONTROLLER=]PATH",
              help="UNIX socket to serve a controller on (created 0600; at most 107 bytes, "
              "sun_path's limit); repeatable.  Missing directories are created 0700 and "
              "removed at exit if still empty.")
@click.option("--ep-socket", "ep_sockets", multiple=True, metavar="[CONTROLLER=]PATH",
              help="Serve the controller's CPU side here, to an EP guest whose kernel runs "
              "the functions (its EPC driver: qemu/kernel/epc); alone, one controller named "
              "e65d0000.pcie-ep.  The RC side on --socket exists once the guest starts it.")
@click.option("--allow-uid", "allow_uids", multiple=True, type=click.IntRange(min=0),
              metavar="UID", help="Also accept clients of this user (checked with "
              "SO_PEERCRED; the socket is then 0666); repeatable.  Default: our own user.")
@click.option("--ready-fd", type=click.IntRange(min=0), metavar="FD",
              help="Once every socket accepts clients, write READY=1 to this inherited file "
              "descriptor and close it (a pipe a script waits on).")
@click.option("--pidfile", type=click.Path(dir_okay=False, path_type=Path),
              help="Write our pid here once serving; removed at exit.")
@click.option("--facts", type=click.Path(dir_okay=False, path_type=Path),
              help="Write what each controller serves here (JSON, by controller: profile, "
              "IDs, function, the doorbell backend it got, and a function's own facts), "
              "before its socket exists: what a test runner tells its guest to expect.")
@click.option("--print-qemu-args", is_flag=True,
              help="Print, per controller, a command line that starts QEMU (through `vfio-ep "
              "qemu`) with a guest attached as `vfio-ep run` attaches one (memfd RAM and "
              "-m, interrupt remapping, root port, the device); add a kernel or a disk.")
@composition_options
def serve(sockets: tuple[str, ...], ep_sockets: tuple[str, ...], allow_uids: tuple[int, ...],
          ready_fd: int | None, pidfile: Path | None, facts: Path | None,
          print_qemu_args: bool, function: str | None, config_file: Path | None,
          configfs: Path | None, preset: str | None, sets: tuple[str, ...]) -> None:
    """Serve every started controller on its socket until SIGINT/SIGTERM."""
    from vfio_ep.serve import serve_forever

    serve_forever(list(sockets), function, config_file, list(sets), configfs,
                  frozenset(allow_uids), print_qemu_args, preset, ready_fd, pidfile,
                  list(ep_sockets), facts)


@main.command(context_settings={"ignore_unknown_options": True})
@verbose_option
@composition_options
@click.option("--kernel", type=click.Path(exists=True, path_type=Path),
              help="Boot this bzImage, or a kernel build directory (O=): its bzImage, and its "
              "modules in the initramfs' /lib/modules.")
@click.option("--ep-guest", is_flag=True,
              help="Run the kernel's own function in an EP guest on vfio-ep's controller "
              "(its EPC driver: qemu/kernel/epc), then the RC guest's suite against it: "
              "pci-epf-test (the default) and the kselftest, or --function pci-epf-vntb "
              "and the NTB phases (tool, pingpong, netdev) on both sides; --configfs SCRIPT "
              "is the EP guest's board script, run there verbatim (its function is the "
              "run's).")
@click.option("--ep-kernel", type=click.Path(exists=True, path_type=Path),
              help="With --ep-guest: the EP guest boots your kernel build directory (O=, "
              "bzImage and modules built), with vfio-ep's EPC driver built against it.")
@click.option("--ep-linux", type=click.Choice(EP_GUEST_LINES),
              help="With --ep-guest: the EP guest's kernel line, where it differs from the RC "
              "guest's --linux (old and new peers: --linux 6.12 --ep-linux 7.3).")
@click.option("--ep-exec", metavar="CMD",
              help="With --ep-guest: run CMD in the EP guest once its controller is started "
              "(its output on the console, ep: lines).")
@click.option("--ep-shell", is_flag=True,
              help="With --ep-guest: an interactive shell in the EP guest on this terminal "
              "once its controller is started and the RC guest's pci_endpoint_test has the "
              "function (the RC guest runs no test: it idles, its kernel's messages in "
              "rc/console.log); the shell's exit ends the run with its status (Ctrl-A X "
              "stops QEMU).  No timeout unless given.")
@click.option("--ep-dyndbg", multiple=True, metavar="QUERY",
              help="With --ep-guest: a dynamic debug query for the EP guest (repeatable), as "
              "--dyndbg is for the RC guest.")
@click.option("--topology", type=click.Choice(sorted(TOPOLOGIES)),
              help="A shape of guests and endpoint: ntb-pair, two guests joined by "
              "pci-epf-ntb (the same as --function pci-epf-ntb).")
@click.option("--kselftest", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Run this pci_endpoint_test (built static from your tree) instead of the "
              "one vfio-ep builds.")
@click.option("--qemu", type=click.Path(exists=True, path_type=Path),
              help="Use this qemu-system-x86_64 (>= 10.1).")
@click.option("--linux", type=click.Choice(LINUX_LINES), default=DEFAULT_LINUX,
              show_default=True, help="The kernel line to provision and boot (with its own "
              "test tool: the kselftest, or pcitest before 6.14).")
@click.option("--exec", "exec_cmd", metavar="CMD",
              help="Run CMD in the guest (busybox sh) instead of the suite; its exit status "
              "is ours.  The kselftest is /pci_endpoint_test, modules are in /lib/modules.")
@click.option("--shell", is_flag=True,
              help="An interactive shell in the guest on this terminal instead of the suite; "
              "its exit status is ours (Ctrl-A X stops QEMU).  No timeout unless given.")
@click.option("--matrix", "axes", multiple=True, metavar="KEY=V1,V2,...",
              help="Run the suite once per combination of these values (repeatable: "
              "--matrix doorbell=msi,poll --matrix controller=generic,rk3588), all in one "
              "results.xml.")
@click.option("--xfail", multiple=True, metavar="[KEY=VALUE:]TEST",
              help="A test whose failure is known upstream behaviour: reported xfail, and a "
              "pass of it xpass (repeatable); with KEY=VALUE only where that is set "
              "(controller=rk3588:pci_ep_basic.LEGACY_IRQ_TEST: in the matrix's rk3588 "
              "cells).")
@click.option("--append", default="", metavar="ARGS", help="More kernel command line.")
@click.option("--share", "shares", multiple=True, metavar="HOST[:GUEST][:ro]",
              help="Mount a host directory in the guest over virtio-9p, at the same path "
              "unless GUEST is given (repeatable): run a freshly built test or insmod a module "
              "from your tree without rebuilding anything.")
@click.option("--dyndbg", multiple=True, metavar="QUERY",
              help="A dynamic debug query ('module ntb_transport +p', 'file "
              "drivers/misc/pci_endpoint_test.c +p'; repeatable); the messages land in "
              "dmesg.txt in the run directory.")
@click.option("--trace-event", "trace_events", multiple=True, metavar="SYSTEM:EVENT",
              help="Trace this event from boot ('irq:irq_handler_entry', 'irq_vectors:*'; "
              "repeatable); the buffer lands in ftrace.txt in the run directory.")
@click.option("--ftrace", "ftrace_filter", multiple=True, metavar="FUNCTION",
              help="Trace calls of this function (glob) from boot with the function tracer "
              "('pci_endpoint_test_*', 'ntb_epf_*'; repeatable); into ftrace.txt.")
@click.option("--memory", type=click.IntRange(min=64), default=256, show_default=True,
              metavar="MB", help="Guest RAM.")
@click.option("--cpus", type=click.IntRange(min=1, max=64), default=1, show_default=True,
              help="Guest CPUs (-smp).")
@click.option("--accel", type=click.Choice(["tcg", "kvm"]), default="tcg", show_default=True,
              help="QEMU's accelerator; with kvm the irqchip is split (kernel-irqchip=split), "
              "which interrupt remapping, and so 32 MSI vectors, needs there.")
@click.option("--qemu-arg", "qemu_args", multiple=True, metavar="ARG",
              help="One more QEMU argument, last on its command line (repeatable: "
              "--qemu-arg=-d --qemu-arg=guest_errors).")
@click.option("--gdb", "gdb_port", type=click.IntRange(min=1, max=65535), metavar="PORT",
              help="QEMU's gdbstub on 127.0.0.1:PORT (the second guest of a pair: PORT+1); "
              "raise --timeout to debug at leisure.")
@click.option("--timeout", type=click.FloatRange(min=0), default=None,
              help="Seconds for the whole run (fractions welcome; 0: none).  On a timeout "
              "the guest's tasks are dumped (sysrq-t) into console.log and its dmesg into "
              "dmesg.txt.  [default: 600; none with --shell or --ep-shell]")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where logs and results go.")
@click.argument("guest_args", nargs=-1, type=click.UNPROCESSED)
def run(function: str | None, config_file: Path | None, configfs: Path | None,
        preset: str | None, sets: tuple[str, ...], ep_guest: bool, ep_kernel: Path | None,
        ep_linux: str | None, ep_exec: str | None, ep_shell: bool, ep_dyndbg: tuple[str, ...],
        topology: str | None, kernel: Path | None,
        kselftest: Path | None, qemu: Path | None, linux: str, exec_cmd: str | None,
        shell: bool, axes: tuple[str, ...], xfail: tuple[str, ...], append: str,
        shares: tuple[str, ...], dyndbg: tuple[str, ...], trace_events: tuple[str, ...],
        ftrace_filter: tuple[str, ...], memory: int, cpus: int, accel: str,
        qemu_args: tuple[str, ...], gdb_port: int | None, timeout: float | None,
        run_dir: Path | None, guest_args: tuple[str, ...]) -> None:
    """Boot a guest against a fresh vfio-ep and run the function's suite.

    pci-epf-test runs the upstream pci_endpoint_test kselftest: options vfio-ep does not know
    go to it (``-t MSI_TEST``); put its own ``-v VARIANT`` after ``--``.  pci-epf-vntb runs
    the NTB suite (ntb_hw_epf, ntb_tool, ntb_pingpong, ntb_transport + ntb_netdev), and
    pci-epf-ntb two guests against each other.  A run whose selection matches no test fails.
    ``--exec CMD`` runs your command instead (in both guests of a pci-epf-ntb pair, with
    VFIO_EP_ROLE=a or b).
    """
    from vfio_ep.guest.ep_guest import EpGuestRun
    from vfio_ep.guest.interrupt import exit_on_interrupt
    from vfio_ep.guest.qemu_cmdline import GuestOptions, Share
    from vfio_ep.guest.runner import RunSpec, Target, run_suite, run_suite_matrix

    if shell and exec_cmd is not None:
        raise click.UsageError("--shell and --exec both say what the guest runs: pick one")
    if ep_shell:
        _ep_shell_alone(shell, ep_exec, guest_args)
    if topology is not None:
        if function is not None or config_file or configfs:
            raise click.UsageError("--topology names the function itself: not with "
                                   "--function, --config or --configfs")
        function = TOPOLOGIES[topology]
    if axes and (shell or ep_shell or exec_cmd is not None):
        raise click.UsageError("--matrix runs the suite in every cell: not with --shell, "
                               "--ep-shell or --exec")
    try:
        mounts = tuple(Share.parse(s) for s in shares)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--share") from None
    # Like vng: started inside a shared directory, the guest's command starts there too.
    workdir = next(filter(None, (s.guest_path(Path.cwd().resolve()) for s in mounts)), None)
    if timeout is None:
        timeout = float("inf") if shell or ep_shell else 600.0
    elif timeout == 0:
        timeout = float("inf")
    spec = RunSpec(
        Target(function, config_file, configfs, sets, preset, xfail), linux, kernel,
        kselftest, qemu, guest_args, exec_cmd,
        GuestOptions(memory, append, cpus, qemu_args, gdb_port, interactive=shell,
                     shares=mounts, dyndbg=dyndbg, trace_events=trace_events,
                     ftrace_filter=ftrace_filter, workdir=workdir, accel=accel), timeout)
    ep = EpGuestRun(sets, preset, configfs, guest_args, ep_kernel, ep_exec, ep_dyndbg, xfail,
                    function, ep_linux, ep_shell)
    if ep != EpGuestRun(sets, preset, configfs, guest_args, xfail=xfail, function=function) \
            and not ep_guest:
        raise click.UsageError("--ep-kernel, --ep-linux, --ep-exec, --ep-shell and --ep-dyndbg "
                               "go with --ep-guest")
    with exit_on_interrupt():
        if ep_guest:
            raise SystemExit(_run_ep_guest(spec, ep, run_dir, bool(
                axes or exec_cmd or shell or kselftest or topology)))
        if axes:
            raise SystemExit(run_suite_matrix(list(axes), spec, run_dir))
        raise SystemExit(run_suite(spec, run_dir))


def _ep_shell_alone(shell: bool, ep_exec: str | None, guest_args: tuple[str, ...]) -> None:
    """--ep-shell gives the terminal to the EP guest's shell, which is all that guest runs
    once its controller is started, and the RC guest runs no test meanwhile."""
    if shell:
        raise click.UsageError("--shell and --ep-shell each give a guest this terminal (the RC "
                               "guest's, the EP guest's): pick one")
    if ep_exec is not None:
        raise click.UsageError("--ep-exec and --ep-shell both say what the EP guest runs once "
                               "its controller is started: pick one (or run CMD in the shell)")
    if guest_args:
        raise click.UsageError(f"--ep-shell: the RC guest runs no test, so "
                               f"{' '.join(guest_args)} selects none")


def _run_ep_guest(spec: RunSpec, ep: EpGuestRun, run_dir: Path | None,
                  other_modes: bool) -> int:
    """``run --ep-guest``: the EP guest runs the function, so the options that pick vfio-ep's
    own function or another suite do not apply."""
    from vfio_ep.guest.ep_run import run_ep_guest

    if spec.target.config_file or other_modes:
        raise click.UsageError("--ep-guest runs the kernel's function in the EP guest and its "
                               "suite in the RC guest: not with --config, --topology, "
                               "--matrix, --exec, --shell or --kselftest yet")
    return run_ep_guest(ep, kernel=spec.kernel, qemu=spec.qemu, linux=spec.linux,
                        timeout=spec.timeout, run_dir=run_dir, options=spec.options)


@main.command("kernel-config")
@click.option("--linux", type=click.Choice(LINUX_LINES), default=DEFAULT_LINUX,
              show_default=True, help="The kernel line (some need their own options).")
def kernel_config(linux: str) -> None:
    """Print the kernel config fragment a guest kernel needs (for --kernel: merge it with
    scripts/kconfig/merge_config.sh into your tree's .config)."""
    from vfio_ep.guest.kernel_build import fragments

    for fragment in fragments(linux):
        click.echo(f"# {fragment.name}\n{fragment.read_text().rstrip()}")


@main.command()
@click.argument("function", default="pci-epf-test")
def attributes(function: str) -> None:
    """List the attributes of a controller and of FUNCTION, with their defaults.

    Each is set as configfs names it: ``--set KEY=VALUE`` (``--set NAME.KEY=VALUE`` for
    controller or function NAME), a TOML key, or ``echo VALUE > PATH`` in a --configfs
    script."""
    from vfio_ep.composition import attribute_listing
    from vfio_ep.config import ConfigError

    try:
        rows = attribute_listing(function)
    except ConfigError as e:
        raise click.ClickException(str(e)) from None
    width = max(len(path) for path, _ in rows)
    for path, default in rows:
        click.echo(f"{path:<{width}}  {_shown(path.rsplit('/', 1)[1], default)}")


def _shown(name: str, value: object) -> str:
    """A default as one would write it back: IDs in hex, sizes in K/M/G, lists with commas."""
    from vfio_ep.config import format_size

    if value is None:
        return "(required)"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    if isinstance(value, bool) or not isinstance(value, int):
        return str(value)
    if name.endswith(("id", "_vid", "_pid")):
        return f"{value:#x}"
    return format_size(value)


@main.command()
@verbose_option
@click.option("--qemu", type=click.Path(exists=True, path_type=Path))
@click.option("--linux", type=click.Choice(LINUX_LINES), default=DEFAULT_LINUX,
              show_default=True, help="The kernel line.")
def provision(qemu: Path | None, linux: str) -> None:
    """Provision QEMU, the guest kernel, busybox and the endpoint test (cached)."""
    from vfio_ep.guest.provision import ProvisionError, provision_all

    try:
        assets = provision_all(qemu=qemu, linux=linux)
    except ProvisionError as e:
        raise click.ClickException(str(e)) from None
    click.echo(assets.describe())


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("qemu_args", nargs=-1, type=click.UNPROCESSED, metavar="-- QEMU_ARGS")
def qemu(qemu_args: tuple[str, ...]) -> None:
    """Run the QEMU that `vfio-ep run` uses with QEMU_ARGS: $VFIO_EP_QEMU, a new enough
    qemu-system-x86_64 on PATH, else the provisioned one (fetched on first use), which
    runs only through its private sysroot's loader.  `serve --print-qemu-args` prints
    command lines for it."""
    from vfio_ep.guest.provision import ProvisionError, provision_qemu

    try:
        found = provision_qemu()
    except ProvisionError as e:
        raise click.ClickException(str(e)) from None
    # QEMU takes our place: its exit status, signals and terminal are the caller's.
    os.execve(found.argv[0], [*found.argv, *qemu_args], {**os.environ, **found.env})


@main.command()
@verbose_option
@click.option("--minutes", type=click.FloatRange(min=0), default=30.0, show_default=True,
              help="How long to keep booting guests (at least one run).")
@click.option("--function", type=click.Choice(["pci-epf-test", "pci-epf-vntb"]),
              help="The function to soak (default pci-epf-test: the kselftest; "
              "pci-epf-vntb: the NTB suite's netdev phase).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Set one attribute (repeatable).")
@click.option("--seed", type=int, help="Seed of the random resets and kills (a rerun).")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where logs go.")
def soak(minutes: float, function: str | None, sets: tuple[str, ...], seed: int | None,
         run_dir: Path | None) -> None:
    """One server, guest after guest for MINUTES, with device resets and killed QEMUs
    between runs; prints runs, failures and the server's memory and fds, start to end."""
    from vfio_ep.guest.interrupt import exit_on_interrupt
    from vfio_ep.guest.soak import soak as run_soak

    with exit_on_interrupt():
        raise SystemExit(run_soak(minutes, function, list(sets), seed, run_dir))


@main.command()
@verbose_option
@click.option("--linux", "lines", multiple=True, type=click.Choice(LINUX_LINES),
              help="A kernel line (repeatable; default all).")
@click.option("--out", type=click.Path(path_type=Path), default=Path("results/matrix.md"),
              show_default=True, help="The markdown table.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where the cells' runs go.")
def matrix(lines: tuple[str, ...], out: Path, run_dir: Path | None) -> None:
    """Run the suites on each kernel line (pci-epf-test with each doorbell, or pcitest where
    the kselftest does not exist yet; vNTB; the NTB pair) and print kernel x suite x result."""
    from vfio_ep.guest.interrupt import exit_on_interrupt
    from vfio_ep.guest.matrix import run_matrix

    with exit_on_interrupt():
        raise SystemExit(run_matrix(lines or LINUX_LINES, out, run_dir))
