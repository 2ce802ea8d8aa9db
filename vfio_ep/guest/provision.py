"""Provision what a guest run needs: QEMU >= 10.1, a guest kernel, the kselftest and busybox.

Everything comes from Debian's archive and lands under :func:`cache_dir`, keyed by package
version (and, for the kernel, the config fragment's hash), so a second run neither touches the
network nor compiles anything. Packages newer than the host's release are fetched with a
private apt configuration: nothing in /etc or the system's apt state changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

SUITE = "trixie-backports"
QEMU_PACKAGE = "qemu-system-x86"
LINUX_SOURCE = "linux-source-7.3"
MIN_QEMU = (10, 1)
FRAGMENT = Path(__file__).with_name("kernel.config")
MODULES = "modules"  # beside the bzImage: the build's *.ko, flat
KSELFTEST_DIR = "tools/testing/selftests"
KSELFTEST_SOURCE = f"{KSELFTEST_DIR}/pci_endpoint/pci_endpoint_test.c"
BUSYBOX = Path("/bin/busybox")
KERNEL_HOST_PACKAGES = ("gcc", "make", "libc6-dev", "flex", "bison", "bc", "libelf-dev",
                        "libssl-dev", "xz-utils")
COLD_NOTE = "cold provisioning takes about 6-8 minutes on 2 cores (cached afterwards)"
MULTIARCH = "usr/lib/x86_64-linux-gnu"


class ProvisionError(RuntimeError):
    """Provisioning cannot continue; the message says what to do."""


@dataclass
class Qemu:
    """How to run qemu-system-x86_64: ``argv`` is the prefix, ``env`` extends the environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""


@dataclass
class GuestAssets:
    """Everything a guest run needs, all local files."""

    qemu: Qemu
    kernel: Path
    kselftest: Path
    busybox: Path
    modules: tuple[Path, ...] = ()  # the kernel's loadable modules (*.ko), for the initramfs

    def describe(self) -> str:
        """A human summary, for ``vfio-ep provision``."""
        rows = [
            ("qemu", f"{self.qemu.version}: {' '.join(self.qemu.argv)}"),
            ("kernel", f"{self.kernel} ({_mib(self.kernel)})"),
            ("kselftest", f"{self.kselftest} ({_mib(self.kselftest)})"),
            ("busybox", f"{self.busybox} ({_mib(self.busybox)})"),
            ("modules", ", ".join(m.stem for m in self.modules) or "none"),
            ("cache", str(cache_dir())),
        ]
        return "\n".join(f"{name:<10} {value}" for name, value in rows)


def cache_dir() -> Path:
    """``$VFIO_EP_CACHE``, else ``~/.cache/vfio-ep``."""
    env = os.environ.get("VFIO_EP_CACHE")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "vfio-ep"


def provision_all(qemu: Path | None = None, kernel: Path | None = None) -> GuestAssets:
    """Provide QEMU, a bzImage, the static kselftest and busybox, building only what is missing.

    ``qemu`` (or ``$VFIO_EP_QEMU``) and ``kernel`` replace the provisioned ones; the kselftest is
    always built from ``linux-source``, since its ABI follows the driver, not the kernel build.
    """
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(root / "provision.lock"):
        prov = _Provisioner(root)
        if kernel:
            image, modules = users_kernel(kernel)
        else:
            image = prov.kernel()
            modules = tuple(sorted((image.parent / MODULES).glob("*.ko")))
        assets = GuestAssets(
            qemu=prov.qemu(qemu or _env_path("VFIO_EP_QEMU")),
            kernel=image,
            kselftest=prov.kselftest(),
            busybox=prov.busybox(),
            modules=modules,
        )
    if prov.worked:
        _say(f"provisioned in {time.monotonic() - started:.0f} s")
    return assets


def static_busybox() -> Path:
    """The guest's userspace: a static busybox, busybox-static installed if need be."""
    if not _is_static_elf(BUSYBOX):
        ensure_host_packages(("busybox-static",), force=True)
    if not _is_static_elf(BUSYBOX):
        raise ProvisionError(f"{BUSYBOX} is not a static binary even after installing "
                             "busybox-static")
    return BUSYBOX


class _Provisioner:
    """One provisioning pass; remembers whether anything had to be fetched or built."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.apt = PrivateApt(root / "apt", self._work)
        self.worked = False

    def _work(self, message: str) -> None:
        if not self.worked:
            _say(COLD_NOTE)
            self.worked = True
        _say(message)

    def qemu(self, explicit: Path | None) -> Qemu:
        if explicit:
            return _require_vfio_user(_probe(Qemu(argv=[str(explicit)])), str(explicit))
        system = shutil.which("qemu-system-x86_64")
        if system:
            found = _probe(Qemu(argv=[system]))
            if _version_tuple(found.version) >= MIN_QEMU and _has_vfio_user(found):
                return found
        return _require_vfio_user(_probe(self._sysroot_qemu()), f"{QEMU_PACKAGE} from {SUITE}")

    def _sysroot_qemu(self) -> Qemu:
        version = self.apt.version(QEMU_PACKAGE)
        sysroot = self.root / "qemu" / _safe(version) / "sysroot"
        if not sysroot.is_dir():
            self._work(f"qemu: fetching {QEMU_PACKAGE} {version} and its libraries from {SUITE}")
            archives = self.root / "apt" / "archives" / QEMU_PACKAGE
            debs = self.apt.download_closure(QEMU_PACKAGE, version, archives)
            self._work(f"qemu: unpacking {len(debs)} packages into {sysroot}")
            _unpack_debs(debs, sysroot)
            shutil.rmtree(archives)
        lib = sysroot / MULTIARCH
        return Qemu(
            argv=[str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
                  str(sysroot / "usr/bin/qemu-system-x86_64"),
                  "-L", str(sysroot / "usr/share/qemu"), "-L", str(sysroot / "usr/share/seabios")],
            env={"QEMU_MODULE_DIR": str(lib / "qemu")},
        )

    def source(self) -> Path:
        """The extracted linux-source tree, shared by the kernel and the kselftest builds."""
        tree = self.root / "linux" / self.linux_version() / LINUX_SOURCE
        if not tree.is_dir():
            ensure_host_packages(("xz-utils",))
            version = self.apt.version(LINUX_SOURCE)
            self._work(f"linux: fetching {LINUX_SOURCE} {version} (~170 MB)")
            archives = self.root / "apt" / "archives" / LINUX_SOURCE
            deb = self.apt.download(LINUX_SOURCE, version, archives)
            self._work(f"linux: extracting the source into {tree.parent} (~1.5 GB)")
            _extract_linux_source(deb, tree)
            shutil.rmtree(archives)
        return tree

    def linux_version(self) -> str:
        """linux-source's version, path-safe: the cache key of everything built from it."""
        return _safe(self.apt.version(LINUX_SOURCE))

    def kernel(self) -> Path:
        fragment_hash = hashlib.sha256(FRAGMENT.read_bytes()).hexdigest()[:12]
        out = self.root / "kernel" / f"{self.linux_version()}-{fragment_hash}"
        image = out / "bzImage"
        if not image.is_file():
            src = self.source()
            ensure_host_packages(KERNEL_HOST_PACKAGES)
            self._work(f"kernel: building bzImage and modules from {src} (4-8 minutes on 2 "
                       "cores)")
            build = out / "build"
            _build_kernel(src, build, out / "build.log")
            shutil.copyfile(build / ".config", out / "config")
            modules = _fresh_dir(out / MODULES)
            for ko in build.rglob("*.ko"):
                shutil.copyfile(ko, modules / ko.name)
            _install_file(build / "arch/x86/boot/bzImage", image)
            shutil.rmtree(build)  # ~230 MB of objects that no later run reuses
        return image

    def kselftest(self) -> Path:
        binary = self.root / "kselftest" / self.linux_version() / "pci_endpoint_test"
        if not binary.is_file():
            src = self.source()
            ensure_host_packages(("gcc", "libc6-dev"))
            self._work("kselftest: compiling pci_endpoint_test (static)")
            _compile_kselftest(src, binary)
        return binary

    def busybox(self) -> Path:
        return static_busybox()


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
        _fresh_dir(archives / "partial")
        self._run(["apt-get", "-y", "--no-install-recommends", "-t", SUITE, "install",
                   "--download-only", f"{package}={version}"], archives)
        return sorted(archives.glob("*.deb"))

    def download(self, package: str, version: str, archives: Path) -> Path:
        """Just ``package``'s own .deb."""
        _fresh_dir(archives)
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
                                 f"{_tail(proc.stdout + proc.stderr)}")
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


def ensure_host_packages(packages: Sequence[str], *, force: bool = False) -> None:
    """Install missing host packages with apt-get, or fail naming them.

    ``force`` installs even if dpkg says they are there (a file they provide went missing).
    """
    missing = [p for p in packages if force or not _dpkg_installed(p)]
    if not missing:
        return
    hint = f"apt-get install {' '.join(missing)}"
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ProvisionError(f"missing host packages {', '.join(missing)}; install them: {hint}")
    _say(f"host: {hint}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update"],
                 ["apt-get", "install", "-y", "--no-install-recommends", *missing]):
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
        if proc.returncode != 0:
            raise ProvisionError(f"'{' '.join(argv)}' failed; install {', '.join(missing)} "
                                 f"by hand:\n{_tail(proc.stdout + proc.stderr)}")


def _dpkg_installed(package: str) -> bool:
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
    return "http://deb.debian.org/debian"


def _probe(qemu: Qemu) -> Qemu:
    """Fill in ``qemu.version`` by running it."""
    out = _run_qemu(qemu, "--version")
    match = re.search(r"QEMU emulator version (\S+)(?: \(([^)]*)\))?", out)
    if not match:
        raise ProvisionError(f"cannot tell the version of {' '.join(qemu.argv)}:\n{_tail(out)}")
    qemu.version = f"{match.group(1)} ({match.group(2)})" if match.group(2) else match.group(1)
    return qemu


def _has_vfio_user(qemu: Qemu) -> bool:
    return '"vfio-user-pci"' in _run_qemu(qemu, "-device", "help")


def _require_vfio_user(qemu: Qemu, what: str) -> Qemu:
    if _version_tuple(qemu.version) < MIN_QEMU or not _has_vfio_user(qemu):
        raise ProvisionError(f"{what} (QEMU {qemu.version}) has no vfio-user-pci device; "
                             f"vfio-ep needs QEMU >= {'.'.join(map(str, MIN_QEMU))} built with it")
    return qemu


def _run_qemu(qemu: Qemu, *args: str) -> str:
    try:
        proc = subprocess.run([*qemu.argv, *args], capture_output=True, text=True, timeout=60,
                              env={**os.environ, **qemu.env}, check=False)
    except OSError as exc:
        raise ProvisionError(f"cannot run {qemu.argv[0]}: {exc}") from exc
    return proc.stdout + proc.stderr


def _version_tuple(version: str) -> tuple[int, ...]:
    if not version:
        return ()
    return tuple(int(part) for part in re.findall(r"\d+", version.split()[0])[:2])


def _unpack_debs(debs: list[Path], sysroot: Path) -> None:
    """Unpack into ``sysroot`` atomically: a half-unpacked sysroot is never mistaken for one."""
    partial = _fresh_dir(sysroot.with_name(sysroot.name + ".partial"))
    for deb in debs:
        _check_call(["dpkg-deb", "-x", str(deb), str(partial)])
    partial.rename(sysroot)


def _extract_linux_source(deb: Path, tree: Path) -> None:
    """Pull the source tarball out of the .deb and unpack it once, atomically."""
    work = _fresh_dir(tree.with_name(tree.name + ".partial"))
    _check_call(["dpkg-deb", "-x", str(deb), str(work / "deb")])
    tarball = next((work / "deb/usr/src").glob(f"{LINUX_SOURCE}.tar.*"), None)
    if tarball is None:
        raise ProvisionError(f"{deb.name} holds no usr/src/{LINUX_SOURCE}.tar.*")
    _check_call(["tar", "-xf", str(tarball), "-C", str(work)])
    (work / LINUX_SOURCE).rename(tree)
    shutil.rmtree(work)


def _build_kernel(src: Path, build: Path, log: Path) -> None:
    """tinyconfig + fragment + olddefconfig, verify the fragment survived, then bzImage."""
    build.mkdir(parents=True, exist_ok=True)
    make = ["make", "-C", str(src), f"O={build}"]
    with log.open("w") as sink:
        _make([*make, "tinyconfig"], sink, "kernel: tinyconfig")
        fragment = _parse_config(FRAGMENT.read_text())
        config = build / ".config"
        config.write_text(_merge_config(config.read_text(), fragment))
        _make([*make, "olddefconfig"], sink, "kernel: olddefconfig")
        dropped = _dropped_symbols(fragment, _parse_config(config.read_text()))
        if dropped:
            raise ProvisionError(f"olddefconfig dropped {', '.join(dropped)} from "
                                 f"{FRAGMENT.name}: fix their dependencies in the fragment")
        _make([*make, f"-j{os.cpu_count() or 1}", "bzImage", "modules"], sink,
              "kernel: bzImage and modules")


def _make(argv: list[str], log: TextIO, label: str) -> None:
    """Run make with its output in the build log, printing a heartbeat every 15 s."""
    started = last = time.monotonic()
    compiled = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        compiled += line.lstrip().startswith("CC ")
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            _say(f"{label}: {last - started:.0f} s, {compiled} files compiled")
    if proc.wait() != 0:
        log.flush()
        raise ProvisionError(f"{' '.join(argv)} failed; log {log.name}:\n"
                             f"{_tail(Path(log.name).read_text())}")


def _parse_config(text: str) -> dict[str, str]:
    """Kconfig lines as {symbol: value}, with ``# CONFIG_X is not set`` as ``n``."""
    symbols = {}
    for line in text.splitlines():
        if match := re.match(r"(CONFIG_\w+)=(.*)", line):
            symbols[match.group(1)] = match.group(2)
        elif match := re.match(r"# (CONFIG_\w+) is not set", line):
            symbols[match.group(1)] = "n"
    return symbols


def _merge_config(base: str, fragment: dict[str, str]) -> str:
    """``base`` with every fragment symbol replaced or appended."""
    kept = [line for line in base.splitlines()
            if not any(re.match(rf"(# )?{sym}[= ]", line) for sym in fragment)]
    added = [f"{sym}={val}" if val != "n" else f"# {sym} is not set"
             for sym, val in fragment.items()]
    return "\n".join(kept + added) + "\n"


def _dropped_symbols(wanted: dict[str, str], got: dict[str, str]) -> list[str]:
    return [sym for sym, val in wanted.items() if got.get(sym, "n") != val]


def _compile_kselftest(src: Path, binary: Path) -> None:
    selftests = src / KSELFTEST_DIR
    tmp = binary.with_name(binary.name + ".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    source = src / KSELFTEST_SOURCE
    # Compiled from its own directory so diagnostics name the file as upstream's do.
    _check_call(["gcc", "-static", "-O2", "-Wall", "-I", str(selftests),
                 "-I", str(src / "include/uapi"), "-o", str(tmp), source.name],
                cwd=source.parent)
    tmp.rename(binary)


def users_kernel(path: Path) -> tuple[Path, tuple[Path, ...]]:
    """A developer's kernel: a bzImage, or a build directory (``O=``) whose bzImage boots
    and whose modules (every ``*.ko`` in it) go into the initramfs, so ``=m`` drivers load."""
    if path.is_dir():
        image = path / "arch/x86/boot/bzImage"
        if not image.is_file():
            raise ProvisionError(f"{path} is a directory without arch/x86/boot/bzImage: "
                                 "build the kernel there (make O=... bzImage modules)")
        modules = tuple(sorted(path.resolve().rglob("*.ko")))
        names = [m.name for m in modules]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ProvisionError(f"{path}: modules with the same name in two places "
                                 f"({', '.join(twice)}): the initramfs keeps one per name")
        return _check_bzimage(image), modules
    return _check_bzimage(path), ()


def _check_bzimage(path: Path) -> Path:
    """A user's kernel must at least be an x86 bzImage (boot protocol magic ``HdrS``)."""
    with path.open("rb") as image:
        image.seek(0x202)
        if image.read(4) != b"HdrS":
            raise ProvisionError(f"{path} is not an x86 bzImage")
    return path.resolve()


def _is_static_elf(path: Path) -> bool:
    """True for an ELF file without a PT_INTERP program header (it runs in any initramfs)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    entsize = int.from_bytes(data[0x36:0x38], "little")
    count = int.from_bytes(data[0x38:0x3A], "little")
    types = (int.from_bytes(data[phoff + i * entsize:][:4], "little") for i in range(count))
    return 3 not in types


def _install_file(built: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(built, tmp)
    tmp.rename(dest)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise provisioning between processes sharing a cache (parallel test runs)."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


def _check_call(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ProvisionError(f"{' '.join(argv)} failed:\n{_tail(proc.stdout + proc.stderr)}")


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _safe(version: str) -> str:
    """A version usable in paths and in ':'-separated search paths."""
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _say(message: str) -> None:
    print(f"[vfio-ep] {message}", file=sys.stderr, flush=True)

