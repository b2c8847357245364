"""argparse value types shared by the CLI's commands."""

from __future__ import annotations

import argparse
from collections.abc import Collection

from infinisim.core.errors import InfinisimError


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def int_list(text: str) -> list[int]:
    """'4,8,12' -> [4, 8, 12], each positive."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers, got {text!r}")
    return values


def names(text: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c']."""
    return [t.strip() for t in text.split(",") if t.strip()]


def floats(text: str) -> list[float]:
    try:
        return [float(t) for t in names(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None


def policy_names(text: str, known: Collection[str]) -> list[str]:
    """--policy's comma-separated names, each one the executor knows."""
    chosen = names(text)
    unknown = [name for name in chosen if name not in known]
    if unknown or not chosen:
        raise InfinisimError(f"unknown policy {unknown[0] if unknown else '(none)'!r} "
                             f"(choose from {', '.join(known)})", field="--policy")
    return chosen
