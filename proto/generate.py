"""Regenerate the Python code for proto/*.proto (committed to the repo).

    python proto/generate.py           # rewrite the generated files
    python proto/generate.py --check   # fail if they differ from the .proto files

The .proto files import each other as "vmigrate/proto/x.proto" so that the
generated modules import each other as vmigrate.proto.x_pb2; protoc runs on a
temporary tree laid out that way.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

HERE = Path(__file__).resolve().parent
SERVICES = {"vmm.proto", "agent.proto"}


def generate(out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pkg = root / "vmigrate" / "proto"
        pkg.mkdir(parents=True)
        protos = sorted(HERE.glob("*.proto"))
        for p in protos:
            shutil.copy(p, pkg / p.name)
        args = ["protoc", f"-I{root}", f"-I{protoc_include()}",
                f"--python_out={root}", f"--pyi_out={root}"]
        services = [p for p in protos if p.name in SERVICES]
        rc = protoc.main([*args, *[str(pkg / p.name) for p in protos]])
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc})")
        if services:
            rc = protoc.main(["protoc", f"-I{root}", f"-I{protoc_include()}",
                              f"--grpc_python_out={root}",
                              *[str(pkg / p.name) for p in services]])
            if rc != 0:
                raise SystemExit(f"protoc (grpc) failed ({rc})")
        written = []
        for f in sorted(pkg.iterdir()):
            if f.suffix in (".py", ".pyi"):
                target = out / f.name
                target.write_bytes(f.read_bytes())
                written.append(target)
        return written


def protoc_include() -> str:
    import grpc_tools

    return str(Path(grpc_tools.__file__).parent / "_proto")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="fail if the committed generated code is out of date")
    opts = ap.parse_args()
    if not opts.check:
        for f in generate(HERE):
            print(f"wrote {f.relative_to(HERE.parent)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = [f.name for f in fresh
                 if not (HERE / f.name).exists() or (HERE / f.name).read_bytes() != f.read_bytes()]
    if stale:
        print("generated protobuf code is out of date: " + ", ".join(stale) +
              " (run: python proto/generate.py)", file=sys.stderr)
        return 1
    print("generated protobuf code is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
