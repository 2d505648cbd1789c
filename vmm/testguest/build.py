"""Assemble the built-in test guest: guest.S -> guest.bin (committed).

    python vmm/testguest/build.py           # rebuild guest.bin
    python vmm/testguest/build.py --check   # fail if guest.bin is not what guest.S gives

Needs GNU binutils (as, ld, objcopy). The binary is committed so that running
vmigrate needs no assembler; CI checks it matches its source.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "guest.S"
BINARY = HERE / "guest.bin"

LINKER_SCRIPT = """\
OUTPUT_FORMAT("elf64-x86-64")
ENTRY(kernel_entry)
SECTIONS {{
  . = {base:#x};
  .text : {{ *(.text) }}
  .rodata : {{ *(.rodata) }}
  /DISCARD/ : {{ *(.note*) *(.comment) *(.eh_frame) }}
}}
"""


def assemble() -> bytes:
    from vmigrate.vmm.testguest.layout import LAYOUT

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "link.ld").write_text(LINKER_SCRIPT.format(base=LAYOUT.CODE_BASE))
        steps = [
            ["as", "--64", "-o", str(t / "guest.o"), str(SOURCE)],
            ["ld", "-m", "elf_x86_64", "--build-id=none", "-T", str(t / "link.ld"),
             "-o", str(t / "guest.elf"), str(t / "guest.o")],
            ["objcopy", "-O", "binary", str(t / "guest.elf"), str(t / "guest.bin")],
        ]
        for argv in steps:
            try:
                subprocess.run(argv, check=True, capture_output=True, text=True)
            except FileNotFoundError:
                raise SystemExit(f"{argv[0]} not found: install binutils") from None
            except subprocess.CalledProcessError as e:
                raise SystemExit(f"{argv[0]} failed:\n{e.stderr}") from None
        return (t / "guest.bin").read_bytes()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true")
    opts = ap.parse_args()
    code = assemble()
    if opts.check:
        if not BINARY.exists() or BINARY.read_bytes() != code:
            print("vmm/testguest/guest.bin does not match guest.S "
                  "(run: python vmm/testguest/build.py)", file=sys.stderr)
            return 1
        print("test guest binary is up to date")
        return 0
    BINARY.write_bytes(code)
    print(f"wrote {BINARY} ({len(code)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
