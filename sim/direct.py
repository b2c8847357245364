"""The planner's fast path: the discrete-event simulation's answer, computed without its events.

Why it is exact: a stream runs its ops in issue order, each starting at the latest of its issue
time, the end of the stream's previous op and the ends of the ops it waits for; the host's clock
advances by what it issues and jumps to the end of what it waits for. With no engine shared by
two streams (a duplex link, or a CPU-only profile where the host waits for every op) that is a
max-plus recurrence: every op's start and end follow from ops issued before it, in issue order,
with no event queue. `DirectSimulation` runs the same host code as `Simulation` (the same
policy hooks) on `Lane`s that compute those times at submit.

Why it does not grow with the generation length: every decode step issues the same ops, with
durations that depend on its context length, and starts with the streams idle (the host waits
for the sampled token). So all steps but the first run at once, each time an array over the
steps. The first runs alone: it can still be copying the prompt's KV out when it starts. Their
phases are kept as sums over the steps (what the result reports): only the clocks and the ops'
durations are arrays over the steps, not a row per step, layer and phase.

Why it does not grow with the layers: identical layers (the same rows fetched and attended, the
same speculation) settle into a cycle of two layers (the two prefetch slots alternate): each
pair moves every clock (the host's, each stream's last end, the slots') by the same amount as
the pair before. While every `max` above picks the same argument, the clocks stay affine in the
number of pairs, so once two pairs move the clocks alike and repeat the same phases, the
simulation jumps ahead k pairs, copies the cycle's phase rows, and then runs two more identical
layers to check the cycle and its phases still hold there (a choice that flipped between shows
as a different cycle: it then goes back and on layer by layer, as when a host that ran ahead of
the streams catches up with them mid-step). The phases are checked too, since a flip can leave
the clocks alike and only move time between phases (see `repeats`).

Where an assumption fails (a half-duplex link shared by both directions, copies of zero bytes in
some steps only, a step still busy when the next starts, weights streamed from the host)
`simulate_direct` returns None and the caller runs the discrete-event simulation.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Any

import numpy as np

from infinisim.hwprofiles.profile import Profile
from infinisim.sim.engine import P, Simulation
from infinisim.sim.memory import MemoryPlan
from infinisim.sim.result import SimResult
from infinisim.sim.workload import Workload

TOLERANCE_S = 1e-12  # states this close (relative to the host clock) are the same state


class NotDirect(Exception):
    """The run breaks an assumption of the direct computation: simulate it event by event."""


class Lane:
    """A stream whose op times are computed at submit: start at the latest of issue, the previous
    op's end and what it waits for. Times are numbers, or arrays over decode steps."""

    def __init__(self, name: str, account: Any):
        self.name, self.account = name, account
        self.tail: Any = None  # the end of the last op
        self.ops = 0

    def submit(self, parts: list[tuple[str, int, Any]], after: list[Any], issued: Any, step: Any) -> Any:
        ready = issued if self.tail is None else np.maximum(issued, self.tail)
        start = ready
        for end in after:
            start = np.maximum(start, end)
        self.account(self.name, parts, start, start - ready, step)
        self.tail = start + sum(seconds for _, _, seconds in parts)
        self.ops += 1
        return self.tail


class DirectSimulation(Simulation):
    """`Simulation`'s host code on lanes: no events, all decode steps after the first at once,
    cycles of identical layers skipped."""

    phases_per_step = False

    def __init__(self, workload: Workload, profile: Profile, memory: MemoryPlan):
        super().__init__(workload, profile, memory)
        self.same_from = {"prefill": speculating_from(workload), "decode": identical_from(workload)}
        self.ops = 0

    def phase_array(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Busy seconds per [layer, phase] of the prefill, the first decode step and all the others
        summed: what the result reports is their sum, and rows per step would grow with the length."""
        return np.zeros((3, *shape[1:]))

    @staticmethod
    def row(step: Any) -> tuple[Any, ...]:
        """The steps after the first, run at once (a slice of steps), share the last row."""
        return (slice(2, 3),) if isinstance(step, slice) else Simulation.row(step)

    def book(self, step: Any, layer: int, phase: str, seconds: Any) -> None:
        if not isinstance(step, slice):
            self.phase_s[(*Simulation.row(step), layer, P[phase])] += seconds
        elif isinstance(seconds, np.ndarray):  # seconds in each step of the slice
            self.phase_s[2, layer, P[phase]] += np.add.reduce(seconds)
        else:  # the same in each
            self.phase_s[2, layer, P[phase]] += seconds * (step.stop - step.start)

    def make_streams(self) -> dict[str, Any]:
        return {name: Lane(name, self.account) for name in ("compute", "spec", "h2d", "d2h")}

    def wait(self, event: Any) -> Generator[Any, Any, None]:
        if event is not None:
            self.host_t = np.maximum(self.host_t, event)
        yield from ()

    def run(self) -> SimResult:
        run_through(self.prefill())
        n = self.w.n_steps
        if n:
            self.step, start = 1, self.host_t
            run_through(self.decode_step(0))
            self.step_s[1] = self.host_t - start
            self.check_idle()
        if n > 1:  # the other steps together, each from idle streams at its own time 0
            self.count_ops()
            self.streams = self.make_streams()
            self.host_t, self.step = np.zeros(n - 1), slice(2, n + 1)
            run_through(self.decode_step(slice(1, n)))
            self.step_s[2:] = self.host_t
            self.check_idle()
        self.count_ops()
        return self.result(self.ops)

    def count_ops(self) -> None:
        self.ops += sum(lane.ops for lane in self.streams.values())

    def check_idle(self) -> None:
        """A step's streams must be done when its host has the token, or the next step's start
        depends on this one's (every step would then need its own clock)."""
        for lane in self.streams.values():
            if lane.tail is not None and np.any(lane.tail > self.host_t + TOLERANCE_S):
                raise NotDirect(f"the {lane.name} stream is still busy when the step ends")

    def layers(self, phase: str, body: Callable[[int], Generator[Any, Any, None]]) -> Generator[Any, Any, None]:
        n, layer, first = self.w.spec.n_layers, 0, self.same_from[phase]
        states: dict[int, np.ndarray] = {}
        check: tuple[int, np.ndarray, tuple[Any, ...]] | None = None  # (layer, cycle, state before the jump)
        skipping = True
        while layer < n:
            yield from body(layer)
            # iterations first..n-2 are identical (a decode layer also prefetches the next one)
            if skipping and first - 1 <= layer <= n - 2:
                states[layer] = self.clocks()
                if check is not None and check[0] == layer:
                    if not (close(states[layer] - states[layer - 2], check[1]) and self.repeats(layer)):
                        # a choice flipped within the skipped cycles: go back, and on layer by layer
                        layer, skipping = self.restore(check[2]), False
                    check = None
                elif check is None and layer - 4 in states and layer + 4 <= n - 2:
                    cycle = states[layer] - states[layer - 2]
                    if close(cycle, states[layer - 2] - states[layer - 4]) and self.repeats(layer):
                        k = (n - 4 - layer) // 2  # two identical layers are left to check the cycle held
                        saved = self.save(layer)
                        layer = self.skip_cycles(layer, k, cycle)
                        states, check = {layer: self.clocks()}, (layer + 2, cycle, saved)
            layer += 1

    def repeats(self, layer: int) -> bool:
        """The last two layers' phases are the two before's. The clocks alone can miss a choice that
        flips: a stream waiting for a copy starts at the copy's end whether the host issued before
        or after the stream's last op, but the wait is measured from the later of the two."""
        rows = self.phase_s[self.row(self.step)]
        return all(close(rows[..., i, :], rows[..., i - 2, :]) for i in (layer - 1, layer))

    def save(self, layer: int) -> tuple[Any, ...]:
        """What a jump from `layer` changes: the clocks, and of the phases only the next layer's
        (the later layers' rows are still empty)."""
        return (layer, self.host_t, [(lane.tail, lane.ops) for lane in self.streams.values()], list(self.slot_free),
                dict(self.pending), self.phase_s[self.row(self.step)][..., layer + 1, :].copy())

    def restore(self, saved: tuple[Any, ...]) -> int:
        layer, self.host_t, lanes, self.slot_free, self.pending, partial = saved
        for lane, (tail, ops) in zip(self.streams.values(), lanes, strict=True):
            lane.tail, lane.ops = tail, ops
        rows = self.phase_s[self.row(self.step)]
        rows[..., layer + 1:self.w.spec.n_layers, :] = 0.0
        rows[..., layer + 1, :] = partial
        return layer

    def clocks(self) -> np.ndarray:
        """What the next layers depend on: the host clock, each stream's last end, the prefetch
        slots and the prefetch in flight (NaN where there is none)."""
        marks = [self.host_t, *(lane.tail for lane in self.streams.values()), *self.slot_free,
                 *self.pending.values()]
        like = np.zeros_like(self.host_t)
        return np.array([like + np.nan if m is None else like + m for m in marks], dtype=float)

    def skip_cycles(self, layer: int, k: int, step: np.ndarray) -> int:
        """Jump k two-layer cycles ahead of `layer`, each moving every clock by the last cycle's
        `step` (per clock: a host that runs ahead of the streams falls further behind); the
        skipped layers' phases repeat the last cycle's, the prefetch in flight moves with them."""
        rows = np.moveaxis(self.phase_s[self.row(self.step)], -2, 0)  # [layers, ..., phases]: copies a layer at once
        partial = rows[layer + 1].copy()  # the next layer's prefetch, issued in this one
        end = layer + 2 * k + 1
        cycle = rows[layer - 1:layer + 1]
        for p in np.flatnonzero(cycle.any(axis=tuple(range(cycle.ndim - 1)))):  # the rest stay 0
            rows[layer + 1:end:2, ..., p] = cycle[0, ..., p]  # the cycle's two layers, repeated
            rows[layer + 2:end:2, ..., p] = cycle[1, ..., p]
        rows[end] = partial
        moves = iter(k * step)
        self.host_t = self.host_t + next(moves)
        for lane in self.streams.values():
            lane.tail = moved(lane.tail, next(moves))
        self.slot_free = [moved(m, next(moves)) for m in self.slot_free]
        self.pending = {key + 2 * k: moved(m, next(moves)) for key, m in self.pending.items()}
        return layer + 2 * k


def moved(mark: Any, by: Any) -> Any:
    return None if mark is None else mark + by


def close(a: np.ndarray, b: np.ndarray) -> bool:
    """np.allclose(a, b, rtol=0, atol=TOLERANCE_S, equal_nan=True), in a third of its numpy calls
    (it runs a few times a layer)."""
    if a.shape != b.shape:
        return False
    with np.errstate(invalid="ignore"):
        apart = np.abs(a - b) > TOLERANCE_S  # False where either is NaN
    return not apart.any() and np.array_equal(np.isnan(a), np.isnan(b))


def speculating_from(w: Workload) -> int:
    """The first layer from which every layer's prefill is the same (speculating or not)."""
    flips = np.flatnonzero(w.speculating != w.speculating[-1])
    return int(flips[-1]) + 1 if len(flips) else 0


def identical_from(w: Workload) -> int:
    """The first layer from which every layer moves, attends and speculates the same in every step."""
    same = w.speculating == w.speculating[-1]
    for a in (w.kv_len, w.fetched, w.attended, w.bytes_h2d, w.bytes_d2h):
        same &= (a == a[:, -1:]).all(axis=0)
    differs = np.flatnonzero(~same)
    return int(differs[-1]) + 1 if len(differs) else 0


def run_through(host: Generator[Any, Any, Any]) -> None:
    """Run host code that waits on nothing (the lanes' times are known when issued)."""
    for _ in host:
        raise RuntimeError("the direct simulation's host code yielded an event")


class PrefillLanes(DirectSimulation):
    """Prefills of several prompt lengths at once, a lane each (the workload's prompt_len is an array
    and its kv_len row per lane the first decode step's), each followed by that first decode step,
    which can still find the prompt's KV being written back. Phases per [lane, 0 prefill | 1 step]."""

    def phase_array(self, shape: tuple[int, int, int]) -> np.ndarray:
        lanes, layers, phases = shape[0] - 1, shape[1], shape[2]
        return np.zeros((layers, phases, 2, lanes)).transpose(3, 2, 0, 1)

    def times(self) -> np.ndarray:
        """[2, lanes]: each lane's prefill seconds and its first decode step's."""
        lanes = len(self.w.prompt_len)
        self.step_s = np.zeros((2, lanes))
        self.host_t, self.step = np.zeros(lanes), (slice(None), 0)
        run_through(self.prefill())
        start, self.step = self.host_t, (slice(None), 1)
        run_through(self.decode_step(slice(None)))
        self.step_s[1] = self.host_t - start
        return self.step_s


def prefill_lanes(workload: Workload, profile: Profile, memory: MemoryPlan) -> np.ndarray | None:
    """[2, lanes]: each lane's prefill seconds and its first decode step's; None where the direct
    computation does not apply (the caller then simulates one prompt at a time)."""
    if not (profile.link.duplex or profile.synchronous):
        return None
    try:
        return PrefillLanes(workload, profile, memory).times()
    except NotDirect:
        return None


def simulate_direct(workload: Workload, profile: Profile, memory: MemoryPlan) -> SimResult | None:
    """The discrete-event simulation's result, computed directly; None where that is not exact
    (the caller then simulates event by event)."""
    if not (profile.link.duplex or profile.synchronous):
        return None  # both directions queue for one link: their order needs the event queue
    if workload.weights_on_host > 0:
        return None  # weight copies cross step boundaries and share the link with KV: not modelled here yet
    for moved in (workload.bytes_h2d, workload.bytes_d2h):
        positive = moved[1:] > 0
        if (positive.any(axis=0) & ~positive.all(axis=0)).any():
            return None  # a layer copies in some steps and not in others
    try:
        return DirectSimulation(workload, profile, memory).run()
    except NotDirect:
        return None
