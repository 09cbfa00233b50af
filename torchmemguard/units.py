"""Byte counts for people to read."""

from __future__ import annotations


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant digits: ``'1.50 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
