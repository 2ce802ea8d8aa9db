"""Building what the guest runs from a linux-source tree: the kernel, the endpoint tests.

Three kernel lines are provisioned (:data:`LINUX_LINES`): their drivers differ (6.12's
ntb_hw_epf can only be a module and knows fewer IDs; it has ``pcitest`` where later lines
have the kselftest), so each gets the common fragment plus its own.  The fragment is merged
into tinyconfig with the kernel's own ``scripts/kconfig/merge_config.sh``, and a symbol that
``olddefconfig`` dropped (a missing dependency) stops the build with its name.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import TextIO

from vfio_ep.guest.assets import KERNEL_FRAGMENTS
from vfio_ep.guest.host import ProvisionError, check_call, ensure_host_packages, fresh_dir, say
from vfio_ep.qemu_dir import EPC_DRIVER
from vfio_ep.tail import tail

LINUX_LINES = ("6.12", "7.2", "7.3")
DEFAULT_LINUX = "7.3"
# Lines whose kernel can also be the EP guest (pci-ep-msi's embedded doorbell, nvmet-pci-epf):
# their kernels get the endpoint framework and functions too.
EP_GUEST_LINES = ("7.2", "7.3")
FRAGMENT = KERNEL_FRAGMENTS / "kernel.config"
EP_GUEST_FRAGMENT = KERNEL_FRAGMENTS / "ep-guest.config"
KSELFTEST_SOURCE = "tools/testing/selftests/pci_endpoint/pci_endpoint_test.c"
PCITEST_SOURCE = "tools/pci/pcitest.c"
KERNEL_HOST_PACKAGES = ("gcc", "make", "libc6-dev", "flex", "bison", "bc", "libelf-dev",
                        "libssl-dev", "xz-utils")


def source_package(linux: str) -> str:
    """The Debian package holding kernel line ``linux``'s source."""
    if linux not in LINUX_LINES:
        raise ProvisionError(f"no kernel line {linux}; vfio-ep provisions "
                             f"{', '.join(LINUX_LINES)}")
    return f"linux-source-{linux}"


def fragments(linux: str) -> list[Path]:
    """The config fragments of kernel line ``linux``: the common one, the EP guest's where
    the line can be one, then its own."""
    own = FRAGMENT.with_name(f"kernel-{linux}.config")
    return [FRAGMENT, *([EP_GUEST_FRAGMENT] if linux in EP_GUEST_LINES else []),
            *([own] if own.is_file() else [])]


def extract_linux_source(deb: Path, tree: Path, package: str) -> None:
    """Pull the source tarball out of the .deb and unpack it once, atomically."""
    work = fresh_dir(tree.with_name(tree.name + ".partial"))
    check_call(["dpkg-deb", "-x", str(deb), str(work / "deb")])
    tarball = next((work / "deb/usr/src").glob(f"{package}.tar.*"), None)
    if tarball is None:
        raise ProvisionError(f"{deb.name} holds no usr/src/{package}.tar.*")
    check_call(["tar", "-xf", str(tarball), "-C", str(work)])
    (work / package).rename(tree)
    shutil.rmtree(work)


def build_kernel(src: Path, build: Path, log: Path, parts: list[Path]) -> None:
    """tinyconfig + the fragments (merge_config.sh) + olddefconfig, check that every
    fragment symbol survived, then bzImage and modules."""
    build.mkdir(parents=True, exist_ok=True)
    make = ["make", "-C", str(src), f"O={build}"]
    with log.open("w") as sink:
        _make([*make, "tinyconfig"], sink, "kernel: tinyconfig")
        config = build / ".config"
        _make([str(src / "scripts/kconfig/merge_config.sh"), "-m", "-O", str(build),
               str(config), *map(str, parts)], sink, "kernel: merge_config.sh", cwd=src)
        _make([*make, "olddefconfig"], sink, "kernel: olddefconfig")
        wanted: dict[str, str] = {}
        for part in parts:
            wanted.update(parse_config(part.read_text()))
        got = parse_config(config.read_text())
        dropped = [sym for sym, val in wanted.items() if got.get(sym, "n") != val]
        if dropped:
            raise ProvisionError(f"olddefconfig dropped {', '.join(dropped)} from "
                                 f"{', '.join(p.name for p in parts)}: fix their "
                                 "dependencies in the fragment")
        _make([*make, f"-j{os.cpu_count() or 1}", "bzImage", "modules"], sink,
              "kernel: bzImage and modules")


# What a kernel build directory keeps for building out-of-tree modules against it later (its
# config, generated headers, Module.symvers, the host tools in scripts/ and tools/): all but
# the objects, the images and the dependency records, ~220 MB that no later build reads.
PRUNED_SUFFIXES = frozenset({".o", ".a", ".ko", ".cmd"})
PRUNED_PREFIXES = (".tmp_vmlinux", "vmlinux")
HOST_TOOLS = ("scripts", "tools")  # their records stay: make checks them before using them
EPC_MODULE = "vfio-ep-epc.ko"


def prune_build(build: Path) -> None:
    """Drop a kernel build directory's objects and images, keeping what ``make M=`` needs."""
    for path in build.rglob("*"):
        if not path.is_file() or path.relative_to(build).parts[0] in HOST_TOOLS:
            continue
        if path.suffix in PRUNED_SUFFIXES or path.name.startswith(PRUNED_PREFIXES):
            path.unlink()


def epc_driver_digest() -> str:
    """The EP guest's EPC driver sources' hash: the cache key of its builds."""
    digest = hashlib.sha256()
    for path in sorted(EPC_DRIVER.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def build_epc_driver(build: Path, out: Path) -> Path:
    """vfio-ep's EPC driver (qemu/kernel/epc) built against kernel build directory ``build``
    with W=1, a warning failing the build: ``out/vfio-ep-epc.ko``."""
    work = fresh_dir(out.with_name(out.name + ".partial"))
    for path in EPC_DRIVER.iterdir():
        if path.is_file():
            shutil.copyfile(path, work / path.name)
    with (work / "build.log").open("w") as sink:
        _make(["make", "-C", str(build), f"M={work}", "W=1", "KCFLAGS=-Werror", "modules"],
              sink, "EPC driver")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return out / EPC_MODULE


def _make(argv: list[str], log: TextIO, label: str, cwd: Path | None = None) -> None:
    """Run a build step with its output in the build log, a heartbeat every 15 s."""
    started = last = time.monotonic()
    compiled = 0
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=cwd)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        compiled += line.lstrip().startswith("CC ")
        if time.monotonic() - last >= 15:
            last = time.monotonic()
            say(f"{label}: {last - started:.0f} s, {compiled} files compiled")
    if proc.wait() != 0:
        log.flush()
        raise ProvisionError(f"{' '.join(argv)} failed; log {log.name}:\n"
                             f"{tail(Path(log.name).read_text())}")


def parse_config(text: str) -> dict[str, str]:
    """Kconfig lines as {symbol: value}, with ``# CONFIG_X is not set`` as ``n``."""
    symbols = {}
    for line in text.splitlines():
        if match := re.match(r"(CONFIG_\w+)=(.*)", line):
            symbols[match.group(1)] = match.group(2)
        elif match := re.match(r"# (CONFIG_\w+) is not set", line):
            symbols[match.group(1)] = "n"
    return symbols


def endpoint_test(src: Path) -> tuple[str, str]:
    """Which endpoint test the tree has: ("kselftest", its source) from 6.14 on, else
    ("pcitest", tools/pci/pcitest.c)."""
    if (src / KSELFTEST_SOURCE).is_file():
        return "kselftest", KSELFTEST_SOURCE
    if (src / PCITEST_SOURCE).is_file():
        return "pcitest", PCITEST_SOURCE
    raise ProvisionError(f"{src} has neither {KSELFTEST_SOURCE} nor {PCITEST_SOURCE}")


def compile_test_tool(src: Path, binary: Path) -> None:
    """The tree's endpoint test, static (it runs in a busybox initramfs)."""
    _, source = endpoint_test(src)
    path = src / source
    tmp = binary.with_name(binary.name + ".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    ensure_host_packages(("gcc", "libc6-dev"))
    # Compiled from its own directory so diagnostics name the file as upstream's do.
    check_call(["gcc", "-static", "-O2", "-Wall", "-I", str(src / "tools/testing/selftests"),
                "-I", str(src / "include/uapi"), "-o", str(tmp), path.name], cwd=path.parent)
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
        return check_bzimage(image), modules
    return check_bzimage(path), ()


def check_bzimage(path: Path) -> Path:
    """A user's kernel must at least be an x86 bzImage (boot protocol magic ``HdrS``)."""
    with path.open("rb") as image:
        image.seek(0x202)
        if image.read(4) != b"HdrS":
            raise ProvisionError(f"{path} is not an x86 bzImage")
    return path.resolve()


def is_static_elf(path: Path) -> bool:
    """An ELF executable without a program interpreter (it runs in any initramfs), as
    binutils' readelf tells."""
    if not path.is_file():
        return False
    ensure_host_packages(("binutils",))
    proc = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True,
                          check=False)
    return proc.returncode == 0 and "Program Headers:" in proc.stdout \
        and "INTERP" not in proc.stdout


def install_file(built: Path, dest: Path) -> None:
    tmp = dest.with_name(dest.name + ".partial")
    shutil.copyfile(built, tmp)
    tmp.rename(dest)
