"""The simulator's front door: simulate a workload on a profile, or say why it does not fit.

Every verb (replay, simulate, plan, reproduce) goes through `simulate_if_fits`, so "does not
fit" is decided once, from one memory plan, and reads the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from infinisim.core.files import write_json
from infinisim.hwprofiles.profile import Profile
from infinisim.sim.direct import simulate_direct
from infinisim.sim.engine import simulate
from infinisim.sim.lockstep import runs_of, simulate_ranks
from infinisim.sim.memory import MemoryPlan, memory_plan
from infinisim.sim.result import SimResult
from infinisim.sim.workload import Workload, fetched_fraction, from_trace, speculated_fraction_per_layer
from infinisim.traces.spec import ModelSpec
from infinisim.traces.trace import Trace


@dataclass
class Outcome:
    workload: Workload
    profile: Profile
    memory: MemoryPlan
    result: SimResult | None  # None when it does not fit
    lockstep: bool = False  # simulated together with the other ranks of its tensor-parallel run

    @property
    def fits(self) -> bool:
        return self.result is not None

    def summary(self, per_step: bool = True) -> dict[str, Any]:
        """One row: the simulated totals and phase breakdown (and each decode step's time, with
        `per_step`), or why it does not fit."""
        w = self.workload
        shared = {"knobs": w.knobs.to_dict(), "fetched_fraction": fetched_fraction(w),
                  "weights_on_host": w.weights_on_host, "tp": w.tp, **({"lockstep": self.lockstep} if w.tp > 1 else {})}
        if self.result is not None:
            steps = {"decode_step_ms": (self.result.decode_step_s * 1e3).round(4).tolist()} if per_step else {}
            return {**self.result.summary(), **shared, "does_not_fit": "", **steps}
        return {"policy": w.policy, "profile": self.profile.name, "model": w.spec.name, "batch": w.batch,
                "prompt_len": w.prompt_len, "fits": False, "does_not_fit": self.memory.problem,
                "device_peak_gb": self.memory.device_bytes / 1e9, "host_peak_gb": self.memory.host_bytes / 1e9,
                **shared}


def simulate_if_fits(workload: Workload, profile: Profile, timeline: bool = False, exact: bool = True) -> Outcome:
    """`exact`: event by event (the reference); else the direct computation of the same answer
    (`sim.direct`) where it applies. A timeline needs the events."""
    memory = memory_plan(workload, profile)
    result = None
    if memory.problem is None:
        if not exact and not timeline:
            result = simulate_direct(workload, profile, memory)
        if result is None:
            result = simulate(workload, profile, timeline, memory)
    return Outcome(workload, profile, memory, result)


def profile_for(trace: Trace, profile: Profile) -> Profile:
    """The profile a trace replays on: a CPU run over an emulated link, on the CPU profile with that link."""
    link = trace.run.get("link")
    if link and profile.host_computes:
        return profile.with_link(link["bandwidth"], link["latency"], link["duplex"], link["name"])
    return profile


def replay_traces(traces: list[Trace], profile: Profile, timeline: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    """Each trace's run replayed event by event on `profile` (a run over an emulated link on the
    profile with that link), in the traces' order; a tensor-parallel run whose every rank's trace is
    here has its ranks simulated together, in lockstep at each collective (`sim.lockstep`)."""
    outcomes: dict[int, Outcome] = {}
    for group in runs_of(traces):
        on = profile_for(group[0], profile)
        workloads = [from_trace(t) for t in group]
        plans = [memory_plan(w, on) for w in workloads] if len(group) > 1 else []
        if plans and all(plan.problem is None for plan in plans):
            results = simulate_ranks(workloads, on, timeline, plans)
            done = [Outcome(w, on, r.memory, r, lockstep=True) for w, r in zip(workloads, results, strict=True)]
        else:
            done = [simulate_if_fits(w, on, timeline) for w in workloads]
        outcomes.update((id(t), o) for t, o in zip(group, done, strict=True))
        if progress:
            progress(len(outcomes), len(traces))
    return [outcomes[id(t)] for t in traces]


def speculated_from_trace(trace: Trace, alpha: float | None, spec: ModelSpec) -> float | np.ndarray:
    """A speculating trace's uncapped share at `alpha` (default: the alpha it ran with): per layer
    for the same model; the mean over its speculating layers for another one."""
    if alpha is None:
        alpha = trace.run.get("policy_knobs", {}).get("alpha") or 5.0
    per_layer = speculated_fraction_per_layer(trace, alpha)
    if len(per_layer) != spec.n_layers:
        return float(np.nanmean(per_layer))
    return per_layer


def simulate_all(workloads: list[Workload], profile: Profile, timeline: bool = False,
                 progress: Callable[[int, int], None] | None = None) -> list[Outcome]:
    outcomes = []
    for i, w in enumerate(workloads):
        outcomes.append(simulate_if_fits(w, profile, timeline))
        if progress:
            progress(i + 1, len(workloads))
    return outcomes


def write_timelines(outcomes: list[Outcome], path: str | Path) -> list[Path]:
    """Chrome/Perfetto timelines of the configs that ran: `path`, or one file per config beside it."""
    path, written = Path(path), []
    for o in outcomes:
        if o.result is None:
            continue
        w = o.workload
        target = path if len(outcomes) == 1 else path.with_name(
            f"{path.stem}-{w.policy}-b{w.batch}-p{w.prompt_len}{path.suffix}")
        written.append(write_json(chrome_trace(o.result), target))
    return written


def chrome_trace(result: SimResult) -> dict[str, Any]:
    """Chrome/Perfetto trace events (load in chrome://tracing or ui.perfetto.dev)."""
    threads = {"host": 0, "compute": 1, "spec": 2, "h2d": 3, "d2h": 4}
    events: list[dict[str, Any]] = [
        {"name": "thread_name", "ph": "M", "pid": 0, "tid": tid, "args": {"name": name}}
        for name, tid in threads.items()]
    n = result.workload.spec.n_layers
    for stream, phase, step, layer, start, end in result.spans:
        label = phase if layer == n else f"{phase} L{layer}"
        events.append({"name": label, "cat": phase, "ph": "X", "pid": 0, "tid": threads[stream],
                       "ts": start * 1e6, "dur": (end - start) * 1e6, "args": {"step": step, "layer": layer}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"policy": result.workload.policy, "profile": result.profile.name}}
