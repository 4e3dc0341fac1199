"""Byte sizes, read and written one way everywhere: ``parse_bytes("8GiB")`` and ``gib(8 * 2**30)``."""
from __future__ import annotations

import re
from typing import Any

from memgraph.errors import MemgraphError

__all__ = ["parse_bytes", "gib", "GIB", "MIB"]

GIB = 2**30
MIB = 2**20
_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def parse_bytes(value: Any, *, name: str = "memory_budget") -> int | None:
    """``None``, an int number of bytes, or a string such as ``"8GiB"``, ``"512 MB"``, ``"1.5e9"``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise MemgraphError(f"{name} must be None, an int number of bytes or a string like '8GiB'; got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise MemgraphError(f"{name} must be positive; got {value}")
        return value
    if isinstance(value, float) and value.is_integer() and value > 0:
        return int(value)
    if isinstance(value, str):
        if value.strip().lower() in ("", "none"):
            return None
        match = _SIZE.match(value)
        if match and match.group(2).lower() in _UNITS:
            digits, scale = match.group(1), _UNITS[match.group(2).lower()]
            # integers stay exact (floats lose bytes above 2**53); fractions like "1.5GiB" go through float
            number = int(digits) * scale if digits.isdigit() else float(digits) * scale
            if number >= 1:
                return int(number)
        raise MemgraphError(
            f"{name}={value!r} is not a size; use bytes or a number with a unit, one of "
            "B, KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB (powers of 2), e.g. '8GiB'"
        )
    raise MemgraphError(f"{name} must be None, an int number of bytes or a string like '8GiB'; got {value!r}")


def gib(nbytes: float | None, *, none: str = "n/a") -> str:
    """``"8.000 GiB"``; ``none`` stands for a missing size (e.g. "fastest" for a plan without a budget)."""
    return none if nbytes is None else f"{nbytes / GIB:.3f} GiB"
