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
from dataclasses import dataclass
from typing import Any

import numpy as np
import simpy

from infinisim.core.errors import InfinisimError
from infinisim.sim.iterations import IterationCosts
from infinisim.sim.latency import SLO
from infinisim.sim.server import Scheduler, Seq, Server
from infinisim.traces.requests import RequestStream

__all__ = ["ServingResult", "servable", "served", "simulate_serving"]


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


@dataclass
class Doorbell:
    """What an idle server waits on: rung by the next arrival."""

    event: simpy.Event


def arrivals(env: simpy.Environment, stream: RequestStream, server: Server, bell: Doorbell) -> Any:
    """Each request joins the queue at its arrival time and wakes an idle server."""
    for i, r in enumerate(stream.requests):
        if r.arrival_s > env.now:
            yield env.timeout(r.arrival_s - env.now)
        server.waiting.append(Seq(r))
        server.next_arrival_s = stream.requests[i + 1].arrival_s if i + 1 < len(stream) else math.inf
        if not bell.event.triggered:
            bell.event.succeed()


def serve(env: simpy.Environment, server: Server, total: int, bell: Doorbell) -> Any:
    """Iterate while requests remain: admit and prefill, else decode every running sequence."""
    while len(server.finished) + len(server.rejected) < total:
        it = server.next_iteration()
        if it is None:  # nothing to run: wait for the next arrival
            bell.event = simpy.Event(env)
            yield bell.event
            continue
        start = env.now
        yield env.timeout(it.seconds)
        server.complete(it)
        server.record(start, it)
        if server.hopeless():
            return


def simulate_serving(stream: RequestStream, costs: IterationCosts, scheduler: Scheduler | None = None,
                     stop_at: SLO | None = None, fast_forward: bool = True) -> ServingResult:
    """Serve the stream on the config `costs` describes; per-request times and a per-iteration series.
    `stop_at`: give up as soon as enough requests are late that this SLO cannot hold (a rate search
    needs only the verdict). `fast_forward`: run the decode steps between changes at once (the same
    answer as one at a time, which is what False does)."""
    scheduler = scheduler or Scheduler()
    if not len(stream):
        raise InfinisimError("the request stream is empty", field="requests")
    memory = costs.memory(scheduler.max_batched_tokens, scheduler.max_seqs)
    if not memory.fits(0.0, 0.0):
        raise InfinisimError(f"does not fit: the weights and activations need {memory.device_fixed / 1e9:.1f} GB of "
                             f"{memory.device_capacity / 1e9:.1f} GB device memory", field="--model")
    limit = costs.spec.max_positions  # longer requests are refused, as a server refuses beyond its model's length
    taken = servable(stream, limit)
    costs.prefill_many(r.prompt_len for r in taken.requests)  # every first prefill, in one simulation
    env = simpy.Environment()
    n_tpot = sum(1 for r in taken.requests if r.gen_len > 1)
    server = Server(lambda: env.now, costs, scheduler, memory, stop_at, len(taken), n_tpot, fast_forward)
    bell = Doorbell(simpy.Event(env))
    env.process(arrivals(env, taken, server, bell))
    done = env.process(serve(env, server, len(taken), bell))
    env.run(until=done)
    return served(stream, server, limit, costs.simulations)


def servable(stream: RequestStream, limit: int) -> RequestStream:
    """The requests a server of a model with `limit` positions takes (longer ones are refused)."""
    return RequestStream(tuple(r for r in stream.requests if r.prompt_len + r.gen_len <= limit), stream.source)


def served(stream: RequestStream, server: Server, limit: int, simulations: int = 0) -> ServingResult:
    """What the server did with the stream, per request and per iteration (simulated or live)."""
    done = {q.req.id: q for q in server.finished + server.rejected}
    seqs = [done.get(r.id) or Seq(r) for r in stream.requests]
    columns = {"id": lambda q: q.req.id, "arrival_s": lambda q: q.req.arrival_s,
               "prompt_len": lambda q: q.req.prompt_len, "gen_len": lambda q: q.req.gen_len,
               "admitted_s": lambda q: q.admitted_s, "first_token_s": lambda q: q.first_token_s,
               "finished_s": lambda q: q.finished_s, "preemptions": lambda q: q.preemptions,
               "too_long": lambda q: q.req.prompt_len + q.req.gen_len > limit}
    requests = {name: np.array([get(q) for q in seqs]) for name, get in columns.items()}
    n_servable = int((~requests["too_long"]).sum())
    return ServingResult(stream, requests, {k: np.asarray(v) for k, v in server.series.items()}, server.preemptions,
                         len(server.rejected), simulations, len(done) < n_servable, len(stream) - n_servable)
