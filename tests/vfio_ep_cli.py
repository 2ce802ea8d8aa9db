"""`vfio-ep run` as a user types it, for the guest acceptance tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

# Linux 7.3's pci_endpoint_test kselftest: its cases, what a full run reports.
KSELFTEST_CASES = 23


def vfio_ep_run(tmp_path: Path, *args: str, prefix: tuple[str, ...] = ()
                ) -> tuple[subprocess.CompletedProcess[str], dict]:
    """``vfio-ep run --run-dir TMP/run ARGS`` (under ``prefix``, e.g. ``unshare``): its exit
    status and output, and the results.json it wrote (which must exist)."""
    run_dir = tmp_path / "run"
    proc = subprocess.run([*prefix, sys.executable, "-m", "vfio_ep", "run", "--run-dir",
                           str(run_dir), *args], capture_output=True, text=True, timeout=1200)
    results = run_dir / "results.json"
    assert results.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(results.read_text())


def assert_passed(proc: subprocess.CompletedProcess[str], results: dict,
                  names: list[str]) -> None:
    """Every test passed, exactly ``names`` ran, and the exit status says so."""
    failed = [f"{t['name']}: {t['reason']} {t['diagnostics']}" for t in results["tests"]
              if t["status"] != "pass"]
    assert not failed, f"{failed}\n{proc.stdout[-4000:]}"
    assert [t["name"] for t in results["tests"]] == names
    assert proc.returncode == 0 and results["passed"], proc.stderr[-3000:]
