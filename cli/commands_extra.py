"""Commands beyond the core set, registered into the `vmigrate` parser."""

from __future__ import annotations

from collections.abc import Callable


def register(cmd: Callable) -> None:
    return None
