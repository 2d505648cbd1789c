"""Earlier releases of vmigrate, installed into their own virtual environments,
so tests can run them beside the current code.

    python = release_python(previous_release())   # .../bin/python with vmigrate 0.1.0

Every release's source is committed as `releases/vmigrate-X.Y.Z.tar.gz`
(made from its git tag by `python tests/releases.py archive vX.Y.Z`), so a
clean checkout without tags or history, as CI has, still holds every
release exactly as its tag had it. The environment is built once per archive
under .cache/releases/ (ignored by git) with `pip install` of the unpacked
archive: the release as a user installs it, not the working tree.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHIVES = REPO / "releases"
CACHE = REPO / ".cache" / "releases"
# What a release needs to install and run: the package and its metadata.
ARCHIVE_PATHS = ["pyproject.toml", "README.md", "proto", "vmm", "migrate", "cli"]
_NAME = re.compile(r"^vmigrate-(\d+)\.(\d+)\.(\d+)\.tar\.gz$")


class ReleaseUnavailable(Exception):
    pass


def released() -> list[str]:
    """Versions with a committed archive, oldest first ("0.1.0", ...)."""
    found = []
    for p in ARCHIVES.glob("vmigrate-*.tar.gz"):
        m = _NAME.match(p.name)
        if m:
            found.append(tuple(int(x) for x in m.groups()))
    return [".".join(map(str, v)) for v in sorted(found)]


def archive_path(version: str) -> Path:
    return ARCHIVES / f"vmigrate-{version.removeprefix('v')}.tar.gz"


def previous_release() -> str:
    """The newest released version that is not the current one."""
    from vmigrate.migrate import versions

    current = versions.software_version()
    older = [v for v in released() if v != current]
    if not older:
        raise ReleaseUnavailable(f"no release archive in {ARCHIVES}")
    return older[-1]


def release_files(version: str, suffix: str) -> dict[str, bytes]:
    """{path inside the release: content} for files ending in `suffix`."""
    path = archive_path(version)
    if not path.exists():
        raise ReleaseUnavailable(f"no archive for release {version}: {path}")
    out = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile() and m.name.endswith(suffix):
                out[m.name.split("/", 1)[1]] = t.extractfile(m).read()
    return out


def release_python(version: str) -> Path:
    """The python of a virtual environment holding vmigrate `version` (built once)."""
    path = archive_path(version)
    if not path.exists():
        raise ReleaseUnavailable(f"no archive for release {version}: {path}")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    venv = CACHE / f"{version}-{digest}"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="vmrel") as tmp:
            with tarfile.open(path) as t:
                t.extractall(tmp, filter="data")
            (src,) = Path(tmp).iterdir()
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            p = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise ReleaseUnavailable(f"installing {version} failed: "
                                         f"{p.stderr.strip().splitlines()[-1:]}")
        (venv / ".complete").touch()
    return python


def release_version(python: Path) -> str:
    return subprocess.run([str(python), "-P", "-c", "from vmigrate.migrate import versions; "
                           "print(versions.software_version())"],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()


def make_archive(tag: str) -> Path:
    """Write releases/vmigrate-X.Y.Z.tar.gz from git tag vX.Y.Z."""
    version = tag.removeprefix("v")
    out = archive_path(version)
    ARCHIVES.mkdir(exist_ok=True)
    subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar.gz",
                    f"--prefix=vmigrate-{version}/", "-o", str(out), tag, "--", *ARCHIVE_PATHS],
                   check=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Release archives for the compatibility tests.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="the released versions with a committed archive")
    arch = sub.add_parser("archive", help="write releases/vmigrate-X.Y.Z.tar.gz from a tag")
    arch.add_argument("tag", help="the release tag, e.g. v0.2.0")
    opts = ap.parse_args()
    if opts.cmd == "list":
        print("\n".join(released()))
    else:
        print(make_archive(opts.tag))
