"""Build the default Linux guest image from Debian packages, without installing them.

Steps: resolve the kernel package behind ``linux-image-cloud-amd64``,
``apt-get download`` it and ``busybox-static``, ``dpkg-deb -x`` both into a
scratch directory, compile the workload statically, write an uncompressed
newc initramfs (busybox, /init, the workload, /dev/console), extract the raw
ELF kernel from the bzImage, and write everything plus ``manifest.json`` into
a temporary directory that is renamed into place only when complete.

An existing complete image whose sources (workload.c, init.sh, this builder's
format) are unchanged is reused without any work or network access.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vmigrate.vmm.image.bzimage import extract_vmlinux
from vmigrate.vmm.image.cpio import CpioWriter
from vmigrate.vmm.image.errors import ImageBuildError

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
BUSYBOX_PACKAGE = "busybox-static"
FORMAT_VERSION = 1  # bump when the image layout or contents change
MIN_FREE_BYTES = 400 << 20  # downloads ~30 MB, extracted ~110 MB, image ~60 MB
SUBPROCESS_TIMEOUT_S = 600

_HERE = Path(__file__).resolve().parent
WORKLOAD_SOURCE = _HERE / "workload.c"
INIT_SCRIPT = _HERE / "init.sh"

BZIMAGE_NAME = "bzImage"
VMLINUX_NAME = "vmlinux"
INITRAMFS_NAME = "initramfs.cpio"
WORKLOAD_NAME = "workload"
MANIFEST_NAME = "manifest.json"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class GuestImage:
    """A built guest image: the files a VMM needs to boot the workload guest."""

    directory: Path
    bzimage: Path
    vmlinux: Path  # the raw ELF kernel, for direct boot
    initramfs: Path  # uncompressed newc cpio
    workload: Path  # the static workload binary (also inside the initramfs)
    kernel_version: str  # uname -r, e.g. "6.1.0-56-cloud-amd64"
    kernel_package: str
    kernel_package_version: str
    busybox_version: str
    compressor: str  # how the bzImage payload was compressed
    manifest: Path

    @classmethod
    def from_manifest(cls, directory: Path) -> GuestImage:
        path = directory / MANIFEST_NAME
        data = json.loads(path.read_text())
        return cls(
            directory=directory,
            bzimage=directory / BZIMAGE_NAME,
            vmlinux=directory / VMLINUX_NAME,
            initramfs=directory / INITRAMFS_NAME,
            workload=directory / WORKLOAD_NAME,
            kernel_version=data["kernel"]["release"],
            kernel_package=data["kernel"]["package"],
            kernel_package_version=data["kernel"]["version"],
            busybox_version=data["busybox"]["version"],
            compressor=data["kernel"]["compressor"],
            manifest=path,
        )


def default_image_dir() -> Path:
    """Where the shared default image lives: $VMIGRATE_IMAGE_DIR, else the user cache."""
    env = os.environ.get("VMIGRATE_IMAGE_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vmigrate" / "linux-guest"


def _size_arg(value: int | str) -> str:
    if isinstance(value, str):
        return value
    for shift, suffix in ((30, "G"), (20, "M"), (10, "K")):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


def kernel_cmdline(
    ws: int | str = "256M",
    rate: int | str = 0,
    *,
    verify: int | str | None = None,
    console: str = "ttyS0",
    extra: str = "",
) -> str:
    """Kernel command line booting the workload: sizes in bytes, or strings like "256M"."""
    words = [f"console={console}", "panic=-1", "quiet"]
    words += [f"vmigrate.ws={_size_arg(ws)}", f"vmigrate.rate={_size_arg(rate)}"]
    if verify is not None:
        words.append(f"vmigrate.verify={_size_arg(verify)}")
    if extra:
        words.append(extra)
    return " ".join(words)


# -- helpers ---------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _source_hashes() -> dict[str, str]:
    return {p.name: _sha256(p) for p in (WORKLOAD_SOURCE, INIT_SCRIPT)}


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # apt prints warnings after the real error; prefer a line that says E:/error.
    for ln in lines:
        if re.search(r"^E:|\berror:|\bfatal:", ln, re.IGNORECASE):
            return ln
    return lines[-1] if lines else "(no output)"


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    """Run a command; turn any failure into a one-line ImageBuildError."""
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
    except FileNotFoundError:
        raise ImageBuildError(f"{what}: {cmd[0]} not found")
    except subprocess.TimeoutExpired:
        raise ImageBuildError(f"{what}: {cmd[0]} did not finish in {SUBPROCESS_TIMEOUT_S} s")
    if proc.returncode != 0:
        output = proc.stderr + proc.stdout
        if "No space left on device" in output:
            raise ImageBuildError(f"{what}: disk full (no space left on device)")
        raise ImageBuildError(f"{what} failed: {_last_line(output)}")
    return proc.stdout


def _check_tools(cc: str) -> None:
    for tool, pkg in (("apt-get", "apt"), ("apt-cache", "apt"), ("dpkg-deb", "dpkg")):
        if shutil.which(tool) is None:
            raise ImageBuildError(f"{tool} not found: the image builder needs Debian's {pkg}")
    if shutil.which(cc) is None:
        raise ImageBuildError(f"C compiler {cc!r} not found: install gcc (apt-get install gcc)")


def _check_free_space(directory: Path, min_free: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < min_free:
        raise ImageBuildError(
            f"disk full: {free >> 20} MiB free in {directory}, the build needs {min_free >> 20} MiB"
        )


@contextlib.contextmanager
def _disk_errors(where: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ImageBuildError(f"disk full while writing the image under {where}")
        raise


def resolve_kernel_package(meta: str = KERNEL_META_PACKAGE) -> str:
    """The versioned kernel package (linux-image-X.Y.Z-N-cloud-amd64) a metapackage names."""
    out = _run(["apt-cache", "depends", meta], f"apt-cache depends {meta} (apt-get update needed?)")
    for line in out.splitlines():
        m = re.match(r"\s*\|?Depends:\s*(linux-image-\S+)", line)
        if m and not m.group(1).endswith("-dbg"):
            return m.group(1)
    raise ImageBuildError(
        f"{meta} names no kernel package (is the apt package list current? run apt-get update)"
    )


def apt_download(packages: list[str], dest: Path) -> list[Path]:
    """apt-get download packages into dest; returns the .deb files."""
    cmd = ["apt-get", "download", "-q"]
    if os.geteuid() == 0:
        cmd += ["-o", "APT::Sandbox::User=root"]  # the _apt user cannot write dest
    _run(cmd + packages, f"apt-get download {' '.join(packages)} (network or apt problem?)", dest)
    debs = sorted(dest.glob("*.deb"))
    if len(debs) != len(packages):
        raise ImageBuildError(f"apt-get download gave {len(debs)} files for {len(packages)}")
    return debs


def deb_field(deb: Path, field: str) -> str:
    return _run(["dpkg-deb", "-f", str(deb), field], f"dpkg-deb -f {deb.name}").strip()


def compile_workload(out: Path, cc: str = "gcc", source: Path = WORKLOAD_SOURCE) -> Path:
    """Compile workload.c into a static binary at out."""
    if shutil.which(cc) is None:
        raise ImageBuildError(f"C compiler {cc!r} not found: install gcc (apt-get install gcc)")
    _run(
        [cc, "-static", "-O2", "-Wall", "-Wextra", "-o", str(out), str(source)],
        f"compiling {source.name} with {cc} -static (is libc6-dev installed?)",
    )
    return out


def write_initramfs(out: Path, busybox: Path, workload: Path, init: Path = INIT_SCRIPT) -> int:
    """Write the uncompressed initramfs; returns its size."""
    with out.open("wb") as f, CpioWriter(f) as cpio:
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "tmp", "root"):
            cpio.add_dir(d)
        cpio.add_file("init", init.read_bytes(), 0o755)
        cpio.add_file("bin/busybox", busybox.read_bytes(), 0o755)
        cpio.add_symlink("bin/sh", "busybox")  # /init's interpreter; /init adds the rest
        cpio.add_file("bin/workload", workload.read_bytes(), 0o755)
        # The kernel opens /dev/console for init before anything is mounted.
        cpio.add_char_device("dev/console", 5, 1, 0o600)
        cpio.add_char_device("dev/null", 1, 3, 0o666)
        size = cpio.bytes_written
    return max(size, out.stat().st_size)


# -- cache -----------------------------------------------------------------------


def _cached(out_dir: Path) -> GuestImage | None:
    """The image in out_dir if it is complete and built from the current sources."""
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_text())
        if data.get("format") != FORMAT_VERSION or data.get("sources") != _source_hashes():
            return None
        for name, info in data["files"].items():
            if (out_dir / name).stat().st_size != info["size"]:
                return None
        return GuestImage.from_manifest(out_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def verify_image(out_dir: Path) -> GuestImage:
    """Check every file of an image against the sha256 in its manifest."""
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_text())
        for name, info in data["files"].items():
            if _sha256(out_dir / name) != info["sha256"]:
                raise ImageBuildError(f"{out_dir / name} does not match its manifest")
    except (OSError, ValueError, KeyError) as exc:
        raise ImageBuildError(f"{out_dir} is not a complete image: {exc}")
    return GuestImage.from_manifest(out_dir)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that holds anything but an image of ours."""
    ours = {BZIMAGE_NAME, VMLINUX_NAME, INITRAMFS_NAME, WORKLOAD_NAME, MANIFEST_NAME}
    if not out_dir.is_dir() or any(p.name not in ours for p in out_dir.iterdir()):
        raise ImageBuildError(f"{out_dir} exists and is not an image directory: not replacing it")


def _install(staging: Path, out_dir: Path) -> None:
    """Move a finished staging directory to out_dir atomically (replacing a stale one)."""
    old: Path | None = None
    if out_dir.exists():
        _check_replaceable(out_dir)
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(old)
    try:
        staging.rename(out_dir)
    except OSError:
        # Someone else installed an image meanwhile: keep theirs if it is good.
        if _cached(out_dir) is None:
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- the build -------------------------------------------------------------------


def build_image(
    out_dir: Path,
    progress: Progress | None = None,
    *,
    force: bool = False,
    cc: str = "gcc",
    min_free_bytes: int = MIN_FREE_BYTES,
) -> GuestImage:
    """Build (or reuse) the default Linux guest image in out_dir."""
    say = progress or (lambda _msg: None)
    out_dir = Path(out_dir).absolute()
    if not force and (cached := _cached(out_dir)) is not None:
        say(f"using the existing image in {out_dir}")
        return cached

    t0 = time.monotonic()
    if out_dir.exists():
        _check_replaceable(out_dir)
    _check_tools(cc)
    with _disk_errors(out_dir):
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(out_dir.parent, min_free_bytes)

    # Scratch space next to out_dir, so the final rename stays on one filesystem.
    with (
        _disk_errors(out_dir),
        tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.build-", dir=out_dir.parent) as tmp,
    ):
        work = Path(tmp)
        debs_dir, root, staging = work / "debs", work / "root", work / "image"
        for d in (debs_dir, root, staging):
            d.mkdir()

        say(f"resolving {KERNEL_META_PACKAGE}")
        kernel_pkg = resolve_kernel_package()
        say(f"downloading {kernel_pkg} and {BUSYBOX_PACKAGE}")
        apt_download([kernel_pkg, BUSYBOX_PACKAGE], debs_dir)
        versions: dict[str, tuple[str, str]] = {}
        for deb in sorted(debs_dir.glob("*.deb")):
            name, version = deb_field(deb, "Package"), deb_field(deb, "Version")
            versions[name] = (version, _sha256(deb))
            say(f"extracting {name} {version}")
            _run(["dpkg-deb", "-x", str(deb), str(root)], f"dpkg-deb -x {deb.name}")

        release = kernel_pkg.removeprefix("linux-image-")
        vmlinuz = root / "boot" / f"vmlinuz-{release}"
        busybox = root / "bin" / "busybox"
        for path in (vmlinuz, busybox):
            if not path.is_file():
                raise ImageBuildError(f"{path.relative_to(root)} missing from the packages")

        say("compiling the workload (gcc -static -O2)")
        workload = compile_workload(staging / WORKLOAD_NAME, cc)

        say("writing the initramfs")
        write_initramfs(staging / INITRAMFS_NAME, busybox, workload)

        shutil.copyfile(vmlinuz, staging / BZIMAGE_NAME)
        say("extracting the raw kernel from the bzImage")
        kernel = extract_vmlinux(staging / BZIMAGE_NAME)
        (staging / VMLINUX_NAME).write_bytes(kernel.vmlinux)
        if not kernel.header.kernel_version.startswith(release):
            raise ImageBuildError(
                f"bzImage says kernel {kernel.header.kernel_version!r}, package says {release}"
            )

        files = {
            name: {"size": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
            for name in (BZIMAGE_NAME, VMLINUX_NAME, INITRAMFS_NAME, WORKLOAD_NAME)
        }
        manifest = {
            "format": FORMAT_VERSION,
            "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": {
                "package": kernel_pkg,
                "version": versions[kernel_pkg][0],
                "deb_sha256": versions[kernel_pkg][1],
                "release": release,
                "banner": kernel.header.kernel_version,
                "compressor": kernel.compressor,
                "boot_protocol": "{}.{:02d}".format(*kernel.header.protocol),
                "entry": hex(kernel.elf.entry),
                "relocs_dropped": kernel.trailing_bytes,
            },
            "busybox": {
                "package": BUSYBOX_PACKAGE,
                "version": versions[BUSYBOX_PACKAGE][0],
                "deb_sha256": versions[BUSYBOX_PACKAGE][1],
            },
            "sources": _source_hashes(),
            "files": files,
            "cmdline_example": kernel_cmdline("256M", "50M"),
        }
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        _install(staging, out_dir)

    image = GuestImage.from_manifest(out_dir)
    say(
        f"built {image.kernel_version} ({image.compressor}) image in {out_dir}"
        f" in {time.monotonic() - t0:.1f} s"
    )
    return image
