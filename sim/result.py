"""What a simulation reports: per-step and per-phase busy time, the memory plan, link use; the
phase names every part of the simulator (and the validation) indexes by."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.memory import MemoryPlan
from infinisim.sim.workload import Workload

PHASES = ("embed", "attn", "ffn", "spec", "gather", "h2d", "d2h", "wait", "head", "bookkeeping", "comm")
COMPUTE = ("embed", "attn", "ffn", "head", "comm")  # the compute stream's own work (comm: tensor-parallel collectives)


@dataclass
class SimResult:
    workload: Workload
    profile: Profile
    step_s: np.ndarray  # [1 + decode steps]; index 0 is the prefill
    phase_s: np.ndarray | None  # [1 + decode steps, layers + 1, len(PHASES)] busy seconds; last layer row: embed/head
    # (None from the fast path, sim.direct, which keeps only the sums over the decode steps)
    decode_phase_s: np.ndarray  # [layers + 1, len(PHASES)]: busy seconds summed over the decode steps
    memory: MemoryPlan
    link_busy_s: float
    events: int
    spans: list[tuple[str, str, int, int, float, float]] = field(default_factory=list)  # stream, phase, step, layer

    @property
    def decode_step_s(self) -> np.ndarray:
        return self.step_s[1:]

    @property
    def total_s(self) -> float:
        return float(self.step_s.sum())

    def summary(self) -> dict[str, Any]:
        decode = self.decode_step_s
        per_phase = self.decode_phase_s.sum(axis=0) / len(decode) if len(decode) else np.zeros(len(PHASES))
        phase_ms = {name: float(per_phase[i] * 1e3) for i, name in enumerate(PHASES)}
        step_ms = float(decode.mean() * 1e3) if len(decode) else 0.0
        phase_ms["host"] = host_bound_ms(step_ms, phase_ms, self.profile.serial_phases())
        return {
            "policy": self.workload.policy, "profile": self.profile.name, "model": self.workload.spec.name,
            "batch": self.workload.batch, "prompt_len": self.workload.prompt_len,
            "decode_steps": len(decode), "prefill_s": float(self.step_s[0]),
            "decode_ms_mean": float(decode.mean() * 1e3) if len(decode) else float("nan"),
            "total_s": self.total_s,
            "tokens_per_s": float(self.workload.batch * (len(decode) + 1) / self.total_s),
            "decode_phase_ms": phase_ms,
            "link_utilisation": float(self.link_busy_s / self.total_s),
            "device_peak_gb": self.memory.device_bytes / 1e9, "host_peak_gb": self.memory.host_bytes / 1e9,
            "fits": self.memory.problem is None, "events": self.events,
        }


def host_bound_ms(step_ms: float, phase_ms: dict[str, float], serial: tuple[str, ...]) -> float:
    """The part of a decode step the compute stream spent neither computing nor waiting for copies:
    starved while the host issued work (launches, gathers, synchronisations). With it, compute +
    wait + host is the step, plus the `serial` phases the compute thread did in turn on a CPU-only
    machine (speculation and gathers; copies too without an emulated link)."""
    busy = sum(phase_ms.get(p, 0.0) for p in (*COMPUTE, "wait", *serial))
    return max(0.0, step_ms - busy)
