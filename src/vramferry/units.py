"""Byte sizes and bandwidths written the way people write them ("16GiB", "55GB/s")."""

from __future__ import annotations

import re

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str, *, what: str = "size") -> int:
    """Parse ``16GiB``, ``16GB``, ``1.5e9`` or an integer into a byte count.

    Raises:
        ValueError: naming ``what`` and the accepted forms.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected a byte size such as '16GiB' or 17179869184, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{what}: a byte size cannot be negative, got {value!r}")
        return int(value)
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{what}: cannot read {value!r} as a byte size; write e.g. '16GiB', '24GB', '512MiB' or a plain integer"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def parse_bandwidth(value: int | float | str, *, what: str = "bandwidth") -> float:
    """Parse ``55GB/s`` (or a number of bytes per second) into bytes per second."""
    if isinstance(value, str) and value.strip().lower().endswith("/s"):
        value = value.strip()[:-2]
    result = float(parse_bytes(value, what=what))
    if result <= 0:
        raise ValueError(f"{what}: must be positive, got {value!r}")
    return result


def format_bytes(n: int | float) -> str:
    """``24_300_000_000`` → ``'22.63 GiB'``; small values stay in smaller units."""
    n = float(n)
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
