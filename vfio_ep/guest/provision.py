"""Provision what a guest run needs: QEMU >= 10.1, a guest kernel, its endpoint test, busybox.

Everything comes from Debian's archive (:mod:`vfio_ep.guest.host`) and lands under
:func:`cache_dir`, keyed by package version (and, for the kernel, its fragments' hash), so a
second run neither touches the network nor compiles anything.  Each kernel line
(:data:`~vfio_ep.guest.kernel_build.LINUX_LINES`) is built on first use
(:mod:`vfio_ep.guest.kernel_build`).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vfio_ep.guest.host import (
    SUITE,
    PrivateApt,
    ProvisionError,
    ensure_host_packages,
    fresh_dir,
    say,
    unpack_debs,
)
from vfio_ep.guest.kernel_build import (
    DEFAULT_LINUX,
    EP_GUEST_LINES,
    EPC_MODULE,
    KERNEL_HOST_PACKAGES,
    build_epc_driver,
    build_kernel,
    compile_test_tool,
    endpoint_test,
    epc_driver_digest,
    extract_linux_source,
    fragments,
    install_file,
    is_static_elf,
    prune_build,
    source_package,
    users_kernel,
)
from vfio_ep.tail import tail

QEMU_PACKAGE = "qemu-system-x86"
MIN_QEMU = (10, 1)
MODULES = "modules"  # beside the bzImage: the build's *.ko, flat
BUSYBOX = Path("/bin/busybox")
COLD_NOTE = "cold provisioning takes about 6-8 minutes on 2 cores (cached afterwards)"
MULTIARCH = "usr/lib/x86_64-linux-gnu"

__all__ = ["GuestAssets", "ProvisionError", "Qemu", "cache_dir", "provision_all",
           "provision_qemu"]


@dataclass
class Qemu:
    """How to run qemu-system-x86_64: ``argv`` is the prefix, ``env`` extends the environment."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    version: str = ""


@dataclass
class GuestAssets:
    """Everything a guest run needs, all local files.  ``test`` is the kernel line's endpoint
    test: the kselftest (``test_kind`` "kselftest") or, before 6.14, ``pcitest``."""

    qemu: Qemu
    kernel: Path
    test: Path
    busybox: Path
    modules: tuple[Path, ...] = ()  # the kernel's loadable modules (*.ko), for the initramfs
    linux: str = DEFAULT_LINUX
    test_kind: str = "kselftest"
    epc_driver: Path | None = None  # the EP guest's EPC driver, built for this kernel

    def describe(self) -> str:
        """A human summary, for ``vfio-ep provision``."""
        rows = [
            ("qemu", f"{self.qemu.version}: {' '.join(self.qemu.argv)}"),
            ("kernel", f"{self.kernel} ({_mib(self.kernel)}), Linux {self.linux}"),
            (self.test_kind, f"{self.test} ({_mib(self.test)})"),
            ("busybox", f"{self.busybox} ({_mib(self.busybox)})"),
            ("modules", ", ".join(m.stem for m in self.modules) or "none"),
            ("EP guest", str(self.epc_driver) if self.epc_driver else
             f"no (kernel lines {', '.join(EP_GUEST_LINES)})"),
            ("cache", str(cache_dir())),
        ]
        return "\n".join(f"{name:<10} {value}" for name, value in rows)


def cache_dir() -> Path:
    """``$VFIO_EP_CACHE``, else ``~/.cache/vfio-ep``."""
    env = os.environ.get("VFIO_EP_CACHE")
    return Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "vfio-ep"


def provision_all(qemu: Path | None = None, kernel: Path | None = None,
                  linux: str = DEFAULT_LINUX, kselftest: Path | None = None) -> GuestAssets:
    """Provide QEMU, a bzImage of kernel line ``linux``, its endpoint test and busybox,
    building only what is missing.

    ``qemu`` (or ``$VFIO_EP_QEMU``) and ``kernel`` replace the provisioned ones; the test is
    built from the line's linux-source, since its ABI follows the driver, unless
    ``kselftest`` gives one (from the developer's own tree; static, as the initramfs has no
    libc: ProvisionError otherwise).
    """
    if kselftest is not None and not is_static_elf(kselftest):
        raise ProvisionError(
            f"--kselftest {kselftest}: not a static executable (the guest has no libc): "
            "build it with make -C tools/testing/selftests/pci_endpoint LDFLAGS=-static")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with _locked(root / "provision.lock"):
        prov = _Provisioner(root, linux)
        epc_driver = None
        if kernel:
            image, modules = users_kernel(kernel)
        else:
            image = prov.kernel()
            modules = tuple(sorted((image.parent / MODULES).glob("*.ko")))
            epc_driver = prov.epc_driver(image)
        test, kind = (kselftest, "kselftest") if kselftest else prov.test()
        assets = GuestAssets(
            qemu=prov.qemu(qemu),
            kernel=image,
            test=test,
            busybox=prov.busybox(),
            modules=modules,
            linux=linux,
            test_kind=kind,
            epc_driver=epc_driver,
        )
    if prov.worked:
        say(f"provisioned in {time.monotonic() - started:.0f} s")
    return assets


def provision_qemu(qemu: Path | None = None) -> Qemu:
    """Only the QEMU a run would use (``qemu`` replacing it as in :func:`provision_all`):
    what ``vfio-ep qemu`` runs."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / "provision.lock"):
        return _Provisioner(root, DEFAULT_LINUX).qemu(qemu)


def linux_tree(assets: GuestAssets) -> Path:
    """The source tree the provisioned kernel of ``assets`` was built from (in the cache;
    its directory is named <linux-source version>-<options' digest>)."""
    version = assets.kernel.parent.name.rsplit("-", 1)[0]
    return cache_dir() / "linux" / version / source_package(assets.linux)


def static_busybox() -> Path:
    """The guest's userspace: a static busybox, busybox-static installed if need be."""
    if not is_static_elf(BUSYBOX):
        ensure_host_packages(("busybox-static",), force=True)
    if not is_static_elf(BUSYBOX):
        raise ProvisionError(f"{BUSYBOX} is not a static binary even after installing "
                             "busybox-static")
    return BUSYBOX


class _Provisioner:
    """One provisioning pass of one kernel line; remembers whether anything had to be
    fetched or built."""

    def __init__(self, root: Path, linux: str) -> None:
        self.root = root
        self.linux = linux
        self.package = source_package(linux)
        self.fragments = fragments(linux)
        self.apt = PrivateApt(root / "apt", self._work)
        self.worked = False

    def _work(self, message: str) -> None:
        if not self.worked:
            say(COLD_NOTE)
            self.worked = True
        say(message)

    def qemu(self, explicit: Path | None) -> Qemu:
        """``explicit`` (or $VFIO_EP_QEMU), else a new enough qemu-system-x86_64 on PATH,
        else the private sysroot's (fetched on first use)."""
        explicit = explicit or _env_path("VFIO_EP_QEMU")
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
            unpack_debs(debs, sysroot)
            shutil.rmtree(archives)
        lib = sysroot / MULTIARCH
        return Qemu(
            argv=[str(lib / "ld-linux-x86-64.so.2"), "--library-path", str(lib),
                  str(sysroot / "usr/bin/qemu-system-x86_64"),
                  "-L", str(sysroot / "usr/share/qemu"), "-L", str(sysroot / "usr/share/seabios")],
            env={"QEMU_MODULE_DIR": str(lib / "qemu")},
        )

    def source(self) -> Path:
        """The extracted linux-source tree, shared by the kernel and the test builds."""
        tree = self.root / "linux" / self.linux_version() / self.package
        if not tree.is_dir():
            ensure_host_packages(("xz-utils",))
            version = self.apt.version(self.package)
            self._work(f"linux: fetching {self.package} {version} (~170 MB)")
            archives = self.root / "apt" / "archives" / self.package
            deb = self.apt.download(self.package, version, archives)
            self._work(f"linux: extracting the source into {tree.parent} (~1.5 GB)")
            extract_linux_source(deb, tree, self.package)
            shutil.rmtree(archives)
        return tree

    def linux_version(self) -> str:
        """linux-source's version, path-safe: the cache key of everything built from it."""
        return _safe(self.apt.version(self.package))

    def kernel(self) -> Path:
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in self.fragments))
        out = self.root / "kernel" / f"{self.linux_version()}-{digest.hexdigest()[:12]}"
        image = out / "bzImage"
        if not image.is_file():
            src = self.source()
            ensure_host_packages(KERNEL_HOST_PACKAGES)
            self._work(f"kernel: building bzImage and modules from {src} (4-8 minutes on 2 "
                       "cores)")
            build = out / "build"
            build_kernel(src, build, out / "build.log", self.fragments)
            shutil.copyfile(build / ".config", out / "config")
            modules = fresh_dir(out / MODULES)
            for ko in build.rglob("*.ko"):
                shutil.copyfile(ko, modules / ko.name)
            install_file(build / "arch/x86/boot/bzImage", image)
            prune_build(build)  # kept for out-of-tree modules: the EPC driver
        return image

    def epc_driver(self, image: Path) -> Path | None:
        """The EP guest's EPC driver built against the provisioned kernel ``image`` (its
        kernel line's, where the line can be an EP guest), rebuilt when its sources change."""
        if self.linux not in EP_GUEST_LINES:
            return None
        out = image.parent / f"epc-{epc_driver_digest()}"
        build = image.parent / "build"
        if not (out / EPC_MODULE).is_file() and not (build / "Module.symvers").is_file():
            raise ProvisionError(f"{image.parent} was provisioned without its build directory "
                                 "(needed for the EPC driver): remove it to rebuild")
        if not (out / EPC_MODULE).is_file():
            self._work(f"EPC driver: building {EPC_MODULE} against {image.parent.name}")
            build_epc_driver(build, out)
            for stale in image.parent.glob("epc-*"):  # builds of sources since changed
                if stale != out:
                    shutil.rmtree(stale)
        return out / EPC_MODULE

    def test(self) -> tuple[Path, str]:
        """The line's endpoint test, built static: (binary, "kselftest" or "pcitest")."""
        out = self.root / "kselftest" / self.linux_version()
        for kind, name in (("kselftest", "pci_endpoint_test"), ("pcitest", "pcitest")):
            if (out / name).is_file():
                return out / name, kind
        src = self.source()
        kind, _ = endpoint_test(src)
        binary = out / ("pci_endpoint_test" if kind == "kselftest" else "pcitest")
        self._work(f"{kind}: compiling {binary.name} (static)")
        compile_test_tool(src, binary)
        return binary, kind

    def busybox(self) -> Path:
        return static_busybox()


def _probe(qemu: Qemu) -> Qemu:
    """Fill in ``qemu.version`` by running it."""
    out = _run_qemu(qemu, "--version")
    match = re.search(r"QEMU emulator version (\S+)(?: \(([^)]*)\))?", out)
    if not match:
        raise ProvisionError(f"cannot tell the version of {' '.join(qemu.argv)}:\n{tail(out)}")
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


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialise provisioning between processes sharing a cache (parallel test runs)."""
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _safe(version: str) -> str:
    """A version usable in paths and in ':'-separated search paths."""
    return re.sub(r"[^A-Za-z0-9.+~-]", "_", version)


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
