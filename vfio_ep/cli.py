"""The ``vfio-ep`` command line: serve a device, or boot a guest against one."""

from __future__ import annotations

import logging
from pathlib import Path

import click


@click.group()
@click.option("-v", "--verbose", count=True, help="More logging (-vv for per-message traces).")
def main(verbose: int) -> None:
    """A userspace PCIe endpoint for QEMU guests, over vfio-user."""
    level = logging.WARNING - 10 * min(verbose + 1, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


@main.command()
@click.option("--socket", "socket_path", required=True, type=click.Path(path_type=Path),
              help="UNIX socket path to listen on (created 0600).")
@click.option("--function", default=None, help="Endpoint function to expose.")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path),
              help="TOML file with configfs-named attributes.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override one attribute (repeatable).")
def serve(socket_path: Path, function: str | None, config_file: Path | None,
          sets: tuple[str, ...]) -> None:
    """Serve one endpoint device on SOCKET until SIGINT/SIGTERM."""
    from vfio_ep.serve import serve_forever

    serve_forever(socket_path, function, config_file, list(sets))


@main.command(context_settings={"ignore_unknown_options": True})
@click.option("--function", default=None, help="Endpoint function to expose.")
@click.option("--config", "config_file", type=click.Path(exists=True, path_type=Path))
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE")
@click.option("--kernel", type=click.Path(exists=True, path_type=Path),
              help="Use this bzImage instead of the provisioned one.")
@click.option("--qemu", type=click.Path(exists=True, path_type=Path),
              help="Use this qemu-system-x86_64 (>= 10.1).")
@click.option("--timeout", default=600.0, show_default=True, help="Seconds for the whole run.")
@click.option("--run-dir", type=click.Path(path_type=Path), help="Where logs and results go.")
@click.argument("guest_args", nargs=-1, type=click.UNPROCESSED)
def run(function: str | None, config_file: Path | None, sets: tuple[str, ...],
        kernel: Path | None, qemu: Path | None, timeout: float, run_dir: Path | None,
        guest_args: tuple[str, ...]) -> None:
    """Boot a guest against a fresh vfio-ep and run the pci_endpoint_test kselftest."""
    from vfio_ep.guest.runner import run_kselftest

    raise SystemExit(run_kselftest(function=function, config_file=config_file, sets=list(sets),
                                   kernel=kernel, qemu=qemu, timeout=timeout, run_dir=run_dir,
                                   guest_args=list(guest_args)))


@main.command()
@click.option("--qemu", type=click.Path(exists=True, path_type=Path))
def provision(qemu: Path | None) -> None:
    """Provision QEMU, the guest kernel, busybox and the kselftest (cached)."""
    from vfio_ep.guest.provision import ProvisionError, provision_all

    try:
        assets = provision_all(qemu=qemu)
    except ProvisionError as e:
        raise click.ClickException(str(e)) from None
    click.echo(assets.describe())
