"""The server's scheduling state, iteration by iteration, as vLLM's scheduler keeps it: the queue,
the running sequences (by admission order) and their KV totals, admission by running sequences,
tokens per iteration and KV memory, whole or chunked prefill, preemption by recompute, and the
decode steps that run back to back while nothing else changes. `sim.serving` drives it in time.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.sim.iterations import IterationCosts, MemoryBudget
from infinisim.sim.latency import SLO
from infinisim.traces.requests import Request

PREFILLS = ("whole", "chunked")
MAX_RUN = 4096  # decode steps one run of unchanged sequences takes at most


@dataclass(frozen=True)
class Scheduler:
    max_seqs: int = 256  # running sequences at most
    max_batched_tokens: int = 8192  # tokens one iteration processes at most (prompts, or decodes + chunks)
    prefill: str = "whole"

    def __post_init__(self) -> None:
        for name in ("max_seqs", "max_batched_tokens"):
            if getattr(self, name) < 1:
                raise InfinisimError(f"must be at least 1, got {getattr(self, name)}",
                                     field="--" + name.replace("_", "-"))
        if self.prefill not in PREFILLS:
            raise InfinisimError(f"{self.prefill!r} is not one of {', '.join(PREFILLS)}", field="--prefill")


@dataclass
class Seq:
    """A request on the server."""

    req: Request
    order: int = 0  # admission order (preemption takes the latest first)
    prefill_len: int = 0  # tokens its prefill computes: the prompt, or prompt + generated after a preemption
    prefilled: int = 0  # of those, already processed
    cached: int = 0  # KV rows it holds
    generated: int = 0  # tokens generated so far (a prefill ends with one)
    admitted_s: float = math.nan
    first_token_s: float = math.nan
    finished_s: float = math.nan
    preemptions: int = 0

    @property
    def decoding(self) -> bool:
        return self.prefilled == self.prefill_len > 0


@dataclass
class Iteration:
    seconds: float
    decoding: list[Seq]
    prefilling: list[tuple[Seq, int]]  # (sequence, prompt tokens processed this iteration)
    steps: np.ndarray | None = None  # decode steps run back to back (nothing else changes between): their seconds


class Server:
    """The scheduler's state: the queue, the running sequences (by admission order) and their totals.
    `clock` says the time: the simulation's (`sim.serving`) or the wall clock of a live server
    (`analysis.live_serving`, which runs what this decides)."""

    def __init__(self, clock: Callable[[], float], costs: IterationCosts, scheduler: Scheduler, memory: MemoryBudget,
                 stop_at: SLO | None, n_requests: int, n_tpot: int, fast_forward: bool = True):
        self.now, self.costs, self.s, self.mem = clock, costs, scheduler, memory
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self.prompts = self.cached = 0  # totals over the running sequences (their memory is linear in them)
        self.finished: list[Seq] = []
        self.rejected: list[Seq] = []
        self.preemptions = self.admitted = 0
        self.spill = 0.0  # the last prefill's write-back, still landing when the next decode step starts
        self.stop_at, self.late_ttft, self.late_tpot = stop_at, 0, 0
        self.fast_forward, self.next_arrival_s = fast_forward, 0.0
        self.may_be_late = (stop_at.allowed_late(n_requests), stop_at.allowed_late(n_tpot)) if stop_at else None
        self.series: dict[str, list[float]] = {k: [] for k in ("start_s", "seconds", "batch", "prefill_tokens",
                                                               "waiting", "kv_tokens", "device_gb", "host_gb")}

    # ---------------------------------------------------------------- memory

    def usage(self, rows: int = 0, prompt: int = 0, seqs: int = 0) -> tuple[float, float]:
        """Device and host bytes of the running sequences, with `rows` more rows and `seqs` more
        sequences of `prompt` tokens in all."""
        n, prompts, cached = len(self.running) + seqs, self.prompts + prompt, self.cached + rows
        return (self.mem.device.of(prompts, cached) + (n - 1) * self.mem.device.base,
                self.mem.host.of(prompts, cached) + (n - 1) * self.mem.host.base)

    def fits(self, rows: int = 0, prompt: int = 0, seqs: int = 0) -> bool:
        return self.mem.fits(*self.usage(rows, prompt, seqs))

    def grow(self, q: Seq, rows: int) -> None:
        q.cached += rows
        self.cached += rows

    # ---------------------------------------------------------------- scheduling

    def admit(self, q: Seq) -> None:
        """Into the running set; its prefill recomputes what it had (prompt + generated tokens)."""
        q.order, self.admitted = self.admitted, self.admitted + 1
        q.prefill_len, q.prefilled, q.cached = q.req.prompt_len + q.generated, 0, 0
        if math.isnan(q.admitted_s):
            q.admitted_s = self.now()
        self.running[q.order] = q
        self.prompts += q.prefill_len

    def leave(self, q: Seq) -> None:
        del self.running[q.order]
        self.prompts -= q.prefill_len
        self.cached -= q.cached

    def admissible(self, budget: float, rows: float) -> Seq | None:
        """The head of the queue, if it may start now: `budget`, the prompt tokens this iteration may
        still take (inf: a prompt longer than the budget runs alone); `rows`, how many of its prompt's
        rows it caches in this iteration (a chunk, or inf: all). One that does not fit even alone is
        rejected."""
        while self.waiting and len(self.running) < self.s.max_seqs:
            q = self.waiting[0]
            n = q.req.prompt_len + q.generated
            take = min(n, rows)
            if take > budget:
                return None
            if self.fits(take, n, 1):
                return self.waiting.popleft()
            if self.running:
                return None
            self.reject(self.waiting.popleft())  # alone it does not fit: it never will
        return None

    def reject(self, q: Seq) -> None:
        q.finished_s = math.nan
        self.rejected.append(q)
        self.late_ttft += 1

    def preempt_for(self, rows: int) -> None:
        """Preempt the latest admitted sequences until `rows` more rows fit, the rows of the sequences
        preempted (one each: a decode step's) no longer needed."""
        while self.running and not self.fits(rows):
            _, q = next(reversed(self.running.items()))
            self.leave(q)
            rows -= 1 if q.decoding else 0
            q.prefilled = q.cached = 0
            if not self.running:
                self.reject(q)
                return
            q.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(q)

    def next_iteration(self) -> Iteration | None:
        if self.s.prefill == "chunked":
            return self.chunked_iteration()
        prompts: list[tuple[Seq, int]] = []
        budget = self.s.max_batched_tokens
        while (q := self.admissible(budget if prompts else math.inf, math.inf)) is not None:
            n = q.req.prompt_len + q.generated
            self.admit(q)
            self.grow(q, n)  # its prompt's rows are reserved now: the next admission counts them
            prompts.append((q, n))
            budget -= n
        if prompts:
            times = [self.costs.prefill(n) for _, n in prompts]
            self.spill = times[-1][1]
            return Iteration(sum(t for t, _ in times), [], prompts)
        self.preempt_for(sum(1 for q in self.running.values() if q.decoding))
        decoding = [q for q in self.running.values() if q.decoding]
        if not decoding:
            return None
        if self.fast_forward:
            return self.decode_run(decoding)
        seconds = self.decode_seconds(decoding) + self.spill
        self.spill = 0.0
        return Iteration(seconds, decoding, [])

    def decode_run(self, decoding: list[Seq]) -> Iteration:
        """The decode steps that follow while nothing else can change: until a sequence finishes, the
        memory would run out, or (with nobody waiting) the step in which the next request arrives
        ends. The same steps, times and boundaries as one iteration at a time."""
        b = len(decoding)
        longest = min(q.req.gen_len - q.generated for q in decoding)
        longest = int(min(longest, self.mem.rows_left(*self.usage()) // b, MAX_RUN))
        steps = self.costs.decode_run(b, self.mean_length(decoding), longest, rising=not self.costs.by_prompt)
        steps[0] += self.spill
        self.spill = 0.0
        if not self.waiting and self.next_arrival_s < math.inf:
            ends = self.now() + np.cumsum(steps)
            steps = steps[:int(np.searchsorted(ends, self.next_arrival_s)) + 1]  # up to the step it arrives in
        return Iteration(float(steps.sum()), decoding, [], steps)

    def chunked_iteration(self) -> Iteration | None:
        decoding = [q for q in self.running.values() if q.decoding]
        self.preempt_for(len(decoding))
        decoding = [q for q in decoding if q.order in self.running]
        budget = self.s.max_batched_tokens - len(decoding)
        chunks: list[tuple[Seq, int]] = []
        for q in [q for q in self.running.values() if not q.decoding]:  # prompts under way first
            c = min(q.prefill_len - q.prefilled, budget)
            if c <= 0 or not self.fits(len(decoding) + sum(n for _, n in chunks) + c):
                break
            chunks.append((q, c))
            budget -= c
        while budget > 0 and (q := self.admissible(budget, budget)) is not None:
            self.admit(q)
            c = min(q.prefill_len, budget)
            chunks.append((q, c))
            budget -= c
        if not decoding and not chunks:
            return None
        seconds = self.decode_seconds(decoding) if decoding else 0.0
        for q, c in chunks:
            seconds += self.costs.prefill_interpolated(q.prefilled + c) - self.costs.prefill_interpolated(q.prefilled)
        return Iteration(seconds, decoding, chunks)

    def mean_length(self, decoding: list[Seq]) -> float:
        """What a decode step of these sequences is timed at: their mean cache length (the newest row
        included), or for a policy whose fetch follows the prompt, their mean prefill length."""
        if self.costs.by_prompt:
            return sum(q.prefill_len for q in decoding) / len(decoding)
        return sum(q.cached for q in decoding) / len(decoding) + 1

    def decode_seconds(self, decoding: list[Seq]) -> float:
        return self.costs.decode(len(decoding), self.mean_length(decoding))

    # ---------------------------------------------------------------- the iteration's effects

    def complete(self, it: Iteration) -> None:
        now = self.now()
        for q, c in it.prefilling:
            q.prefilled += c
            self.grow(q, q.prefilled - q.cached)  # whole prompts were reserved at admission
            if q.decoding:  # the prefill's last chunk: it samples a token
                q.generated += 1
                if q.generated == 1:
                    q.first_token_s = now
                    self.late_ttft += now - q.req.arrival_s > self.stop_at.ttft_s if self.stop_at else 0
                self.retire_if_done(q, now)
        k = 1 if it.steps is None else len(it.steps)
        for q in it.decoding:
            self.grow(q, k)
            q.generated += k
            self.retire_if_done(q, now)

    def retire_if_done(self, q: Seq, now: float) -> None:
        if q.generated >= q.req.gen_len:
            q.finished_s = now
            self.leave(q)
            self.finished.append(q)
            if self.stop_at and q.req.gen_len > 1:
                self.late_tpot += (now - q.first_token_s) / (q.req.gen_len - 1) > self.stop_at.tpot_s

    def hopeless(self) -> bool:
        """Too many requests already late for the SLO's percentile to hold (`stop_at`)."""
        if self.may_be_late is None:
            return False
        waiting_late = sum(1 for q in self.waiting if q.generated == 0
                           and self.now() - q.req.arrival_s > self.stop_at.ttft_s) if self.waiting else 0
        return self.late_ttft + waiting_late > self.may_be_late[0] or self.late_tpot > self.may_be_late[1]

    def record(self, start: float, it: Iteration) -> None:
        """One row per step: when it started, its seconds, and the state after it."""
        steps = [it.seconds] if it.steps is None else it.steps.tolist()
        k, b = len(steps), len(it.decoding)
        starts = (start + np.concatenate([[0.0], np.cumsum(steps[:-1])])).tolist() if k > 1 else [start]
        retired = [q for q in it.decoding if q.order not in self.running]  # they left after the last step
        held = self.cached + sum(q.cached for q in retired)
        rows = [held - b * (k - 1 - j) for j in range(k - 1)] + [self.cached]  # the rows held after each step
        memory = [self.mem_gb(len(self.running) + len(retired), self.prompts + sum(q.prefill_len for q in retired), r)
                  for r in rows[:-1]] + [self.mem_gb(len(self.running), self.prompts, self.cached)]
        waiting = [len(self.waiting)]
        if k > 1:  # who had arrived by the end of each step
            arrived = np.sort([q.req.arrival_s for q in self.waiting])
            waiting = np.searchsorted(arrived, start + np.cumsum(steps), side="right").tolist()
        columns = {"start_s": starts, "seconds": steps, "batch": [b] * k,
                   "prefill_tokens": [sum(c for _, c in it.prefilling)] + [0] * (k - 1),
                   "waiting": waiting, "kv_tokens": rows}
        columns["device_gb"], columns["host_gb"] = ([m[i] for m in memory] for i in (0, 1))
        for key, values in columns.items():
            self.series[key].extend(values)

    def mem_gb(self, n: int, prompts: int, rows: int) -> tuple[float, float]:
        """Device (weights and activations included) and host GB of n sequences."""
        return ((self.mem.device_fixed + self.mem.device.of(prompts, rows) + (n - 1) * self.mem.device.base) / 1e9,
                (self.mem.host.of(prompts, rows) + (n - 1) * self.mem.host.base) / 1e9)
