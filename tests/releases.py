"""Earlier releases of vmigrate, installed from their git tags into their own
virtual environments, so tests can run them beside the current code.

    python = release_python("v0.1.0")   # .../bin/python with vmigrate 0.1.0

The environment is built once per tag commit under .cache/releases/ (the
checkout's own, ignored by git) with `pip install` of `git archive TAG`: the
release exactly as a user would install it, not the working tree.
"""

from __future__ import annotations

import fcntl
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "releases"


class ReleaseUnavailable(Exception):
    pass


def tags() -> list[str]:
    out = subprocess.run(["git", "-C", str(REPO), "tag", "--list", "v*", "--sort=version:refname"],
                         capture_output=True, text=True, check=True).stdout
    return [t for t in out.split() if t]


def previous_release() -> str:
    """The newest tag that is not the current version."""
    from vmigrate.migrate import versions

    current = f"v{versions.software_version()}"
    older = [t for t in tags() if t != current]
    if not older:
        raise ReleaseUnavailable("no earlier release is tagged")
    return older[-1]


def release_python(tag: str) -> Path:
    """The python of a virtual environment holding vmigrate `tag` (built once)."""
    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-list", "-n", "1", tag],
                                capture_output=True, text=True, check=True).stdout.strip()
    except subprocess.CalledProcessError:
        raise ReleaseUnavailable(f"no tag {tag} in this repository") from None
    venv = CACHE / f"{tag}-{commit[:12]}"
    python = venv / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (venv / ".complete").exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="vmrel") as tmp:
            src = Path(tmp) / "src"
            archive = Path(tmp) / "src.tar"
            subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", "-o",
                            str(archive), tag], check=True)
            src.mkdir()
            with tarfile.open(archive) as t:
                t.extractall(src, filter="data")
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
            p = subprocess.run([str(python), "-m", "pip", "install", "-q", str(src)],
                               capture_output=True, text=True)
            if p.returncode != 0:
                shutil.rmtree(venv, ignore_errors=True)
                raise ReleaseUnavailable(f"installing {tag} failed: "
                                         f"{p.stderr.strip().splitlines()[-1:]}")
        (venv / ".complete").touch()
    return python


def release_version(python: Path) -> str:
    return subprocess.run([str(python), "-P", "-c", "from vmigrate.migrate import versions; "
                           "print(versions.software_version())"],
                          capture_output=True, text=True, check=True, cwd="/").stdout.strip()
