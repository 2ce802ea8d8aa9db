"""The host machine's side of provisioning: its packages, its Debian archive, commands.

Packages newer than the host's release are fetched with a private apt configuration
(:class:`PrivateApt`): nothing in /etc or the system's apt state changes.  The archive is the
one the host's apt already uses (or ``$VFIO_EP_DEBIAN_MIRROR``); no archive is named here.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from vfio_ep.tail import tail

SUITE = "trixie-backports"


class ProvisionError(RuntimeError):
    """Provisioning cannot continue; the message says what to do."""


def say(message: str) -> None:
    print(f"[vfio-ep] {message}", file=sys.stderr, flush=True)


def check_call(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ProvisionError(f"{' '.join(argv)} failed:\n{tail(proc.stdout + proc.stderr)}")


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def unpack_debs(debs: list[Path], sysroot: Path) -> None:
    """Unpack into ``sysroot`` atomically: a half-unpacked sysroot is never mistaken for one."""
    partial = fresh_dir(sysroot.with_name(sysroot.name + ".partial"))
    for deb in debs:
        check_call(["dpkg-deb", "-x", str(deb), str(partial)])
    partial.rename(sysroot)


def ensure_host_packages(packages: Sequence[str], *, force: bool = False) -> None:
    """Install missing host packages with apt-get, or fail naming them.

    ``force`` installs even if dpkg says they are there (a file they provide went missing).
    """
    missing = [p for p in packages if force or not dpkg_installed(p)]
    if not missing:
        return
    hint = f"apt-get install {' '.join(missing)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ProvisionError(f"missing host packages {', '.join(missing)}; install them: {hint}")
    say(f"host: {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise ProvisionError(f"'{' '.join(argv)}' failed; install {', '.join(missing)} "
                                 f"by hand:\n{tail(proc.stdout + proc.stderr)}")


def dpkg_installed(package: str) -> bool:
    if shutil.which("dpkg-query") is None:
        return False
    proc = subprocess.run(["dpkg-query", "-W", "-f=${db:Status-Status}", package],
                          capture_output=True, text=True, check=False)
    return proc.stdout.strip() == "installed"


def debian_mirror() -> str:
    """The Debian archive the host already uses (``$VFIO_EP_DEBIAN_MIRROR`` overrides)."""
    if env := os.environ.get("VFIO_EP_DEBIAN_MIRROR"):
        return env
    for sources in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:") and "security" not in line:
                return line.split()[1]
    classic = Path("/etc/apt/sources.list")
    if classic.is_file():
        for line in classic.read_text().splitlines():
            match = re.match(r"deb\s+(?:\[[^]]*\]\s+)?(\S+)", line)
            if match and "security" not in match.group(1):
                return match.group(1)
    raise ProvisionError("no Debian archive in the host's apt configuration (/etc/apt/"
                         "sources.list, sources.list.d/*.sources): set VFIO_EP_DEBIAN_MIRROR "
                         "to the archive's URI")


class PrivateApt:
    """apt-get on private lists, status and archives: fetches other suites, changes nothing in /etc.

    The package lists are fetched once; later look-ups read them locally, so cached runs stay
    offline. Delete ``<cache>/apt/lists`` to refresh them.
    """

    def __init__(self, root: Path, progress: Callable[[str], None]) -> None:
        self.root = root
        self._progress = progress

    def version(self, package: str) -> str:
        """The candidate version of ``package`` in :data:`SUITE` (fetching the lists if needed)."""
        if not any((self.root / "lists").glob("*_Packages*")):
            self._update()
        found = self._candidate(package)
        if found is None:
            self._update()
            found = self._candidate(package)
        if found is None:
            raise ProvisionError(f"{package} is not in {SUITE} at {debian_mirror()}; "
                                 f"see {self.root / 'sources.list'}")
        return found

    def download_closure(self, package: str, version: str, archives: Path) -> list[Path]:
        """``package`` and every package it depends on, as .deb files (nothing is installed)."""
        fresh_dir(archives / "partial")
        self._run(["apt-get", "-y", "--no-install-recommends", "-t", SUITE, "install",
                   "--download-only", f"{package}={version}"], archives)
        return sorted(archives.glob("*.deb"))

    def download(self, package: str, version: str, archives: Path) -> Path:
        """Just ``package``'s own .deb."""
        fresh_dir(archives)
        self._run(["apt-get", "download", f"{package}={version}"], archives, cwd=archives)
        debs = sorted(archives.glob("*.deb"))
        if len(debs) != 1:
            raise ProvisionError(f"apt-get download {package} left {len(debs)} .deb files")
        return debs[0]

    def _candidate(self, package: str) -> str | None:
        out = self._run(["apt-cache", "-t", SUITE, "policy", package])
        match = re.search(r"^\s*Candidate:\s*(\S+)", out, re.MULTILINE)
        return match.group(1) if match and match.group(1) != "(none)" else None

    def _update(self) -> None:
        self._progress(f"apt: fetching package lists for trixie and {SUITE} (private, "
                       f"{self.root})")
        (self.root / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        mirror = debian_mirror()
        (self.root / "sources.list").write_text(
            f"deb {mirror} trixie main\ndeb {mirror} {SUITE} main\n")
        self._run(["apt-get", "update"])

    def _run(self, argv: list[str], archives: Path | None = None, *,
             cwd: Path | None = None) -> str:
        if shutil.which(argv[0]) is None:
            raise ProvisionError(f"{argv[0]} not found: provisioning QEMU and the kernel source "
                                 "needs a Debian-based host (or pass --qemu and --kernel)")
        cmd = [argv[0], *self._options(archives or self.root / "archives"), *argv[1:]]
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise ProvisionError(f"{' '.join(argv)} failed ({proc.returncode}):\n"
                                 f"{tail(proc.stdout + proc.stderr)}")
        return proc.stdout

    def _options(self, archives: Path) -> list[str]:
        settings = {
            "Dir::Etc::sourcelist": self.root / "sources.list",
            "Dir::Etc::sourceparts": "-",
            "Dir::State::Lists": self.root / "lists",
            "Dir::State::status": self.root / "status",
            "Dir::Cache": self.root,
            "Dir::Cache::Archives": archives,
            "Dir::Cache::pkgcache": self.root / "pkgcache.bin",  # some hosts disable it;
            "Dir::Cache::srcpkgcache": self.root / "srcpkgcache.bin",  # it makes look-ups fast
            "APT::Sandbox::User": "root",
            "Debug::NoLocking": "1",
        }
        return [arg for key, value in settings.items() for arg in ("-o", f"{key}={value}")]
