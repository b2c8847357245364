"""What one serving iteration costs, from the same per-layer model that times a static batch.

A serving iteration is a prefill (one or more prompts) or a decode step of every running
sequence, each at its own cache length. Both are timed by the step simulator (`sim.direct`, the
event simulation where that does not apply), on tables filled lazily and kept per config:

- decode(B, x): one decode step of B sequences, each at length x, from idle streams. The costs of a
  step are sums over its sequences' rows (attention, copies, speculation, gathers read or move the
  rows of all of them), so a batch of different lengths is timed as the same batch at their mean
  length: exact for equal lengths, and within each sequence's rounding of its fetch count
  otherwise. x is the cache length, or for a policy whose fetch is sized by the prompt (H2O's kept
  set) the prompt length. Integer x is simulated (in blocks of consecutive values, one array pass
  each); a fractional mean is interpolated between its two neighbours. With weights streamed from
  the host the event simulation times every STREAM_GRID-th length (in one run of steps, so each
  step's weight copies overlap the last as in a served stream) and the rest are interpolated.
- prefill(n): one prompt of n tokens (batch 1), and the spill its host write-back adds to the
  next decode step (the static simulation's first step less a step from idle at the same length).

Memory: a sequence's device and host bytes are linear in its prompt and cache lengths (what the
policy's simulator class allocates per sequence), on top of the weights and the widest activations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.hwprofiles.profile import Profile
from infinisim.sim.direct import prefill_lanes, simulate_direct
from infinisim.sim.engine import simulate
from infinisim.sim.memory import activation_bytes, memory_plan, weight_parts
from infinisim.sim.workload import Workload, at_lengths, synthetic
from infinisim.traces.spec import ModelSpec

BLOCK = 2048  # decode lengths simulated per array pass
CHUNK_GRID = 64  # prompt lengths simulated for chunked prefill (interpolated between)
STREAM_GRID = 64  # decode lengths apart the event simulation times a streamed-weights config (interpolated between)


@dataclass(frozen=True)
class SequenceMemory:
    """Bytes one sequence holds: base + per_prompt x prompt + per_token x cached tokens."""

    base: float
    per_prompt: float
    per_token: float

    def of(self, prompt: Any, cached: Any) -> Any:
        return self.base + self.per_prompt * prompt + self.per_token * cached


@dataclass(frozen=True)
class MemoryBudget:
    device_fixed: float  # weights and the widest activations
    device_capacity: float
    host_capacity: float
    shared: bool  # a CPU-only machine: device-side and host-side share one RAM
    device: SequenceMemory
    host: SequenceMemory

    def fits(self, device_used: float, host_used: float) -> bool:
        if self.shared:
            return self.device_fixed + device_used + host_used <= self.host_capacity
        return self.device_fixed + device_used <= self.device_capacity and host_used <= self.host_capacity

    def rows_left(self, device_used: float, host_used: float) -> float:
        """How many more cached rows (of any sequence) fit: memory grows by per_token a row."""
        def room(free: float, per_row: float) -> float:
            return math.inf if per_row <= 0 else max(0.0, free) / per_row
        if self.shared:
            return room(self.host_capacity - self.device_fixed - device_used - host_used,
                        self.device.per_token + self.host.per_token)
        return min(room(self.device_capacity - self.device_fixed - device_used, self.device.per_token),
                   room(self.host_capacity - host_used, self.host.per_token))


def _step_times(w: Workload, profile: Profile) -> np.ndarray:
    """Each step's seconds (index 0: the prefill), by the direct computation or else the events."""
    memory = memory_plan(w, profile)
    result = simulate_direct(w, profile, memory) or simulate(w, profile, memory=memory)
    return result.step_s


class IterationCosts:
    """Seconds of serving iterations of one config (model, profile, policy and knobs, speculated
    share), from tables filled as the serving simulation asks for them."""

    def __init__(self, spec: ModelSpec, profile: Profile, policy: str, dtype: str = "float16",
                 knobs: dict[str, Any] | None = None, speculated: float | np.ndarray | None = None, tp: int = 1,
                 weights_on_host: float = 0.0, sequences_apart: bool = False):
        """`tp`: tensor parallelism; every table is then one GPU's (its shard of the model, its share of
        the host's memory). `weights_on_host`: that share of every block's weights streamed from the host
        (its tables then come from the event simulation: the copies cross step boundaries).
        `sequences_apart`: decode steps as the executor's live server runs them, each sequence attending
        through its own policy (sim.costs.Costs.apart); default: batched attention, as vLLM's kernels."""
        self.sequences_apart = sequences_apart
        profile.for_tensor_parallel(tp)  # a profile with fewer GPUs is the first error
        self.whole, self.spec, self.tp = spec, spec.shard(tp), tp
        self.weights_on_host = weights_on_host
        self.profile, self.policy, self.dtype = profile, policy, dtype
        self.knobs, self.speculated = knobs, speculated
        probe = self._synthetic(1, 16, 2)  # checks the knobs and the share
        self.kv = probe.kv_policy
        self.by_prompt = self.kv.fetch_follows_prompt
        self._decode: dict[int, dict[int, float]] = {}  # batch -> {x: seconds}
        self._prefill: dict[int, tuple[float, float]] = {}  # prompt -> (seconds, spill)
        self.simulations = 0

    def _synthetic(self, batch: int, prompt: int, gen: int) -> Workload:
        return synthetic(self.whole, batch, prompt, gen, self.policy, self.dtype, self.knobs, self.speculated,
                         weights_on_host=self.weights_on_host, tp=self.tp)

    def _at_lengths(self, batch: int, prompt: int, lengths: Any, sized_by: Any = None) -> Workload:
        w = at_lengths(self.spec, batch, prompt, lengths, self.policy, self.dtype, self.knobs, self.speculated,
                       sized_by=sized_by)
        w.tp, w.weights_on_host, w.sequences_apart = self.tp, self.weights_on_host, self.sequences_apart
        return w

    # ---------------------------------------------------------------- decode steps

    def decode(self, batch: int, x: float) -> float:
        """One decode step of `batch` sequences at mean length x (see the module docstring)."""
        low = max(2, math.floor(x))
        table = self._decode.setdefault(batch, {})
        for whole in (low, low + 1):
            if whole not in table:
                self._fill(batch, whole, table)
        frac = min(max(x - low, 0.0), 1.0)
        return table[low] + frac * (table[low + 1] - table[low])

    def decode_run(self, batch: int, x: float, steps: int, rising: bool) -> np.ndarray:
        """Seconds of `steps` consecutive decode steps of the same sequences from mean length x (each
        step one row longer when `rising`; a fetch that follows the prompt stays)."""
        xs = x + np.arange(steps) if rising else np.full(steps, x)
        low = np.maximum(2, np.floor(xs)).astype(np.int64)
        table = self._decode.setdefault(batch, {})
        for whole in range(int(low[0]), int(low[-1]) + 2):
            if whole not in table:
                self._fill(batch, whole, table)
        a = np.array([table[v] for v in low.tolist()])
        b = np.array([table[v + 1] for v in low.tolist()])
        return a + np.clip(xs - low, 0.0, 1.0) * (b - a)

    def _fill(self, batch: int, x: int, table: dict[int, float]) -> None:
        start = x - x % BLOCK
        xs = np.arange(max(start, 2), start + BLOCK + 1)
        xs = xs[[v not in table for v in xs]]
        # streamed weights need the event simulation: a step every STREAM_GRID lengths, interpolated
        grid = xs if self.weights_on_host <= 0 else np.unique(np.r_[xs[::STREAM_GRID], xs[-1]])
        # one extra step first: a decode step right after a prefill is not from idle streams
        lengths = np.concatenate([grid[:1], grid])
        if self.by_prompt:  # the fetch follows the prompt: x is the prompt, the cache just past it
            w = self._at_lengths(batch, 1, lengths + 1, sized_by=lengths)
        else:
            w = self._at_lengths(batch, 1, lengths)
        seconds = _step_times(w, self.profile)[2:]
        self.simulations += 1
        if len(grid) < len(xs):
            seconds = np.interp(xs, grid, seconds)
        table.update(zip(xs.tolist(), seconds.tolist(), strict=True))

    # ---------------------------------------------------------------- prefills

    def prefill(self, n: int) -> tuple[float, float]:
        """(seconds of one prompt of n tokens, the write-back spill into the next decode step)."""
        if n not in self._prefill:
            self.prefill_many([n])
        return self._prefill[n]

    def prefill_many(self, lengths: Any) -> None:
        """Simulate the prefills of these prompt lengths, all at once where the direct computation
        applies (a lane each), else one by one."""
        todo = np.array(sorted({int(n) for n in lengths} - set(self._prefill)), dtype=np.int64)
        if not len(todo):
            return
        if self.spec.family == "opt" and todo[-1] + 1 > self.spec.max_positions:
            raise InfinisimError(f"a prompt of {todo[-1]} tokens exceeds {self.spec.name}'s "
                                 f"{self.spec.max_positions} positions", field="prompt_len")
        w = replace(self._at_lengths(1, int(todo[-1]), todo + 1, sized_by=todo), prompt_len=todo)
        steps = prefill_lanes(w, self.profile, memory_plan(replace(w, prompt_len=int(todo[-1])), self.profile))
        if steps is None:  # one at a time, event by event
            steps = np.array([_step_times(self._synthetic(1, int(n), 2), self.profile)[:2] for n in todo]).T
            self.simulations += len(todo) - 1
        self.simulations += 1
        for n, prefill, first in zip(todo.tolist(), steps[0].tolist(), steps[1].tolist(), strict=True):
            idle = self.decode(1, n if self.by_prompt else n + 1)
            self._prefill[n] = (prefill, max(0.0, first - idle))

    def prefill_interpolated(self, n: float) -> float:
        """Seconds of a prompt of n tokens between simulated multiples of CHUNK_GRID (0 at 0): what a
        chunk of a prompt costs is the difference of two of these (chunked prefill)."""
        if n <= 0:
            return 0.0
        low = int(n // CHUNK_GRID) * CHUNK_GRID
        a = self.prefill(low)[0] if low else 0.0
        b = self.prefill(low + CHUNK_GRID)[0]
        return a + (n - low) / CHUNK_GRID * (b - a)

    # ---------------------------------------------------------------- memory

    def memory(self, max_batched_tokens: int, max_seqs: int) -> MemoryBudget:
        """What the config has room for: fixed device bytes (weights, the activations of the widest
        prefill and the decode logits) and each sequence's bytes, from the policy's allocations."""
        p, c, d = 256, 768, 256  # within every model's positions (OPT: 2048)

        def parts(prompt: int, capacity: int) -> tuple[float, float]:
            w = self._synthetic(1, prompt, capacity - prompt + 1)
            device, host = w.kv_policy.memory_parts(w)
            return sum(device.values()), sum(host.values())

        (dev0, host0), (dev_p, host_p), (dev_c, host_c) = parts(p, c), parts(p + d, c + d), parts(p, c + d)
        device = SequenceMemory(0.0, (dev_p - dev_c) / d, (dev_c - dev0) / d)
        host = SequenceMemory(0.0, (host_p - host_c) / d, (host_c - host0) / d)
        device = SequenceMemory(dev0 - device.of(p, c), device.per_prompt, device.per_token)
        host = SequenceMemory(host0 - host.of(p, c), host.per_prompt, host.per_token)
        weights_device, weights_host = (sum(part.values()) for part in
                                        weight_parts(self.spec, self.dtype, self.weights_on_host))
        fixed = weights_device + activation_bytes(self.spec, self.dtype, max_batched_tokens, max_seqs)
        return MemoryBudget(fixed, self.profile.device.memory, self.profile.host.memory / self.tp - weights_host,
                            self.profile.kind == "cpu", device, host)  # one GPU's view: its share of the host
