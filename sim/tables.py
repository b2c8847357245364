"""Reading a profile's measured tables, for numbers or for the direct simulation's arrays of decode
steps: log-log interpolation between measured points, an element-wise choice, and the link's copy
time from its sweep. Pure functions."""

from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np

from infinisim.hwprofiles.profile import Profile


def any_positive(x: Any) -> bool:
    """x > 0 for a number, or for any element of an array (the direct simulation's steps at once)."""
    return bool((x > 0).any()) if isinstance(x, np.ndarray) else x > 0


def interpolate_log(sizes: list[float], values: list[float], size: Any) -> Any:
    """The value at `size` (a number, or an array of them) between measured points, linear in
    log-log; clamped outside them."""
    if np.ndim(size):
        return np.exp(np.interp(np.log(size), np.log(sizes), np.log(values)))
    if size <= sizes[0]:
        return values[0]
    if size >= sizes[-1]:
        return values[-1]
    i = bisect.bisect_right(sizes, size)
    w = (math.log(size) - math.log(sizes[i - 1])) / (math.log(sizes[i]) - math.log(sizes[i - 1]))
    low, high = values[i - 1], values[i]
    if np.ndim(low) or np.ndim(high):  # values that are themselves arrays (another axis interpolated first)
        return np.exp((1 - w) * np.log(low) + w * np.log(high))
    return math.exp((1 - w) * math.log(low) + w * math.log(high))


def choose(condition: Any, yes: Any, no: Any) -> Any:
    """`yes` where the condition holds, else `no`: for numbers, or elementwise for arrays (the
    direct simulation times every decode step at once)."""
    if np.ndim(condition):
        return np.where(condition, yes, no)
    return yes if condition else no


def copy_time(profile: Profile, nbytes: float, direction: str, pinned: bool = True) -> float:
    """Latency + bytes / bandwidth; with a calibrated sweep, bytes / (the sweep's effective bandwidth
    at that size, interpolated in log size; clamped at the sweep's ends, plus latency below it)."""
    link = profile.link
    if not pinned:
        return link.latency + nbytes / link.pageable_bandwidth
    peak = link.h2d_bandwidth if direction == "h2d" else link.d2h_bandwidth
    if not link.sweep:
        return link.latency + nbytes / peak
    sizes = [p[0] for p in link.sweep]
    rates = [p[1] if direction == "h2d" else p[2] for p in link.sweep]
    # below the sweep, latency-bound: the smallest measured copy's time, less the bytes not sent
    return choose(nbytes <= sizes[0], np.maximum(link.latency, sizes[0] / rates[0] - (sizes[0] - nbytes) / rates[-1]),
                  nbytes / interpolate_log(sizes, rates, nbytes))
