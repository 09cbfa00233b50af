"""Byte counts for people to read."""

from __future__ import annotations

import pytest

from torchmemguard._units import format_bytes, parse_size


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


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (4096, 4096),
        ("4096", 4096),
        ("6GiB", 6 * 2**30),
        ("6 gib", 6 * 2**30),
        (" 1.5 MiB ", 3 * 2**19),
        ("2GB", 2 * 10**9),
        ("512 mb", 512 * 10**6),
        ("3kb", 3000),
        ("1KiB", 1024),
        ("1TiB", 2**40),
        ("1 tb", 10**12),
        ("7b", 7),
        (".5KiB", 512),
    ],
)
def test_sizes_are_read_in_decimal_and_binary_units(text: int | str, size: int) -> None:
    assert parse_size(text, "bytes") == size


@pytest.mark.parametrize("text", ["", "GiB", "6 GiBs", "6 G", "1e9", "six GiB", "nan", "6 Gi B"])
def test_a_malformed_size_names_the_argument_and_value(text: str) -> None:
    with pytest.raises(ValueError, match=rf"^cap={text!r} is not a size"):
        parse_size(text, "cap")


@pytest.mark.parametrize("value", [0, -1, "-3MiB", "0 GiB", "0.1B"])
def test_a_size_must_be_positive(value: int | str) -> None:
    with pytest.raises(ValueError, match=rf"^bytes={value!r} must be a positive number of bytes"):
        parse_size(value, "bytes")


@pytest.mark.parametrize("value", [1.5e9, None, True, [1]])
def test_a_size_of_another_type_is_a_type_error(value: object) -> None:
    with pytest.raises(
        TypeError, match=rf"bytes must be an int or a size string.*{type(value).__name__}"
    ):
        parse_size(value, "bytes")
