"""``vfio-ep run``: boot a guest against a fresh vfio-ep and run the upstream pci_endpoint_test."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from vfio_ep.guest.launcher import KSELFTEST_NAME, LaunchError, boot_guest
from vfio_ep.guest.provision import ProvisionError, provision_all
from vfio_ep.guest.results import parse_tap, summary_table, write_results


def run_kselftest(function: str | None = None, config_file: Path | None = None,
                  sets: list[str] | None = None, kernel: Path | None = None,
                  qemu: Path | None = None, timeout: float = 600, run_dir: Path | None = None,
                  guest_args: list[str] | None = None) -> int:
    """Run the kselftest in a guest, streaming its TAP; 0 only if every test passed.

    ``guest_args`` go to the kselftest (``-f pci_ep_bar``, ``-t BAR_TEST``...). Returns 1 when a
    test failed or the guest never finished, 2 when provisioning or launching failed.
    """
    try:
        assets = provision_all(qemu=qemu, kernel=kernel)
        result = boot_guest(f"/{KSELFTEST_NAME} {shlex.join(guest_args or [])}",
                            server_args=server_args(function, config_file, sets or []),
                            assets=assets, timeout=timeout, run_dir=run_dir, live=_echo)
    except (ProvisionError, LaunchError) as exc:
        print(f"vfio-ep run: {exc}", file=sys.stderr)
        return 2
    report = parse_tap(result.output)
    write_results(report, result.run_dir, exit_status=result.exit_status, error=result.error)
    print(f"\n{summary_table(report)}")
    if result.error:
        print(f"vfio-ep run: {result.error}", file=sys.stderr)
    print(f"run directory: {result.run_dir}")
    return 0 if result.exit_status == 0 and report.passed else 1


def server_args(function: str | None, config_file: Path | None, sets: list[str]) -> list[str]:
    """``vfio-ep serve`` options for the endpoint under test."""
    args = ["--function", function] if function else []
    if config_file:
        args += ["--config", str(config_file.resolve())]
    for item in sets:
        args += ["--set", item]
    return args


def _echo(line: str) -> None:
    print(line, flush=True)
