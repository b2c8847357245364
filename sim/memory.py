"""Peak host and device memory of a workload, as the executor allocates it, and whether it fits."""

from __future__ import annotations

import math
from dataclasses import dataclass

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.costs import partial_width
from infinisim.sim.workload import OFFLOADED, Workload, row_bytes
from infinisim.traces.spec import DTYPE_BYTES


@dataclass(frozen=True)
class MemoryPlan:
    device_bytes: float
    host_bytes: float
    device_parts: dict[str, float]
    host_parts: dict[str, float]
    device_capacity: float
    host_capacity: float
    shared: bool  # CPU-only machine: "device" and host are the same RAM

    @property
    def problem(self) -> str | None:
        """None when it fits, else what ran out (one line)."""
        gb = 1e9
        if self.shared:
            total = self.device_bytes + self.host_bytes
            if total > self.host_capacity:
                return (f"needs {total / gb:.1f} GB of memory (device-side {self.device_bytes / gb:.1f} + host-side "
                        f"{self.host_bytes / gb:.1f}) but the machine has {self.host_capacity / gb:.1f} GB")
            return None
        if self.device_bytes > self.device_capacity:
            big = max(self.device_parts, key=self.device_parts.get)
            return (f"device memory: needs {self.device_bytes / gb:.1f} GB (largest: {big} "
                    f"{self.device_parts[big] / gb:.1f} GB) but the device has {self.device_capacity / gb:.1f} GB")
        if self.host_bytes > self.host_capacity:
            return (f"host memory: needs {self.host_bytes / gb:.1f} GB but the host has "
                    f"{self.host_capacity / gb:.1f} GB")
        return None


def max_fetch(w: Workload) -> int:
    """The executor's fetch slot size in rows: the budget's cap at full capacity (the pool's
    capacity when there is a pool, since layers that do not speculate fetch every stored row)."""
    if w.knobs.get("pool_capacity") is not None:
        return min(w.capacity, int(w.knobs["pool_capacity"]))
    budget = float(w.knobs.get("budget", 0.2))
    return min(w.capacity, math.ceil(w.capacity * budget) if budget <= 1 else int(budget))


def memory_plan(w: Workload, profile: Profile) -> MemoryPlan:
    s, e = w.spec, DTYPE_BYTES[w.dtype]
    b, cap, g, d, n = w.batch, w.capacity, s.n_kv_heads, s.head_dim, s.n_layers
    layer_kv = 2.0 * b * g * cap * d * e  # one layer's K and V, all positions
    device = {"weights": float(s.weight_bytes(w.dtype)),
              # the prefill's widest activations (FFN hidden states, residual, q/k/v) and the logits;
              # attention kernels that do not keep the T x T scores (flash / memory-efficient)
              "activations": float(b * w.prompt_len * (2 * s.ffn_hidden + 4 * s.hidden) * e
                                   + b * s.vocab_size * 4)}
    host: dict[str, float] = {}
    if w.policy == "resident":
        device["kv cache"] = n * layer_kv
    elif w.policy in OFFLOADED:
        stored = cap if w.knobs.get("pool_capacity") is None else min(cap, int(w.knobs["pool_capacity"]))
        row = row_bytes(s, w.dtype, b, w.policy, int(w.knobs.get("group_size", 64)))
        host["kv cache"] = float(n * stored * row)
        device["kv staging (one layer)"] = float(cap * row)
        if w.policy in ("infinigen", "oracle", "h2o"):
            slot = layer_kv * max_fetch(w) / cap  # sized for the most rows one layer fetches
            device["fetch slots (two layers)"] = 2 * slot
            host["gather staging"] = 2 * slot
        if w.policy in ("infinigen", "oracle"):
            r = partial_width(float(w.knobs.get("partial_ratio", 0.3)), d)
            device["partial key cache"] = float(n * b * g * cap * r * e)
        if w.policy == "h2o":
            device["accumulated scores"] = float(n * b * g * cap * 4)
    return MemoryPlan(sum(device.values()), sum(host.values()), device, host, profile.device.memory,
                      profile.host.memory, profile.kind == "cpu")
