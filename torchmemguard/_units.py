"""Byte counts: read from what people write, and written for people to read."""

from __future__ import annotations

import math
import re

_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*([a-z]*)\s*", re.IGNORECASE)


def parse_size(value: object, name: str) -> int:
    """A positive byte count from an int or a string such as ``'6GiB'`` or ``'512 mb'``.

    Units are B, KB, MB, GB, TB (powers of 1000) and KiB, MiB, GiB, TiB (powers
    of 1024), in any case; a bare number is bytes. ``name`` is the argument's
    name, for the error message.
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(
            f"{name} must be an int or a size string such as '6GiB', "
            f"got {value!r} ({type(value).__name__})"
        )
    if isinstance(value, int):
        size = value
    else:
        match = _SIZE.fullmatch(value)
        unit = (match.group(2).lower() or "b") if match else ""
        if unit not in _UNITS:
            raise ValueError(
                f"{name}={value!r} is not a size: write a number and one of the units "
                "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB, such as '6GiB'"
            )
        assert match is not None
        size = math.floor(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{name}={value!r} must be a positive number of bytes")
    return size


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant digits: ``'1.50 GiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
