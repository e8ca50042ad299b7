"""Sizes as users write them (``5GB``, ``500MB``, ``2GiB``): a light module the CLI can import."""

from __future__ import annotations

from compressor.errors import UsageError

DEFAULT_MAX_SHARD_SIZE = "5GB"


def parse_size(text: str | int) -> int:
    """Parse ``5GB``, ``500MB``, ``2GiB`` or a byte count."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "B": 1,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }
    s = text.strip().upper()
    num = s.rstrip("KMGTIB")
    unit = s[len(num) :]
    try:
        value = float(num)
    except ValueError:
        value = -1
    if unit not in units or not 0 < value < float("inf"):  # nan fails the comparison too
        raise UsageError(f"invalid size '{text}' (examples: 5GB, 500MB, 2GiB)")
    return int(value * units[unit])
