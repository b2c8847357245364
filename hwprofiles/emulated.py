"""An emulated host<->device link, as `--link` describes it: a bandwidth, a latency, shared or
duplex; the executor's copy threads pace copies to it (executor/link.py) and the simulator replays
on a CPU profile whose link is it (`Profile.with_link`)."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.units import parse_quantity

PCIE3_X16 = 12.5e9  # B/s a pinned copy reaches over PCIe 3.0 x16 (the a6000-pcie3 profile's h2d)
PCIE3_LATENCY = 10e-6  # s per copy (same profile)
A6000_MEMORY = 768e9  # B/s, the RTX A6000's memory (same profile)


@dataclass(frozen=True)
class LinkSpec:
    bandwidth: float  # bytes/s in each direction
    latency: float  # seconds per copy
    duplex: bool = False  # both directions at full bandwidth at once
    name: str = ""

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "bandwidth": self.bandwidth, "latency": self.latency, "duplex": self.duplex}


def memcpy_bandwidth(nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """This machine's memcpy rate (B/s) between two buffers larger than the caches (median)."""
    src, dst = np.ones(nbytes, dtype=np.uint8), np.empty(nbytes, dtype=np.uint8)
    np.copyto(dst, src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return nbytes / sorted(times)[len(times) // 2]


def parse_link(text: str, measure: Callable[[], float] = memcpy_bandwidth) -> LinkSpec:
    """'0.5GB/s,10us[,duplex]' or 'scaled-pcie3[,duplex]': the paper's testbed in slow motion, every
    rate scaled by this machine's memcpy bandwidth over the A6000's memory bandwidth (the link's
    bandwidth scaled down by that factor, its latency up by it)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    duplex = "duplex" in parts
    parts = [p for p in parts if p != "duplex"]
    if parts == ["scaled-pcie3"]:
        scale = measure() / A6000_MEMORY
        return LinkSpec(PCIE3_X16 * scale, PCIE3_LATENCY / scale, duplex,
                        f"scaled-pcie3 (memcpy x {scale:.4g}: {PCIE3_X16 * scale / 1e9:.3g} GB/s, "
                        f"{PCIE3_LATENCY / scale * 1e6:.0f} us)")
    if not parts or len(parts) > 2:
        raise InfinisimError(f"expected BANDWIDTH[,LATENCY][,duplex] or scaled-pcie3, got {text!r}", field="--link")
    try:
        bandwidth = parse_quantity(parts[0], "bandwidth")
        latency = parse_quantity(parts[1], "time") if len(parts) == 2 else 0.0
    except ValueError as exc:
        raise InfinisimError(str(exc), field="--link") from None
    if not bandwidth > 0 or not latency >= 0 or bandwidth == float("inf") or latency == float("inf"):
        raise InfinisimError(f"needs a finite bandwidth > 0 and latency >= 0, got {text!r}", field="--link")
    name = re.sub(r"\s+", "", text)
    return LinkSpec(bandwidth, latency, duplex, name)
