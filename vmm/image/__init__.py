"""The default Linux guest image: Debian's cloud kernel, busybox and the workload.

``build_image(out_dir)`` builds it (or reuses a complete one) from Debian
packages without installing them; ``kernel_cmdline()`` makes the command line
that starts the workload with a working set and dirty rate.
"""

from vmigrate.vmm.image.builder import (
    GuestImage,
    build_image,
    default_image_dir,
    kernel_cmdline,
    verify_image,
)
from vmigrate.vmm.image.errors import ImageBuildError

__all__ = [
    "GuestImage",
    "ImageBuildError",
    "build_image",
    "default_image_dir",
    "kernel_cmdline",
    "verify_image",
]
