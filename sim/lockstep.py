"""Tensor-parallel ranks replayed together: every all-reduce ends for all ranks at once.

A rank's own trace replayed alone predicts its share of the work, but under tensor parallelism the
ranks run in lockstep: an all-reduce cannot finish before the last rank reaches it, so a rank with
less work (SmolLM2's three KV heads split two and one; InfiniGen fetching a different number of
rows per head) waits for the busiest one inside the collective, and the executor times that wait
as comm. Here the ranks' simulations share one event loop and one `Collective`: each collective
("comm" part of a compute op: the all-reduces and the head's all-gather) starts when every rank has
arrived, and each rank's comm is its wait plus the transfer.
"""

from __future__ import annotations

import json

import simpy

from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.profile import Profile
from infinisim.sim.engine import CountingEnvironment, Simulation
from infinisim.sim.memory import MemoryPlan, memory_plan
from infinisim.sim.result import SimResult
from infinisim.sim.workload import Workload
from infinisim.traces.trace import Trace


class Collective:
    """The ranks' collectives in issue order: the k-th succeeds once every rank has reached its k-th."""

    def __init__(self, env: simpy.Environment, ranks: int):
        self.env, self.ranks = env, ranks
        self.open: simpy.Event | None = None  # the all-reduce the first ranks wait in
        self.arrived = 0

    def arrive(self) -> simpy.Event:
        if self.open is None:
            self.open, self.arrived = self.env.event(), 0
        event, self.arrived = self.open, self.arrived + 1
        if self.arrived == self.ranks:
            self.open = None
            event.succeed()
        return event


def runs_of(traces: list[Trace]) -> list[list[Trace]]:
    """The traces grouped by the run they record, in first-seen order: a tensor-parallel run's rank
    traces (all its ranks, in rank order) together when every rank is there; any other trace alone."""
    def key(trace: Trace) -> str:
        tp = trace.run.get("tp")
        return json.dumps({**trace.run, "tp": tp["degree"]}, sort_keys=True, default=str) if tp else str(id(trace))

    groups: dict[str, list[Trace]] = {}
    for trace in traces:
        groups.setdefault(key(trace), []).append(trace)
    out = []
    for group in groups.values():
        tp = group[0].run.get("tp")
        ranks = sorted(group, key=lambda t: t.run["tp"]["rank"]) if tp else group
        whole = tp and [t.run["tp"]["rank"] for t in ranks] == list(range(tp["degree"]))
        out.extend([ranks] if whole else [[t] for t in group])
    return out


def simulate_ranks(workloads: list[Workload], profile: Profile, timeline: bool = False,
                   memories: list[MemoryPlan] | None = None) -> list[SimResult]:
    """Each rank's workload (its shard's work, as its trace recorded it) simulated on one rank's
    `profile`, all ranks in lockstep at every all-reduce; results in the workloads' order
    (`memories`: their plans, when already computed)."""
    tp = len(workloads)
    if any(w.tp != tp for w in workloads) or len({w.n_steps for w in workloads}) != 1:
        raise InfinisimError(f"{tp} rank workloads that are not one run's {tp} ranks (their tensor-parallel "
                             "degree or step count differ)", field="tp")
    collective = Collective(CountingEnvironment(), tp)
    memories = memories or [memory_plan(w, profile) for w in workloads]
    sims = [Simulation(w, profile, m, timeline, collective) for w, m in zip(workloads, memories, strict=True)]
    for sim in sims:
        collective.env.process(sim.host())
    collective.env.run()
    return [sim.result(collective.env.scheduled) for sim in sims]
