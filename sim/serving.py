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
from infinisim.traces.requests import Request, RequestStream

PREFILLS = ("whole", "chunked")


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


@dataclass
class ServingResult:
    stream: RequestStream
    requests: dict[str, np.ndarray]  # per request: arrival_s, admitted_s, first_token_s, finished_s, ...
    series: dict[str, np.ndarray]  # per iteration: start_s, seconds, batch, prefill_tokens, waiting, memory
    preemptions: int
    rejected: int  # requests that could never fit the KV memory alone
    simulations: int  # step simulations the iteration tables took

    @property
    def makespan_s(self) -> float:
        done = self.requests["finished_s"]
        return float(np.nanmax(done)) if np.isfinite(done).any() else 0.0


class Server:
    def __init__(self, env: simpy.Environment, costs: IterationCosts, scheduler: Scheduler, memory: MemoryBudget):
        self.env, self.costs, self.s, self.mem = env, costs, scheduler, memory
        self.waiting: deque[Seq] = deque()
        self.running: dict[int, Seq] = {}  # by admission order
        self.finished: list[Seq] = []
        self.rejected: list[Seq] = []
        self.preemptions = 0
        self.arrived = simpy.Event(env)
        self.admitted = 0
        self.spill = 0.0  # the last prefill's write-back, still landing when the next decode step starts
        self.series: dict[str, list[float]] = {k: [] for k in ("start_s", "seconds", "batch", "prefill_tokens",
                                                               "waiting", "kv_tokens", "device_gb", "host_gb")}

    # ---------------------------------------------------------------- memory

    def usage(self, seqs: list[Seq], extra: dict[int, int] | None = None) -> tuple[float, float]:
        """Device and host bytes of `seqs`, each with `extra` rows more (by admission order)."""
        extra = extra or {}
        n, prompts = len(seqs), sum(q.prefill_len for q in seqs)
        cached = sum(q.cached for q in seqs) + sum(extra.get(q.order, 0) for q in seqs)
        return self.mem.device.of(prompts, cached) + (n - 1) * self.mem.device.base, \
            self.mem.host.of(prompts, cached) + (n - 1) * self.mem.host.base

    def fits(self, seqs: list[Seq], extra: dict[int, int] | None = None) -> bool:
        return self.mem.fits(*self.usage(seqs, extra))

    # ---------------------------------------------------------------- scheduling

    def admit(self, q: Seq) -> None:
        q.order, self.admitted = self.admitted, self.admitted + 1
        q.prefill_len, q.prefilled, q.cached = q.req.prompt_len + q.generated, 0, 0  # recomputes what it had
        if math.isnan(q.admitted_s):
            q.admitted_s = self.env.now
        self.running[q.order] = q

    def preempt_for(self, need: dict[int, int]) -> None:
        """Preempt the latest admitted sequences until the others' next rows fit."""
        while self.running and not self.fits(list(self.running.values()), need):
            order, q = self.running.popitem()
            need.pop(order, None)
            q.cached = q.prefilled = 0
            if not self.running:  # alone, it does not fit: it never will
                q.finished_s = math.nan
                self.rejected.append(q)
                return
            q.preemptions += 1
            self.preemptions += 1
            self.waiting.appendleft(q)

    def next_iteration(self) -> Iteration | None:
        if self.s.prefill == "chunked":
            return self.chunked_iteration()
        prompts: list[tuple[Seq, int]] = []
        tokens = 0
        while self.waiting and len(self.running) < self.s.max_seqs:
            q = self.waiting[0]
            n = q.req.prompt_len + q.generated
            if prompts and tokens + n > self.s.max_batched_tokens:
                break
            (device, host), (q_device, q_host) = self.usage(list(self.running.values())), self.one(q, n)
            if not self.mem.fits(device + q_device, host + q_host):
                if not self.running and not prompts:  # alone it does not fit: it never will
                    self.rejected.append(self.waiting.popleft())
                    continue
                break
            self.admit(self.waiting.popleft())
            q.cached = n  # its prompt's rows are reserved now: the next admission counts them
            prompts.append((q, n))
            tokens += n
        if prompts:
            times = [self.costs.prefill(n) for _, n in prompts]
            self.spill = times[-1][1]
            return Iteration(sum(t for t, _ in times), [], prompts)
        if not any(q.decoding for q in self.running.values()):
            return None
        self.preempt_for({q.order: 1 for q in self.running.values() if q.decoding})
        decoding = [q for q in self.running.values() if q.decoding]
        if not decoding:
            return None
        seconds = self.decode_seconds(decoding) + self.spill
        self.spill = 0.0
        return Iteration(seconds, decoding, [])

    def one(self, q: Seq, cached: int) -> tuple[float, float]:
        """Device and host bytes of one sequence holding `cached` rows after a prefill of its own."""
        prompt = q.req.prompt_len + q.generated
        return self.mem.device.of(prompt, cached), self.mem.host.of(prompt, cached)

    def chunked_iteration(self) -> Iteration | None:
        decoding = [q for q in self.running.values() if q.decoding]
        budget = self.s.max_batched_tokens - len(decoding)
        chunks: list[tuple[Seq, int]] = []
        for q in [q for q in self.running.values() if not q.decoding]:  # prompts under way first
            if budget <= 0:
                break
            c = min(q.prefill_len - q.prefilled, budget)
            chunks.append((q, c))
            budget -= c
        while budget > 0 and self.waiting and len(self.running) < self.s.max_seqs:
            q = self.waiting.popleft()
            self.admit(q)
            c = min(q.prefill_len, budget)
            chunks.append((q, c))
            budget -= c
        need = {q.order: 1 for q in decoding} | {q.order: c for q, c in chunks}
        self.preempt_for(need)
        decoding = [q for q in decoding if q.order in self.running]
        chunks = [(q, c) for q, c in chunks if q.order in self.running]
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
            q.cached = q.prefilled
            if q.decoding:  # the prefill's last chunk: it samples a token
                q.generated += 1
                if q.generated == 1:
                    q.first_token_s = now
                self.retire_if_done(q, now)
        for q in it.decoding:
            q.cached += 1
            q.generated += 1
            self.retire_if_done(q, now)

    def retire_if_done(self, q: Seq, now: float) -> None:
        if q.generated >= q.req.gen_len:
            q.finished_s = now
            del self.running[q.order]
            self.finished.append(q)

    def record(self, start: float, it: Iteration) -> None:
        device, host = self.usage(list(self.running.values()))
        row = (start, it.seconds, len(it.decoding), sum(c for _, c in it.prefilling), len(self.waiting),
               sum(q.cached for q in self.running.values()), (self.mem.device_fixed + device) / 1e9, host / 1e9)
        for key, value in zip(self.series, row, strict=True):
            self.series[key].append(value)


def arrivals(env: simpy.Environment, stream: RequestStream, server: Server) -> Any:
    """Each request joins the queue at its arrival time and wakes an idle server."""
    for r in stream.requests:
        if r.arrival_s > env.now:
            yield env.timeout(r.arrival_s - env.now)
        server.waiting.append(Seq(r))
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


def simulate_serving(stream: RequestStream, costs: IterationCosts, scheduler: Scheduler = Scheduler()
                     ) -> ServingResult:
    """Serve the stream on the config `costs` describes; per-request times and a per-iteration series."""
    if not len(stream):
        raise InfinisimError("the request stream is empty", field="requests")
    memory = costs.memory(scheduler.max_batched_tokens, scheduler.max_seqs)
    if not memory.fits(0.0, 0.0):
        raise InfinisimError(f"does not fit: the weights and activations need {memory.device_fixed / 1e9:.1f} GB of "
                             f"{memory.device_capacity / 1e9:.1f} GB device memory", field="--model")
    env = simpy.Environment()
    server = Server(env, costs, scheduler, memory)
    env.process(arrivals(env, stream, server))
    env.process(serve(env, server, len(stream)))
    env.run()
    seqs = sorted(server.finished + server.rejected, key=lambda q: q.req.id)
    columns = {"id": lambda q: q.req.id, "arrival_s": lambda q: q.req.arrival_s,
               "prompt_len": lambda q: q.req.prompt_len, "gen_len": lambda q: q.req.gen_len,
               "admitted_s": lambda q: q.admitted_s, "first_token_s": lambda q: q.first_token_s,
               "finished_s": lambda q: q.finished_s, "preemptions": lambda q: q.preemptions}
    requests = {name: np.array([get(q) for q in seqs]) for name, get in columns.items()}
    return ServingResult(stream, requests, {k: np.asarray(v) for k, v in server.series.items()}, server.preemptions,
                         len(server.rejected), costs.simulations)


@dataclass(frozen=True)
class SLO:
    ttft_s: float = 2.0
    tpot_s: float = 0.1
    percentile: float = 99.0

    def describe(self) -> str:
        return f"TTFT p{self.percentile:g} <= {self.ttft_s:g} s, TPOT p{self.percentile:g} <= {self.tpot_s * 1e3:g} ms"


def latencies(result: ServingResult) -> dict[str, np.ndarray]:
    """Per request (NaN where it does not apply): queueing, TTFT, TPOT, end-to-end, in seconds."""
    r = result.requests
    later = r["gen_len"] - 1
    with np.errstate(invalid="ignore", divide="ignore"):
        tpot = np.where(later > 0, (r["finished_s"] - r["first_token_s"]) / np.maximum(later, 1), np.nan)
    return {"queueing_s": r["admitted_s"] - r["arrival_s"], "ttft_s": r["first_token_s"] - r["arrival_s"],
            "tpot_s": tpot, "e2e_s": r["finished_s"] - r["arrival_s"]}


def summarize_serving(result: ServingResult, slo: SLO = SLO()) -> dict[str, Any]:
    """The latency table (p50/p90/p99 of each latency), throughput, and goodput under the SLO."""
    lat = latencies(result)
    out: dict[str, Any] = {"requests": len(result.stream), "completed": int(np.isfinite(lat["e2e_s"]).sum()),
                           "rejected": result.rejected, "preemptions": result.preemptions,
                           "makespan_s": result.makespan_s}
    for name, values in lat.items():
        finite = values[np.isfinite(values)]
        for p in (50, 90, 99):
            out[f"{name[:-2]}_p{p}_s"] = float(np.percentile(finite, p)) if len(finite) else None
    span = result.makespan_s or math.nan
    tokens = float(result.requests["gen_len"][np.isfinite(lat["e2e_s"])].sum())
    meets = (lat["ttft_s"] <= slo.ttft_s) & ((lat["tpot_s"] <= slo.tpot_s) | np.isnan(lat["tpot_s"]))
    out.update(throughput_rps=out["completed"] / span, output_tokens_per_s=tokens / span,
               goodput_rps=float(meets.sum()) / span, slo_attainment=float(meets.mean()),
               meets_slo=_meets(lat, slo), slo=slo.describe(), mean_batch=float(np.mean(result.series["batch"]))
               if len(result.series["batch"]) else 0.0)
    return out


def _meets(lat: dict[str, np.ndarray], slo: SLO) -> bool:
    """The SLO's percentile of TTFT and of TPOT within their bounds (requests not completed count as
    infinitely late)."""
    ttft = np.where(np.isfinite(lat["ttft_s"]), lat["ttft_s"], np.inf)
    tpot = lat["tpot_s"][~np.isnan(lat["tpot_s"])]
    ok_ttft = np.percentile(ttft, slo.percentile, method="higher") <= slo.ttft_s
    ok_tpot = not len(tpot) or np.percentile(tpot, slo.percentile, method="higher") <= slo.tpot_s
    return bool(ok_ttft and ok_tpot)


def parse_slo(text: str) -> SLO:
    """'ttft=2s,tpot=100ms,p=99' (any subset; units s or ms) -> SLO."""
    values: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        key, _, raw = part.partition("=")
        key, raw = key.strip().lower(), raw.strip().lower()
        if key not in ("ttft", "tpot", "p") or not raw:
            raise InfinisimError(f"{part!r}: expected ttft=TIME, tpot=TIME or p=PERCENTILE", field="--slo")
        scale = 1e-3 if raw.endswith("ms") else 1.0
        number = raw.removesuffix("ms").removesuffix("s")
        try:
            value = float(number) * (scale if key != "p" else 1.0)
        except ValueError:
            raise InfinisimError(f"{part!r}: {raw!r} is not a number", field="--slo") from None
        if not (math.isfinite(value) and value > 0) or (key == "p" and value > 100):
            raise InfinisimError(f"{part!r}: out of range", field="--slo")
        values[key] = value
    default = SLO()
    return SLO(values.get("ttft", default.ttft_s), values.get("tpot", default.tpot_s),
               values.get("p", default.percentile))


