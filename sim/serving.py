"""Serving a request stream with continuous (iteration-level) batching, as vLLM schedules it.

The story: requests arrive (`arrivals`) and wait in a queue. The server (`serve`) loops over
iterations. Each iteration it first admits waiting requests in arrival order while there is room
(at most `max_seqs` running, at most `max_batched_tokens` prompt tokens in one iteration, and the
KV memory for their prompts), and runs their prefill; when nothing can be admitted it runs one
decode step of every running sequence. A sequence's KV grows a row per step; when a step would
not fit, the most recently admitted sequences are preempted (their KV dropped, to be recomputed
from prompt + generated tokens when they are admitted again). With `prefill="chunked"` every
iteration decodes all running sequences and fills the rest of the token budget with chunks of
prompts (vLLM's chunked prefill), so long prompts do not stall the decodes.

Memory is the policy's: device memory for `resident`'s cache; host memory for an offloading
policy's cache plus the device-side buffers it keeps per sequence (`sim.iterations`). Iteration
times come from `IterationCosts` (the per-layer step model).

A request's first token comes at the end of the iteration that finishes its prefill (TTFT from its
arrival); TPOT is the mean time per later token; the latency table reads percentiles over requests.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from infinisim.core.errors import InfinisimError
from infinisim.sim.iterations import IterationCosts, MemoryBudget
from infinisim.sim.latency import SLO
from infinisim.traces.requests import Request, RequestStream

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


@dataclass
class ServingResult:
    stream: RequestStream
    requests: dict[str, np.ndarray]  # per request: arrival_s, admitted_s, first_token_s, finished_s, ...
    series: dict[str, np.ndarray]  # per iteration: start_s, seconds, batch, prefill_tokens, waiting, memory
    preemptions: int
    rejected: int  # requests that could never fit the KV memory alone
    simulations: int  # step simulations the iteration tables took
    stopped: bool = False  # given up once the SLO could no longer be met (`stop_at`): the rest not served
    too_long: int = 0  # requests longer than the model's positions: refused, not counted against the SLO

    @property
    def makespan_s(self) -> float:
        done = self.requests["finished_s"]
        return float(np.nanmax(done)) if np.isfinite(done).any() else 0.0


class Server:
    """The scheduler's state: the queue, the running sequences (by admission order) and their totals."""

    def __init__(self, env: simpy.Environment, costs: IterationCosts, scheduler: Scheduler, memory: MemoryBudget,
                 stop_at: SLO | None, n_requests: int, n_tpot: int, fast_forward: bool = True):
        self.env, self.costs, self.s, self.mem = env, costs, scheduler, memory
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}
        self.prompts = self.cached = 0  # totals over the running sequences (their memory is linear in them)
        self.finished: list[Seq] = []
        self.rejected: list[Seq] = []
        self.preemptions = self.admitted = 0
        self.arrived = simpy.Event(env)
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
            q.admitted_s = self.env.now
        self.running[q.order] = q
        self.prompts += q.prefill_len

    def leave(self, q: Seq) -> None:
        del self.running[q.order]
        self.prompts -= q.prefill_len
        self.cached -= q.cached

    def admissible(self, budget: int, rows: int) -> Seq | None:
        """The head of the queue, if it may start now with `rows` of its prompt (`budget` tokens left
        this iteration); a request that does not fit even alone is rejected."""
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
        while (q := self.admissible(budget if prompts else max(budget, 1 << 62), 1 << 62)) is not None:
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
        x = (sum(q.prefill_len for q in decoding) if self.costs.by_prompt else sum(q.cached for q in decoding) + b) / b
        steps = self.costs.decode_run(b, x, longest, rising=not self.costs.by_prompt)
        steps[0] += self.spill
        self.spill = 0.0
        if not self.waiting and self.next_arrival_s < math.inf:
            ends = self.env.now + np.cumsum(steps)
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

    def decode_seconds(self, decoding: list[Seq]) -> float:
        """One step of the decoding sequences, at their mean cache length (the newest row included),
        or for a policy whose fetch follows the prompt, their mean prefill length."""
        if self.costs.by_prompt:
            x = sum(q.prefill_len for q in decoding) / len(decoding)
        else:
            x = sum(q.cached for q in decoding) / len(decoding) + 1
        return self.costs.decode(len(decoding), x)

    # ---------------------------------------------------------------- the iteration's effects

    def complete(self, it: Iteration) -> None:
        now = self.env.now
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
                           and self.env.now - q.req.arrival_s > self.stop_at.ttft_s) if self.waiting else 0
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


def arrivals(env: simpy.Environment, stream: RequestStream, server: Server) -> Any:
    """Each request joins the queue at its arrival time and wakes an idle server."""
    for i, r in enumerate(stream.requests):
        if r.arrival_s > env.now:
            yield env.timeout(r.arrival_s - env.now)
        server.waiting.append(Seq(r))
        server.next_arrival_s = stream.requests[i + 1].arrival_s if i + 1 < len(stream) else math.inf
        if not server.arrived.triggered:
            server.arrived.succeed()


def serve(env: simpy.Environment, server: Server, total: int) -> Any:
    """Iterate while requests remain: admit and prefill, else decode every running sequence."""
    while len(server.finished) + len(server.rejected) < total:
        it = server.next_iteration()
        if it is None:  # nothing to run: wait for the next arrival
            server.arrived = simpy.Event(env)
            yield server.arrived
            continue
        start = env.now
        yield env.timeout(it.seconds)
        server.complete(it)
        server.record(start, it)
        if server.hopeless():
            return


def simulate_serving(stream: RequestStream, costs: IterationCosts, scheduler: Scheduler = Scheduler(),
                     stop_at: SLO | None = None, fast_forward: bool = True) -> ServingResult:
    """Serve the stream on the config `costs` describes; per-request times and a per-iteration series.
    `stop_at`: give up as soon as enough requests are late that this SLO cannot hold (a rate search
    needs only the verdict). `fast_forward`: run the decode steps between changes at once (the same
    answer as one at a time, which is what False does)."""
    if not len(stream):
        raise InfinisimError("the request stream is empty", field="requests")
    memory = costs.memory(scheduler.max_batched_tokens, scheduler.max_seqs)
    if not memory.fits(0.0, 0.0):
        raise InfinisimError(f"does not fit: the weights and activations need {memory.device_fixed / 1e9:.1f} GB of "
                             f"{memory.device_capacity / 1e9:.1f} GB device memory", field="--model")
    limit = costs.spec.max_positions  # longer requests are refused, as a server refuses beyond its model's length
    servable = RequestStream(tuple(r for r in stream.requests if r.prompt_len + r.gen_len <= limit), stream.source)
    costs.prefill_many(r.prompt_len for r in servable.requests)  # every first prefill, in one simulation
    env = simpy.Environment()
    n_tpot = sum(1 for r in servable.requests if r.gen_len > 1)
    server = Server(env, costs, scheduler, memory, stop_at, len(servable), n_tpot, fast_forward)
    env.process(arrivals(env, servable, server))
    done = env.process(serve(env, server, len(servable)))
    env.run(until=done)
    served = {q.req.id: q for q in server.finished + server.rejected}
    seqs = [served.get(r.id) or Seq(r) for r in stream.requests]
    columns = {"id": lambda q: q.req.id, "arrival_s": lambda q: q.req.arrival_s,
               "prompt_len": lambda q: q.req.prompt_len, "gen_len": lambda q: q.req.gen_len,
               "admitted_s": lambda q: q.admitted_s, "first_token_s": lambda q: q.first_token_s,
               "finished_s": lambda q: q.finished_s, "preemptions": lambda q: q.preemptions,
               "too_long": lambda q: q.req.prompt_len + q.req.gen_len > limit}
    requests = {name: np.array([get(q) for q in seqs]) for name, get in columns.items()}
    return ServingResult(stream, requests, {k: np.asarray(v) for k, v in server.series.items()}, server.preemptions,
                         len(server.rejected), costs.simulations, len(served) < len(servable),
                         len(stream) - len(servable))
