"""Build the project's container image and run the guest integration suite inside it.

``python -m vfio_ep.guest.container test [PYTEST_ARGS...]`` (``make container-test``) does it all
with podman as root, the way that works on a Debian 12 host without a registry or Docker engine:

1. podman, runc and debootstrap are installed with apt if missing;
2. a containers.conf with ``default_ulimits = []`` is written into the cache and passed through
   ``CONTAINERS_CONF`` (podman's default ulimits cannot be set here), and every podman call runs
   with ``--runtime runc --cgroup-manager=cgroupfs`` (crun cannot, with hybrid cgroups);
3. the base image ``docker.io/library/debian:trixie`` is built once from a minbase debootstrap of
   the host's own Debian archive and ``podman import``-ed (skipped while the image exists);
4. the project image is built from the repository's ``qemu/Containerfile`` (``--pull=never``,
   ``--network=host`` so apt and pip reach their archives);
5. ``vfio-ep provision`` runs in the image with the provisioning cache as a volume (network
   allowed, a no-op when the cache is warm), so the guest kernel is built once for host and
   container alike;
6. the suite (``pytest -m 'guest and not container'``, plus any extra arguments) runs with
   ``--network=none`` and the host's ``/dev/net/tun`` (the TAP test's own namespace).

The image's QEMU is trixie-backports' ``qemu-system-x86``, which provisioning prefers over the
sysroot QEMU the host may have cached in the same volume. No ``/dev/kvm``: guests run under TCG.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

import click

from vfio_ep.guest.host import ProvisionError, debian_mirror, ensure_host_packages
from vfio_ep.guest.provision import cache_dir
from vfio_ep.tail import tail

BASE_IMAGE = "docker.io/library/debian:trixie"
BASE_SUITE = "trixie"
IMAGE = "localhost/vfio-ep-test:latest"
CONTAINER_CACHE = "/root/.cache/vfio-ep"
HOST_PACKAGES = ("podman", "runc", "debootstrap")
_T = TypeVar("_T")
PODMAN_OPTIONS = ("--runtime", "runc", "--cgroup-manager=cgroupfs")
CONTAINERS_CONF = "[containers]\ndefault_ulimits = []\n"
# The host's extra CA certificates (e.g. a TLS-intercepting egress proxy), mounted read-only for
# the build under the image's own /usr/local/share/ca-certificates, where the Containerfile's
# update-ca-certificates takes them in, so pip can reach PyPI as it does on the host.
LOCAL_CA_DIR = Path("/usr/local/share/ca-certificates")
BUILD_CA_DIR = LOCAL_CA_DIR / "host"
# The TUN/TAP device, passed in when the host has it: the TAP test creates its interface in a
# network namespace of its own inside the container (podman gives a container no TUN device).
TUN = Path("/dev/net/tun")
# Keep in step with the Containerfile's CMD: the integration suite, less the tests that
# build and run this image (they need podman and a network, on the host) and the one that
# compiles a kernel (the host's run of it proves the recipe; here it would compile again).
SUITE = ("python", "-m", "pytest", "-m", "guest and not container and not kernel_build",
         "-v", "-ra")
# pytest's temporary directories (each guest test's run directory: console, server log) go to
# the shared cache, so a failure inside the container leaves its logs on the host: under this
# root, pytest-of-root/pytest-N per run, the newest three kept.  Not one --basetemp, which
# pytest empties as it starts: a second checkout's suite would delete a running one's files.
TEMPROOT = "container/tmp"
PROJECT = Path(__file__).resolve().parents[2]


class ContainerError(RuntimeError):
    """The container could not be built or run; the message says what to do."""


class Podman:
    """podman as root with the settings that work on this kind of host."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "containers.conf"

    def setup(self) -> None:
        """Install podman/runc/debootstrap if missing and write the containers.conf."""
        if not all(shutil.which(tool) for tool in ("podman", "runc", "debootstrap")):
            try:
                ensure_host_packages(HOST_PACKAGES)
            except ProvisionError as exc:
                raise ContainerError(f"podman, runc and debootstrap are needed: {exc}") from exc
        for tool in ("podman", "runc", "debootstrap"):
            if not shutil.which(tool):
                raise ContainerError(f"{tool} is still not on PATH after installing "
                                     f"{' '.join(HOST_PACKAGES)}")
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.conf.is_file() or self.conf.read_text() != CONTAINERS_CONF:
            self.conf.write_text(CONTAINERS_CONF)

    def argv(self, *args: str) -> list[str]:
        return ["podman", *PODMAN_OPTIONS, *args]

    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def run(self, *args: str, stdin: int | IO[bytes] | None = None, capture: bool = False,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(self.argv(*args), env=self.env(), stdin=stdin, text=True,
                              capture_output=capture, check=False)
        if check and proc.returncode != 0:
            detail = f":\n{tail(proc.stdout + proc.stderr)}" if capture else ""
            raise ContainerError(f"podman {' '.join(args[:2])} failed ({proc.returncode})"
                                 f"{detail}")
        return proc

    def image_exists(self, name: str) -> bool:
        return self.run("image", "exists", name, check=False, capture=True).returncode == 0


def build_base(podman: Podman, *, rebuild: bool = False) -> None:
    """``docker.io/library/debian:trixie`` from a local minbase debootstrap (no registry)."""
    if not rebuild and podman.image_exists(BASE_IMAGE):
        _say(f"base image {BASE_IMAGE}: present")
        return
    mirror = debian_mirror()
    rootfs = podman.root / f"rootfs-{BASE_SUITE}"
    if rootfs.exists():
        shutil.rmtree(rootfs)
    with _step(f"base image: debootstrap --variant=minbase {BASE_SUITE} from {mirror} "
               "(~20-60 s, ~210 MB)"):
        proc = subprocess.run(["debootstrap", "--variant=minbase", BASE_SUITE, str(rootfs),
                               mirror], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            log = rootfs / "debootstrap/debootstrap.log"
            extra = f"\n{tail(log.read_text())}" if log.is_file() else ""
            raise ContainerError(f"debootstrap failed ({proc.returncode}):\n"
                                 f"{tail(proc.stdout + proc.stderr)}{extra}")
    with _step(f"base image: podman import as {BASE_IMAGE}"):
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."],
                               stdout=subprocess.PIPE)
        try:
            podman.run("import", "-", BASE_IMAGE, stdin=tar.stdout, capture=True)
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        shutil.rmtree(rootfs)
        if tar.returncode != 0:
            raise ContainerError(f"tar of {rootfs} failed ({tar.returncode})")


def build_image(podman: Podman, image: str = IMAGE, context: Path = PROJECT, *,
                no_cache: bool = False) -> str:
    """The project image from ``qemu/Containerfile`` (apt layers are cached by podman); its ID.

    The build context is a checkout: the image installs the project from its sources.  Run
    the image by the ID: the tag is one per machine, and another checkout's build may move it
    to its own sources while this one's suite is starting.
    """
    containerfile = context / "qemu" / "Containerfile"
    if not containerfile.is_file():
        raise ContainerError(f"no {containerfile}: run this from a checkout of vfio-ep "
                             "(the image is built from the sources)")
    args = ["build", "--pull=never", "--network=host", "-t", image, "-f", str(containerfile)]
    if no_cache:
        args.append("--no-cache")
    if any(LOCAL_CA_DIR.glob("*.crt")):
        args += ["--volume", f"{LOCAL_CA_DIR}:{BUILD_CA_DIR}:ro"]
    iidfile = podman.root / f"iid-{os.getpid()}"
    args += ["--iidfile", str(iidfile)]
    with _step(f"project image {image}: podman build (cold ~2-4 min, cached layers seconds)"):
        try:
            podman.run(*args, str(context))
            return iidfile.read_text().strip()
        finally:
            iidfile.unlink(missing_ok=True)


def run_in_image(podman: Podman, command: Sequence[str], *, image: str = IMAGE,
                 network: str = "none", cache: Path | None = None,
                 env: Mapping[str, str] | None = None) -> int:
    """Run ``command`` in a fresh container with the provisioning cache mounted; its status.

    The container is named, and removed if this process is interrupted (Ctrl-C, SIGTERM), so
    no guest outlives the run.
    """
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    name = f"vfio-ep-{os.getpid()}-{next(_serial)}"
    devices = ["--device", str(TUN)] if TUN.exists() else []
    variables = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
    options = [f"--network={network}", *devices, *variables, "-v", f"{cache}:{CONTAINER_CACHE}"]
    argv = ["run", "--rm", "--name", name, *options, image, *command]
    _say(f"$ podman run --rm {' '.join(options)} {image} {' '.join(command)}")
    proc = subprocess.Popen(podman.argv(*argv), env=podman.env())
    try:
        return proc.wait()
    except BaseException:
        _say(f"interrupted: removing container {name}")
        podman.run("rm", "--force", "--time", "5", name, capture=True, check=False)
        proc.kill()
        proc.wait()
        raise


_serial = itertools.count(1)


def prepare(*, image: str = IMAGE, build: bool = True,
            rebuild_base: bool = False) -> tuple[Podman, str]:
    """Tools, base image, project image and a provisioned cache: ready to run the suite in
    the image returned (the ID of the one just built, or ``image`` as it is)."""
    podman = Podman(cache_dir() / "container")
    podman.setup()
    if build:
        build_base(podman, rebuild=rebuild_base)
        image = build_image(podman, image)
    elif not podman.image_exists(image):
        raise ContainerError(f"{image} does not exist; build it (drop --no-build)")
    with _step("provision inside the container (QEMU from trixie-backports; the kernel is "
               "reused from the shared cache, or built there once)"):
        status = run_in_image(podman, ["python", "-m", "vfio_ep", "provision"], image=image,
                              network="host")
        if status != 0:
            raise ContainerError(f"provisioning inside {image} failed ({status})")
    return podman, image


@click.group()
def main() -> None:
    """Build the vfio-ep container image (podman) and run the guest tests in it."""


_image = click.option("--image", default=IMAGE, show_default=True, help="Project image name.")
_passthrough = {"ignore_unknown_options": True, "allow_interspersed_args": False}


@main.command()
@_image
@click.option("--rebuild-base", is_flag=True, help="Debootstrap the base image again.")
@click.option("--no-cache", is_flag=True, help="Rebuild every layer of the project image.")
def build(image: str, rebuild_base: bool, no_cache: bool) -> None:
    """Build the base image (once) and the project image."""
    podman = Podman(cache_dir() / "container")
    _guard(podman.setup)
    _guard(lambda: build_base(podman, rebuild=rebuild_base))
    _guard(lambda: build_image(podman, image, no_cache=no_cache))


@main.command(context_settings=_passthrough)
@_image
@click.option("--no-build", is_flag=True, help="Use the existing image as it is.")
@click.option("--rebuild-base", is_flag=True, help="Debootstrap the base image again.")
@click.argument("pytest_args", nargs=-1, type=click.UNPROCESSED)
def test(image: str, no_build: bool, rebuild_base: bool, pytest_args: tuple[str, ...]) -> None:
    """Run the guest integration suite (pytest -m "guest and not container") in the container.

    Extra arguments go to pytest, e.g. ``-k doorbell``.
    """
    started = time.monotonic()
    podman, built = _guard(lambda: prepare(image=image, build=not no_build,
                                           rebuild_base=rebuild_base))
    own_temp = any(a.startswith("--basetemp") for a in pytest_args)
    env = {} if own_temp else {"PYTEST_DEBUG_TEMPROOT": f"{CONTAINER_CACHE}/{TEMPROOT}"}
    (cache_dir() / TEMPROOT).mkdir(parents=True, exist_ok=True)  # pytest makes only its own
    with _step("integration suite in the container (--network=none)"):
        status = run_in_image(podman, [*SUITE, *pytest_args], image=built, env=env)
    if status != 0 and not own_temp:
        _say("the tests' run directories (console, server log) are in the newest pytest-N of "
             f"{cache_dir() / TEMPROOT / 'pytest-of-root'}")
    _finish(status, started, "container suite")


@main.command(context_settings=_passthrough)
@_image
@click.option("--no-build", is_flag=True, help="Use the existing image as it is.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(image: str, no_build: bool, command: tuple[str, ...]) -> None:
    """Run COMMAND in the container, e.g. ``vfio-ep run -- -f pci_ep_basic``."""
    started = time.monotonic()
    podman, built = _guard(lambda: prepare(image=image, build=not no_build))
    with _step(f"{command[0]} in the container (--network=none)"):
        status = run_in_image(podman, list(command), image=built)
    _finish(status, started, command[0])


def _guard(action: Callable[[], _T]) -> _T:
    """``action()``, with a provisioning failure said in one line and exit status 2."""
    try:
        return action()
    except (ContainerError, ProvisionError) as exc:
        _say(f"error: {exc}")
        raise SystemExit(2) from exc


def _finish(status: int, started: float, what: str) -> None:
    verdict = "passed" if status == 0 else f"FAILED (exit status {status})"
    _say(f"{what} {verdict}; {time.monotonic() - started:.0f} s in all")
    raise SystemExit(status)


class _step:
    """Say what starts and how long it took."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        _say(f"{self.what} ...")
        self.started = time.monotonic()

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            _say(f"... done in {time.monotonic() - self.started:.1f} s")



def _say(message: str) -> None:
    print(f"[vfio-ep container] {message}", file=sys.stderr, flush=True)


def _sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _sigterm)
    main()
