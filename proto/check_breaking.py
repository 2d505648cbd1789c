"""Fail if the .proto files break wire compatibility with the last release.

    python proto/check_breaking.py [--against TAG]

Runs buf's breaking-change check (category WIRE_JSON: renumbered, retyped or
reused fields, fields deleted without `reserved`, changed JSON names...) on
proto/*.proto against the same files at the last release tag. buf comes from
scripts/setup.d/buf.sh (.tools/). docs/compatibility.md has the rules.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"
BUF_YAML = "version: v2\nbreaking:\n  use:\n    - WIRE_JSON\n"


def last_release() -> str:
    sys.path.insert(0, str(REPO))
    out = subprocess.run(["git", "-C", str(REPO), "tag", "--list", "v*",
                          "--sort=version:refname"], capture_output=True, text=True,
                         check=True).stdout.split()
    version = subprocess.run([sys.executable, "-c", "from vmigrate.migrate import versions;"
                              "print(versions.software_version())"], capture_output=True,
                             text=True, check=True).stdout.strip()
    older = [t for t in out if t != f"v{version}"]
    if not older:
        raise SystemExit("no release tag to compare against")
    return older[-1]


def module(root: Path, files: dict[str, bytes]) -> Path:
    pkg = root / "vmigrate" / "proto"
    pkg.mkdir(parents=True)
    for name, data in files.items():
        (pkg / name).write_bytes(data)
    (root / "buf.yaml").write_text(BUF_YAML)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="release tag (default: the last one)")
    opts = ap.parse_args()
    if not BUF.exists():
        print(f"{BUF} is missing: run scripts/setup.sh", file=sys.stderr)
        return 2
    tag = opts.against or last_release()
    names = subprocess.run(["git", "-C", str(REPO), "ls-tree", "--name-only", tag, "proto/"],
                           capture_output=True, text=True, check=True).stdout.split()
    old_files = {Path(n).name: subprocess.run(["git", "-C", str(REPO), "show", f"{tag}:{n}"],
                                              capture_output=True, check=True).stdout
                 for n in names if n.endswith(".proto")}
    new_files = {p.name: p.read_bytes() for p in sorted(HERE.glob("*.proto"))}
    with tempfile.TemporaryDirectory() as tmp:
        new = module(Path(tmp) / "new", new_files)
        old = module(Path(tmp) / "old", old_files)
        p = subprocess.run([str(BUF), "breaking", str(new), "--against", str(old)],
                           capture_output=True, text=True)
        out = (p.stdout + p.stderr).replace(str(new) + "/", "proto/").strip()
    if p.returncode != 0:
        print(f"the .proto files break compatibility with {tag}:\n{out}", file=sys.stderr)
        return 1
    print(f"the .proto files are wire-compatible with {tag}")
    return 0


if __name__ == "__main__":
    shutil.which("git") or sys.exit("git is needed")
    sys.exit(main())
