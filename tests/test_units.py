"""Byte counts for people to read."""

from __future__ import annotations

import pytest

from torchmemguard.units import format_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1 KiB"),
        (1536 * 2**20, "1.5 GiB"),
        (79.11 * 2**30, "79.1 GiB"),
        (3 * 2**40, "3 TiB"),
    ],
)
def test_format_bytes_uses_binary_units_and_three_digits(n: float, text: str) -> None:
    assert format_bytes(n) == text
