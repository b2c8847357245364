"""Peak host and device memory of a workload, as the executor allocates it, and whether it fits:
weights and activations here, the KV policy's own allocations from its simulator class."""

from __future__ import annotations

from dataclasses import dataclass

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.workload import Workload
from infinisim.traces.spec import DTYPE_BYTES, ModelSpec


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


def activation_bytes(spec: ModelSpec, dtype: str, tokens: int, rows: int) -> float:
    """The widest activations of a forward over `tokens` (FFN hidden states, residual, q/k/v) and the
    logits of `rows` sequences; attention kernels that do not keep the T x T scores."""
    return float(tokens * (2 * spec.ffn_hidden + 4 * spec.hidden) * DTYPE_BYTES[dtype] + rows * spec.vocab_size * 4)


def memory_plan(w: Workload, profile: Profile) -> MemoryPlan:
    s = w.spec
    device = {"weights": float(s.weight_bytes(w.dtype)),
              "activations": activation_bytes(s, w.dtype, w.batch * w.prompt_len, w.batch)}
    policy_device, host = w.kv_policy.memory_parts(w)
    device.update(policy_device)
    return MemoryPlan(sum(device.values()), sum(host.values()), device, host, profile.device.memory,
                      profile.host.memory, profile.kind == "cpu")
