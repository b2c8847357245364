"""Quantities with units, as profiles write them: "48 GB", "12.5 GB/s", "10 us", "154.8 TFLOP/s"
(or plain numbers in the base unit), parsed and written back."""

from __future__ import annotations

import re
from typing import Any

_SCALE = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15,
          "Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40}
_UNITS = {  # dimension -> unit (after the prefix) -> factor to the base unit
    "bytes": {"B": 1.0},
    "bandwidth": {"B/s": 1.0},
    "time": {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9},
    "flops": {"FLOP/s": 1.0, "FLOPS": 1.0},
}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-z/]*)\s*$")


def parse_quantity(value: Any, dimension: str) -> float:
    """'12.5 GB/s' -> 12.5e9. A plain number is taken in the base unit. Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"expected a {dimension} quantity, got {value!r}")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str) or not (m := _QUANTITY.match(value)):
        raise ValueError(f"expected a number with a {dimension} unit, got {value!r}")
    number, unit = float(m.group(1)), m.group(2)
    if dimension == "time" and unit in _UNITS["time"]:
        return number * _UNITS["time"][unit]
    for prefix, scale in _SCALE.items():
        base = unit[len(prefix):] if unit.startswith(prefix) else None
        if base is not None and base in _UNITS[dimension]:
            return number * scale * _UNITS[dimension][base]
    units = ", ".join(_UNITS[dimension])
    raise ValueError(f"unit {unit!r} is not a {dimension} unit (use {units}, with K/M/G/T or Ki/Mi/Gi prefixes)")


_PREFIXES = (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3))
_BASE_UNITS = {"bytes": "B", "bandwidth": "B/s", "flops": "FLOP/s"}
_TIME_UNITS = (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9))


def format_quantity(value: float, dimension: str) -> str | float:
    """12.5e9, "bandwidth" -> '12.5 GB/s': what parse_quantity reads back (6 significant digits)."""
    if dimension == "number":
        return int(value) if float(value).is_integer() else value
    if dimension == "time":
        unit, scale = next(((u, f) for u, f in _TIME_UNITS if abs(value) >= f), _TIME_UNITS[-1])
        return f"{value / scale:.6g} {unit}"
    prefix, scale = next(((p, f) for p, f in _PREFIXES if abs(value) >= f), ("", 1.0))
    return f"{value / scale:.6g} {prefix}{_BASE_UNITS[dimension]}"
