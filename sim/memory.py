"""Peak host and device memory of a workload, as the executor allocates it, and whether it fits:
weights and activations here, the KV policy's own allocations from its simulator class."""

from __future__ import annotations

from dataclasses import dataclass, replace

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.workload import Workload
from infinisim.traces.spec import DTYPE_BYTES, ModelSpec, weight_parts, weights_to_fit


@dataclass(frozen=True)
class MemoryPlan:
    device_bytes: float
    host_bytes: float
    device_parts: dict[str, float]
    host_parts: dict[str, float]
    device_capacity: float
    host_capacity: float
    shared: bool  # CPU-only machine: "device" and host are the same RAM
    weights_to_fit: float | None = None  # the smallest --weights-on-host that would fit the device (if any)
    tp_to_fit: int | None = None  # the smallest tensor parallelism of the profile's node that would

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
            fixes = ([f"--weights-on-host {self.weights_to_fit:g}"] if self.weights_to_fit else []) + \
                ([f"--tp {self.tp_to_fit}"] if self.tp_to_fit else [])
            fix = f"; {' or '.join(fixes)} would fit" if fixes else ""
            return (f"device memory: needs {self.device_bytes / gb:.1f} GB (largest: {big} "
                    f"{self.device_parts[big] / gb:.1f} GB) but the device has {self.device_capacity / gb:.1f} GB{fix}")
        if self.host_bytes > self.host_capacity:
            return (f"host memory: needs {self.host_bytes / gb:.1f} GB but the host has "
                    f"{self.host_capacity / gb:.1f} GB")
        return None


def activation_bytes(spec: ModelSpec, dtype: str, tokens: int, rows: int) -> float:
    """The widest activations of a forward over `tokens` (FFN hidden states, residual, q/k/v) and the
    logits of `rows` sequences; attention kernels that do not keep the T x T scores."""
    return float(tokens * (2 * spec.ffn_hidden + 4 * spec.hidden) * DTYPE_BYTES[dtype] + rows * spec.vocab_size * 4)


def tp_to_fit(w: Workload, profile: Profile) -> int | None:
    """The smallest tensor-parallel degree above the workload's, within the profile's node, at which
    one GPU's share fits its memory; None without a node or when none does."""
    if profile.node is None or w.unsharded is None:
        return None
    whole = w.unsharded
    for tp in range(w.tp + 1, profile.node.gpus + 1):
        if whole.n_heads % tp or whole.n_kv_heads % tp:
            continue
        shard = replace(w, spec=whole.shard(tp), tp=tp)  # memory follows the spec, not the bytes moved
        if memory_plan(shard, profile, suggest=False).device_bytes <= profile.device.memory:
            return tp
    return None


def memory_plan(w: Workload, profile: Profile, suggest: bool = True) -> MemoryPlan:
    """`suggest`: when the device is too small, also find the weights share and TP degree that would fit."""
    s = w.spec
    device, host = weight_parts(s, w.dtype, w.weights_on_host)
    device["activations"] = activation_bytes(s, w.dtype, w.batch * w.prompt_len, w.batch)
    policy_device, policy_host = w.kv_policy.memory_parts(w)
    device.update(policy_device)
    for name, nbytes in policy_host.items():
        host[name] = host.get(name, 0.0) + nbytes
    host = {name: nbytes * w.tp for name, nbytes in host.items()}  # one host holds every GPU's share
    device_bytes = sum(device.values())
    shared = profile.kind == "cpu"
    short = suggest and not shared and device_bytes > profile.device.memory
    fix = weights_to_fit(s, w.dtype, w.weights_on_host, device_bytes, profile.device.memory) if short else None
    return MemoryPlan(device_bytes, sum(host.values()), device, host, profile.device.memory,
                      profile.host.memory, shared, fix, tp_to_fit(w, profile) if short else None)


def place_weights(w: Workload, profile: Profile) -> Workload:
    """`--weights-on-host auto`: the workload with the smallest share of weights on the host that fits
    the device (none when it fits as it is; unchanged when nothing does, so its plan says why)."""
    plan = memory_plan(w, profile)
    if plan.weights_to_fit is None:
        return w
    return replace(w, weights_on_host=plan.weights_to_fit)
