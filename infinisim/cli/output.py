"""Formatting shared by the verbs' printed tables, and JSON any parser reads."""

from __future__ import annotations

import json
from typing import Any

from infinisim.core.files import strict_json


def size(n: float) -> str:
    """Bytes with a decimal unit: '1.5 MB'."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


def maybe(x: float, spec: str = ".3f") -> str:
    """A number, or '-' where there is none (NaN)."""
    return "-" if x != x else format(x, spec)


def print_json(data: Any) -> None:
    """Strict JSON on stdout: NaN and infinities as null."""
    print(json.dumps(strict_json(data), indent=1, default=float, allow_nan=False))
