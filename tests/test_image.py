"""The Linux guest image builder: real build, cpio, bzImage and the workload on the host."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vmigrate.vmm.image import ImageBuildError, build_image, kernel_cmdline, verify_image
from vmigrate.vmm.image.builder import apt_download, compile_workload
from vmigrate.vmm.image.bzimage import (
    decompress_payload,
    extract_vmlinux,
    parse_elf64,
    parse_setup_header,
    payload,
)
from vmigrate.vmm.image.console import Heartbeat, parse_console
from vmigrate.vmm.image.cpio import CpioWriter

MIB = 1 << 20

HB_RE = re.compile(r"^HB n=(\d+) w=(\d+) errors=(\d+) passes=(\d+)$", re.M)
CORRUPT_RE = re.compile(r"^CORRUPT page=(\d+) expected=([0-9a-f]+) found=([0-9a-f]+)", re.M)

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")


@pytest.fixture(scope="session")
def image(tmp_path_factory):
    """One real build for the whole session (downloads ~30 MB of Debian packages)."""
    out = tmp_path_factory.mktemp("image") / "linux-guest"
    messages: list[str] = []
    t0 = time.monotonic()
    img = build_image(out, messages.append)
    print(f"image build took {time.monotonic() - t0:.1f} s: {messages}")
    return img


# -- the build -------------------------------------------------------------------


def test_build_produces_a_complete_verified_image(image):
    assert verify_image(image.directory) == image
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+-cloud-amd64", image.kernel_version)
    assert image.kernel_package == f"linux-image-{image.kernel_version}"
    manifest = json.loads(image.manifest.read_text())
    assert manifest["kernel"]["version"] == image.kernel_package_version
    assert set(manifest["files"]) == {"bzImage", "vmlinux", "initramfs.cpio", "workload"}
    assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"


def test_rebuild_reuses_the_image_instantly(image):
    before = image.vmlinux.stat().st_mtime_ns
    t0 = time.monotonic()
    again = build_image(image.directory)
    assert time.monotonic() - t0 < 1.0
    assert again == image
    assert image.vmlinux.stat().st_mtime_ns == before


def test_a_damaged_image_is_detected_and_rebuilt(image, tmp_path):
    copy = tmp_path / "img"
    shutil.copytree(image.directory, copy)
    with (copy / "vmlinux").open("r+b") as f:
        f.truncate(1000)
    with pytest.raises(ImageBuildError):
        verify_image(copy)
    rebuilt = build_image(copy)
    verify_image(copy)
    assert rebuilt.vmlinux.stat().st_size == image.vmlinux.stat().st_size


def test_refuses_to_replace_a_directory_that_is_not_an_image(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ImageBuildError, match="not an image directory"):
        build_image(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@needs_cpio
def test_initramfs_lists_with_gnu_cpio(image):
    out = subprocess.run(
        ["cpio", "-t", "-v", "--quiet"],
        input=image.initramfs.read_bytes(),
        capture_output=True,
        check=True,
    ).stdout.decode()
    names = {
        line.split()[-1] if "->" not in line else line.split()[-3] for line in out.splitlines()
    }
    assert {"init", "bin/busybox", "bin/workload", "dev/console", "bin/sh"} <= names
    console = next(line for line in out.splitlines() if line.endswith("dev/console"))
    assert console.startswith("crw") and "5,   1" in console


# -- cpio writer against an independent reader ----------------------------------------


@needs_cpio
def test_cpio_round_trip_with_gnu_cpio(tmp_path):
    files = {
        "empty": b"",
        "one": b"x",
        "odd/size/nested.bin": os.urandom(4099),
        "big.bin": os.urandom(300_001),
    }
    archive = tmp_path / "a.cpio"
    with archive.open("wb") as f, CpioWriter(f) as w:
        w.add_dir("emptydir", 0o700)
        for name, data in files.items():
            w.add_file(name, data, 0o640)
        w.add_symlink("link", "odd/size/nested.bin")
        w.add_char_device("dev/null", 1, 3, 0o666)
    assert archive.stat().st_size % 512 == 0

    listing = subprocess.run(
        ["cpio", "-t", "-v", "--quiet", "-F", str(archive)], capture_output=True, check=True
    ).stdout.decode()
    assert "lrwxrwxrwx" in listing and "link -> odd/size/nested.bin" in listing
    assert re.search(r"crw-rw-rw-.*1,\s+3 .* dev/null$", listing, re.M)
    assert re.search(r"drwx------ .* emptydir$", listing, re.M)
    assert re.search(r"drwxr-xr-x .* odd/size$", listing, re.M)  # parents added

    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(
        [
            "cpio",
            "-i",
            "-d",
            "--quiet",
            "--no-absolute-filenames",
            "-F",
            str(archive),
            "-D",
            str(dest),
            "--nonmatching",
            "dev/*",
        ],
        check=True,
        capture_output=True,
    )
    for name, data in files.items():
        assert (dest / name).read_bytes() == data
        assert (dest / name).stat().st_mode & 0o777 == 0o640
    assert os.readlink(dest / "link") == "odd/size/nested.bin"


def test_cpio_rejects_duplicates_and_escapes(tmp_path):
    with (tmp_path / "a.cpio").open("wb") as f:
        w = CpioWriter(f)
        w.add_file("a", b"1")
        with pytest.raises(ValueError):
            w.add_file("a", b"2")
        with pytest.raises(ValueError):
            w.add_file("../etc/passwd", b"")


# -- bzImage ---------------------------------------------------------------------


def test_bzimage_setup_header_of_the_real_kernel(image):
    data = image.bzimage.read_bytes()
    hdr = parse_setup_header(data)
    assert hdr.protocol >= (2, 8)
    assert hdr.kernel_version.startswith(image.kernel_version + " ")
    assert hdr.setup_sects > 0 and hdr.relocatable
    assert hdr.pref_address == 0x1000000
    assert hdr.payload_file_offset + hdr.payload_length <= len(data)
    kind, raw = decompress_payload(payload(data, hdr))
    assert kind == image.compressor
    assert raw[: image.vmlinux.stat().st_size] == image.vmlinux.read_bytes()
    assert hdr.init_size >= len(raw)  # the kernel promises room to decompress into


def test_vmlinux_is_elf64_x86_64(image):
    elf = parse_elf64(image.vmlinux.read_bytes())
    assert elf.size == image.vmlinux.stat().st_size
    assert any(paddr == 0x1000000 for _off, paddr, _fs, _ms in elf.segments)
    if shutil.which("readelf"):
        out = subprocess.run(
            ["readelf", "-h", str(image.vmlinux)], capture_output=True, text=True, check=True
        ).stdout
        assert re.search(r"Class:\s+ELF64", out)
        assert re.search(r"Machine:\s+Advanced Micro Devices X86-64", out)
        assert re.search(r"Type:\s+EXEC", out)


def test_bzimage_errors_are_clear(image):
    data = bytearray(image.bzimage.read_bytes())
    with pytest.raises(ImageBuildError, match="HdrS"):
        parse_setup_header(b"\0" * 4096)
    hdr = parse_setup_header(bytes(data))
    start = hdr.payload_file_offset
    data[start : start + 4] = b"\0\0\0\0"
    with pytest.raises(ImageBuildError, match="unknown kernel payload compression"):
        extract_vmlinux(bytes(data))
    data = bytearray(image.bzimage.read_bytes())
    data[start + 4000 : start + 4100] = bytes(100)  # damage the first compressed block
    with pytest.raises(ImageBuildError):
        extract_vmlinux(bytes(data))


# -- the workload, run on the host ---------------------------------------------------


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc")
    return compile_workload(tmp_path_factory.mktemp("wl") / "workload")


def _run_workload(workload: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([str(workload), *args], capture_output=True, text=True, timeout=timeout)


def test_workload_heartbeats_at_its_rate_with_no_errors(workload):
    proc = _run_workload(workload, "ws=8M", "rate=4M", "duration=3")
    assert proc.returncode == 0, proc.stderr
    beats = [tuple(map(int, m)) for m in HB_RE.findall(proc.stdout)]
    assert len(beats) >= 2, proc.stdout
    assert [b[0] for b in beats] == list(range(1, len(beats) + 1))
    assert all(b[2] == 0 for b in beats)
    assert "CORRUPT" not in proc.stdout
    rate = parse_console(proc.stdout).dirty_rate()
    assert rate is not None and 0.8 * 4 * MIB <= rate <= 1.2 * 4 * MIB
    assert beats[-1][3] >= 2  # the whole set was verified again and again


def test_workload_accepts_kernel_style_names(workload):
    proc = _run_workload(workload, "vmigrate.ws=1M", "vmigrate.rate=0", "vmigrate.duration=1")
    assert proc.returncode == 0, proc.stderr
    assert "WL ready pages=256 rate=0" in proc.stdout


def test_workload_reports_a_flipped_byte(workload):
    proc = _run_workload(
        workload, "ws=8M", "rate=1M", "verify=0", "corrupt=1", "corrupt_page=100", "duration=3"
    )
    assert proc.returncode == 1
    corrupt = CORRUPT_RE.findall(proc.stdout)
    assert len(corrupt) == 1, proc.stdout
    page, expected, found = corrupt[0]
    assert page == "100" and expected != found
    assert int(HB_RE.findall(proc.stdout)[-1][2]) == 1  # counted once, then repaired


def test_workload_rejects_bad_parameters(workload):
    for args in (["ws=lots"], ["speed=1M"], ["ws=1M", "corrupt=1", "corrupt_page=999"]):
        proc = _run_workload(workload, *args)
        assert proc.returncode == 2 and "workload:" in proc.stderr


def test_console_parsing():
    text = (
        "vmigrate-guest: kernel 6.1.0\r\n"
        "HB n=1 w=10 errors=0 passes=1\n"
        "[   8.1] BUG: kernel NULL pointer dereference, address: 0000000000000000\n"
        "HB n=3 w=30 errors=0\n"
        "CORRUPT page=7 expected=00ff found=00fe word=3\n"
        "HB n=4 w=40 errors=1 passes=2\n"
        "HB n=5 w=50 err"  # an incomplete last line is not read yet
    )
    report = parse_console(text)
    assert report.heartbeats == [
        Heartbeat(1, 10, 0, 1),
        Heartbeat(3, 30, 0, 0),
        Heartbeat(4, 40, 1, 2),
    ]
    assert report.corrupt == ["CORRUPT page=7 expected=00ff found=00fe word=3"]
    assert len(report.crashes) == 1 and "NULL pointer" in report.crashes[0]
    assert report.errors == 1
    assert report.dirty_rate() == 10 * 4096
    assert parse_console("").dirty_rate() is None


def test_kernel_cmdline():
    line = kernel_cmdline(256 << 20, 50 << 20, verify="512M")
    assert line.split()[:3] == ["console=ttyS0", "panic=-1", "quiet"]
    assert "vmigrate.ws=256M vmigrate.rate=50M vmigrate.verify=512M" in line
    assert "vmigrate.rate=0" in kernel_cmdline("1G", 0)


# -- clear errors ----------------------------------------------------------------


def test_missing_compiler_is_one_clear_line(tmp_path):
    with pytest.raises(ImageBuildError) as info:
        build_image(tmp_path / "img", cc="/nonexistent/gcc")
    assert "compiler" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "img").exists()


@needs_gcc
def test_compile_error_is_one_clear_line(tmp_path):
    bad = tmp_path / "bad.c"
    bad.write_text("int main(void) { return missing; }\n")
    with pytest.raises(ImageBuildError) as info:
        compile_workload(tmp_path / "out", source=bad)
    assert "missing" in str(info.value) and "\n" not in str(info.value)


def test_apt_failure_is_one_clear_line(tmp_path):
    with pytest.raises(ImageBuildError) as info:
        apt_download(["vmigrate-no-such-package"], tmp_path)
    msg = str(info.value)
    assert "apt-get download" in msg and "vmigrate-no-such-package" in msg and "\n" not in msg


def _unshare_works() -> bool:
    return (
        shutil.which("unshare") is not None
        and subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0
    )


@pytest.mark.skipif(not _unshare_works(), reason="needs unshare -n (root)")
def test_no_network_is_one_clear_line(tmp_path):
    code = (
        "import sys\nfrom pathlib import Path\n"
        "from vmigrate.vmm.image import ImageBuildError, build_image\n"
        "try:\n    build_image(Path(sys.argv[1]))\n"
        "except ImageBuildError as e:\n    print('ERR', e)\n    sys.exit(3)\n"
    )
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", code, str(tmp_path / "img")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    line = proc.stdout.strip()
    assert line.startswith("ERR ") and "apt-get download" in line and "\n" not in line
    assert not (tmp_path / "img").exists()
    assert list(tmp_path.iterdir()) == []  # scratch space cleaned up


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(mnt, "40m"):
        pytest.skip("needs root to mount a small tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_low_disk_space_is_refused_up_front(small_disk):
    with pytest.raises(ImageBuildError, match="disk full"):
        build_image(small_disk / "img")


def test_disk_filling_up_mid_build_is_one_clear_line(small_disk):
    # Skip the up-front check so the build really runs into ENOSPC.
    with pytest.raises(ImageBuildError) as info:
        build_image(small_disk / "img", min_free_bytes=0)
    assert "disk full" in str(info.value) and "\n" not in str(info.value)
    assert list(small_disk.iterdir()) == []  # no half-built image or scratch left behind
