"""Run directories: one per run under the cache's runs/, the oldest pruned."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from vfio_ep.guest.provision import cache_dir

KEEP_RUNS = 20  # run directories kept under the cache's runs/ (VFIO_EP_KEEP_RUNS)


def new_run_dir(run_dir: Path | None) -> Path:
    """``run_dir`` (created), else a fresh directory under the cache's runs/.

    The oldest there go beyond ``$VFIO_EP_KEEP_RUNS`` (KEEP_RUNS by default), except a run
    whose process is still alive (its ``owner`` file names it): a long matrix is never
    pruned under its own feet by the runs started beside it."""
    if run_dir:
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir.resolve()
    runs = cache_dir() / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    keep = int(os.environ.get("VFIO_EP_KEEP_RUNS", KEEP_RUNS))
    for old in sorted(runs.iterdir())[: -keep or None]:
        if not _owner_alive(old):
            shutil.rmtree(old, ignore_errors=True)
    new = Path(tempfile.mkdtemp(prefix=time.strftime("%Y%m%d-%H%M%S-"), dir=runs))
    (new / "owner").write_text(f"{os.getpid()}\n")
    return new


def _owner_alive(run: Path) -> bool:
    try:
        os.kill(int((run / "owner").read_text()), 0)
    except PermissionError:
        return True  # another user's, alive
    except (OSError, ValueError):
        return False  # no owner file, or its process is gone
    return True

