"""python -m vmigrate.vmm.image [OUT_DIR] [--force]: build the default guest image."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vmigrate.vmm.image import ImageBuildError, build_image, default_image_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vmigrate.vmm.image", description=__doc__)
    parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        default=None,
        help="image directory (default: $VMIGRATE_IMAGE_DIR or the user cache)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    out_dir = args.out_dir or default_image_dir()
    try:
        image = build_image(
            out_dir, lambda msg: print(f"image: {msg}", flush=True), force=args.force
        )
    except ImageBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"bzImage   {image.bzimage}\nvmlinux   {image.vmlinux}\n"
        f"initramfs {image.initramfs}\nkernel    {image.kernel_version} ({image.compressor})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
