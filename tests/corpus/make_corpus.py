"""Write this release's checkpoints into the compatibility corpus.

    python tests/corpus/make_corpus.py

Each release adds tests/corpus/<version>/ with small test-guest checkpoints
(one vCPU, two vCPUs, and an incremental pair); every later release must
restore all of them with the guest's self-check clean (tests/test_corpus.py).
Files of released versions are never rewritten.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VMIGRATE = [sys.executable, "-m", "vmigrate.cli.main"]


def _run(env: dict[str, str], *args: str) -> str:
    p = subprocess.run([*VMIGRATE, *args], env=env, capture_output=True, text=True, timeout=120)
    if p.returncode != 0:
        raise SystemExit(f"vmigrate {' '.join(args)}: {p.stderr.strip()}")
    return p.stdout


def main() -> int:
    from vmigrate.migrate import versions

    version = versions.software_version()
    out = HERE / version
    if out.exists():
        print(f"{out} exists: a release's corpus is never rewritten", file=sys.stderr)
        return 1
    home = Path(tempfile.mkdtemp(prefix="vmc", dir="/tmp"))
    env = {**os.environ, "VMIGRATE_HOME": str(home)}
    tmp = home / "out"
    tmp.mkdir()
    try:
        guests = {"one": ["--vcpus", "1"], "two": ["--vcpus", "2"]}
        for name, extra in guests.items():
            _run(env, "run", name, "--test-guest", "--memory", "16M", "--working-set", "1M",
                 "--dirty-rate", "256K", "--heartbeat-ms", "200", *extra)
        time.sleep(4.5)                 # the working set written once
        _run(env, "checkpoint", "one", str(tmp / "testguest-1vcpu.ckpt"))
        _run(env, "checkpoint", "two", str(tmp / "testguest-2vcpu.ckpt"))
        time.sleep(1.0)
        _run(env, "checkpoint", "one", str(tmp / "testguest-1vcpu.inc.ckpt"),
             "--incremental-from", str(tmp / "testguest-1vcpu.ckpt"))
        _run(env, "down")
        out.mkdir()
        for f in sorted(tmp.iterdir()):
            shutil.copy(f, out / f.name)
        (out / "manifest.json").write_text(json.dumps({
            "version": version, "state_versions": [versions.STATE_VERSION_MIN,
                                                   versions.STATE_VERSION_MAX],
            "files": sorted(f.name for f in out.iterdir() if f.suffix == ".ckpt"),
            "incremental": {"testguest-1vcpu.inc.ckpt": "testguest-1vcpu.ckpt"},
        }, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        subprocess.run([*VMIGRATE, "down"], env=env, capture_output=True, timeout=60)
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
