"""Facts about this host that placement and migration decisions need."""

from __future__ import annotations

import os
import socket
from functools import lru_cache

from vmigrate.vmm.memory import host_available_memory


@lru_cache(maxsize=1)
def cpu_identity() -> tuple[str, str, tuple[str, ...]]:
    """(vendor, model name, flags) from /proc/cpuinfo."""
    vendor = model = ""
    flags: tuple[str, ...] = ()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value
                elif key == "model name" and not model:
                    model = value
                elif key == "flags" and not flags:
                    flags = tuple(sorted(value.split()))
                if vendor and model and flags:
                    break
    except OSError:
        pass
    return vendor, model, flags


def memory_total() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def memory_available() -> int:
    return host_available_memory()


def cpu_count() -> int:
    return os.cpu_count() or 1


def hostname() -> str:
    return socket.gethostname()
