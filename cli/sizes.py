"""Sizes and rates as people type them: 64M, 1GiB, 2.5G, 50MiB/s, 100Mbit/s."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*$", re.I)
_BITS = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)bit(?:/s|ps)?\s*$", re.I)


def parse_size(text: str, what: str = "size") -> int:
    """Bytes; K/M/G/T are powers of 1024 (64M = 64 MiB)."""
    m = _SIZE.match(text or "")
    if not m:
        raise ValueError(f"cannot parse {what} {text!r}: use a number with an optional "
                         "unit, e.g. 512M, 1G, 64MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    return int(value)


def parse_rate(text: str, what: str = "rate") -> int:
    """Bytes per second: 50M, 50MiB/s, or in bits: 100Mbit/s (decimal)."""
    t = (text or "").strip()
    b = _BITS.match(t)
    if b:
        scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[b.group(2).lower()]
        return int(float(b.group(1)) * scale / 8)
    if t.lower().endswith("/s"):
        t = t[:-2]
    return parse_size(t, what)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_rate(n: float) -> str:
    return human_bytes(n) + "/s"
