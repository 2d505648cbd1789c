"""Fail if the .proto files break wire compatibility with the last release.

    python proto/check_breaking.py [--against TAG]

Runs buf's breaking-change check (category WIRE_JSON: renumbered, retyped or
reused fields, fields deleted without `reserved`, changed JSON names...) on
proto/*.proto against the same files in the last release's archive
(releases/vmigrate-X.Y.Z.tar.gz, committed, so no git tags are needed). buf comes from
scripts/setup.d/buf.sh (.tools/). docs/compatibility.md has the rules.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"
BUF_YAML = "version: v2\nbreaking:\n  use:\n    - WIRE_JSON\n"


def release_protos(version: str | None) -> tuple[str, dict[str, bytes]]:
    """The .proto files of `version` (default: the newest earlier release),
    read from its committed archive in releases/ (tests/releases.py)."""
    sys.path.insert(0, str(REPO.parent))
    sys.path.insert(0, str(REPO))
    from tests import releases

    try:
        version = (version or releases.previous_release()).removeprefix("v")
        files = releases.release_files(version, ".proto")
    except releases.ReleaseUnavailable as e:
        raise SystemExit(f"cannot check against the last release: {e}") from None
    return version, {Path(n).name: data for n, data in files.items()
                     if n.startswith("proto/")}


def module(root: Path, files: dict[str, bytes]) -> Path:
    pkg = root / "vmigrate" / "proto"
    pkg.mkdir(parents=True)
    for name, data in files.items():
        (pkg / name).write_bytes(data)
    (root / "buf.yaml").write_text(BUF_YAML)
    return root


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", help="release version (default: the last one)")
    opts = ap.parse_args()
    if not BUF.exists():
        print(f"{BUF} is missing: run scripts/setup.sh", file=sys.stderr)
        return 2
    version, old_files = release_protos(opts.against)
    new_files = {p.name: p.read_bytes() for p in sorted(HERE.glob("*.proto"))}
    with tempfile.TemporaryDirectory() as tmp:
        new = module(Path(tmp) / "new", new_files)
        old = module(Path(tmp) / "old", old_files)
        p = subprocess.run([str(BUF), "breaking", str(new), "--against", str(old)],
                           capture_output=True, text=True)
        out = (p.stdout + p.stderr).replace(str(new) + "/", "proto/").strip()
    if p.returncode != 0:
        print(f"the .proto files break compatibility with {version}:\n{out}", file=sys.stderr)
        return 1
    print(f"the .proto files are wire-compatible with {version}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
