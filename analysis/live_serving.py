"""A live server: the executor serving a request stream on this machine's wall clock.

The story: requests arrive at their (scaled) times and wait. Each iteration the simulator's own
scheduler (`sim.server.Server`, here on the wall clock) decides what runs, exactly as in a
simulation: it admits waiting requests in arrival order while there is room and their prompts
are prefilled one after another (whole prefill), or else every running sequence decodes one
token; a sequence it preempts loses its cache and is prefilled again (prompt and the tokens it
had) when readmitted. The executor runs the iteration for real (`executor.serving.LiveBatch`),
and its end is when the iteration's tokens came out. So a simulation of the same stream on a
calibrated profile differs from the live run only by what the cost model gets wrong.

Prompts are windows of Python's bundled documentation, one per request; every request decodes
exactly its output length (greedy, no EOS). The run is recorded as a serving trace
(docs/TRACE_FORMAT.md): one step per forward, and in `run.serving` the stream, the scheduler and
every request's times.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import policy as policy_spec
from infinisim.sim.iterations import MemoryBudget, SequenceMemory
from infinisim.sim.server import Scheduler, Seq, Server
from infinisim.sim.serving import ServingResult, servable, served
from infinisim.traces.requests import Request, RequestStream
from infinisim.traces.trace import SERVING_STEP_FIELDS, Trace

if TYPE_CHECKING:
    from infinisim.executor.session import Session

PROMPT_STRIDE = 7919  # tokens between two requests' prompt windows in the bundled text


class MeasuredCosts:
    """What the scheduler asks of a cost model, for a live server that measures instead."""

    by_prompt = False

    def prefill(self, n: int) -> tuple[float, float]:
        return 0.0, 0.0

    def decode(self, batch: int, length: float) -> float:
        return 0.0


def live_memory(session: Session, policy: str) -> MemoryBudget:
    """The KV memory a live server admits by: this machine's available memory, each cached row at the
    model's KV row size, in device memory for a resident cache, host memory for an offloaded one."""
    import torch

    from infinisim.executor.kvcache import available_bytes

    row = session.spec.kv_bytes_per_token(session.dtype)
    host = available_bytes(torch.device("cpu"))
    device = available_bytes(session.device)
    on_device = not policy_spec(policy).offloaded
    return MemoryBudget(0.0, device, host, session.device.type == "cpu",
                        SequenceMemory(0.0, 0.0, row if on_device else 0.0),
                        SequenceMemory(0.0, 0.0, 0.0 if on_device else row))


def refuse_unservable(prefill: str, tp: int) -> None:
    """What a live server does not do, as one line (the CLI asks before anything loads)."""
    if prefill != "whole":
        raise InfinisimError("a live server prefills whole prompts (chunked prefill is simulated only: "
                             "`infinisim serve`)", field="--prefill")
    if tp > 1:
        raise InfinisimError("a live server runs in one process (serve a sharded model in the simulator)",
                             field="--tp")


def prompt_tokens(pool: list[int], r: Request) -> list[int]:
    """Request r's prompt: its own window of the token pool (wrapping around)."""
    start = r.id * PROMPT_STRIDE % len(pool)
    reps = (start + r.prompt_len) // len(pool) + 1
    return (pool * reps)[start:start + r.prompt_len] if reps > 1 else pool[start:start + r.prompt_len]


@dataclass
class LiveServed:
    result: ServingResult  # what happened, as the simulator reports its own
    trace: Trace
    outputs: dict[int, list[int]]  # per request id, the tokens it generated


def serve_live(session: Session, policy: str, stream: RequestStream, scheduler: Scheduler,
               knobs: dict[str, Any] | None = None, command: str = "",
               on_iteration: Callable[[int, int], None] | None = None,
               memory: MemoryBudget | None = None) -> LiveServed:
    """Serve `stream` through `policy` on the session's model in real time, admitting by `memory`
    (default: `live_memory`). `on_iteration(done, total)` after each iteration."""
    from infinisim.executor.generate import StepRecord
    from infinisim.executor.prompts import bundled_text
    from infinisim.executor.serving import LiveBatch

    refuse_unservable(scheduler.prefill, session.shard.tp if session.shard is not None else 1)
    if session.tokenizer is None:
        raise InfinisimError("this model has no tokenizer to make prompts with", field="--model")
    spec = session.spec
    taken = servable(stream, spec.max_positions)
    if not taken.requests:
        raise InfinisimError(f"every request is longer than {spec.name}'s {spec.max_positions} positions",
                             field="--requests")
    pool = [t % spec.vocab_size for t in session.tokenizer.encode(bundled_text()).ids]
    batch = LiveBatch(session.loaded.model, policy, knobs, session.link)
    total = len(taken)
    generated: dict[int, list[int]] = {}
    records: list[StepRecord] = []
    extra: list[dict[str, Any]] = []  # each record's iteration fields
    started = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - started

    server = Server(clock, MeasuredCosts(), scheduler, memory or live_memory(session, policy),  # type: ignore[arg-type]
                    None, total, sum(1 for r in taken.requests if r.gen_len > 1), fast_forward=False)
    pending = deque(taken.requests)
    iteration = 0
    while len(server.finished) + len(server.rejected) < total:
        while pending and pending[0].arrival_s <= clock():
            server.waiting.append(Seq(pending.popleft()))
        server.next_arrival_s = pending[0].arrival_s if pending else math.inf
        it = server.next_iteration()
        running = {q.req.id for q in server.running.values()}
        for key in [k for k in batch.running if k not in running]:
            batch.release(key)  # finished last iteration, or preempted by this one: its cache is dropped
        if it is None:
            if not pending:
                raise InfinisimError("the server stalled: nothing runs and no request is left to arrive")
            time.sleep(max(0.0, pending[0].arrival_s - clock()))
            continue
        begin = clock()
        for q, n in it.prefilling:
            had = generated.get(q.req.id, [])[:q.generated]  # after a preemption: recomputed with the prompt
            token, times = batch.prefill(q.req.id, prompt_tokens(pool, q.req) + had, q.req.prompt_len + q.req.gen_len)
            generated[q.req.id] = [*had, token]
            records.append(StepRecord(len(records), "prefill", n, n, times))
            extra.append({"iteration": iteration, "start_s": begin, "batch": 1, "waiting": len(server.waiting)})
        if it.decoding:
            keys = [q.req.id for q in it.decoding]
            tokens_out, times = batch.decode(keys)
            for key, token in zip(keys, tokens_out, strict=True):
                generated[key].append(token)
            rows = sum(batch.running[k].length for k in keys)
            records.append(StepRecord(len(records), "decode", 1, rows, times))
            extra.append({"iteration": iteration, "start_s": begin, "batch": len(keys),
                          "waiting": len(server.waiting)})
        it.seconds = clock() - begin
        server.complete(it)
        server.record(begin, it)
        iteration += 1
        if on_iteration is not None:
            on_iteration(len(server.finished) + len(server.rejected), total)
    result = served(stream, server, spec.max_positions)
    return LiveServed(result, serving_trace(session, policy, batch.settings, stream, scheduler, result, records,
                                            extra, command, generated), generated)


def serving_trace(session: Session, policy: str, settings: dict[str, Any], stream: RequestStream,
                  scheduler: Scheduler, result: ServingResult, records: list[Any], extra: list[dict[str, Any]],
                  command: str, generated: dict[int, list[int]]) -> Trace:
    from infinisim.executor.generate import Generation
    from infinisim.executor.recording import trace_from_generation

    requests = {k: [None if isinstance(v, float) and not math.isfinite(v) else v for v in np.asarray(a).tolist()]
                for k, a in result.requests.items()}
    run = {"model": session.name, "weights": session.loaded.source, "prompt_source": "pydoc_data",
           "command": command, "policy": policy, "policy_knobs": settings, "batch": scheduler.max_seqs,
           "prompt_lens": requests["prompt_len"], "gen_len": max(requests["gen_len"]),
           "new_tokens": [len(generated.get(i, [])) for i in requests["id"]],
           "dtype": session.dtype, "device": session.device.type,
           "sampling": {"temperature": 0.0, "top_p": 1.0, "seed": 0, "stop_at_eos": False},
           "teacher_forced": False, "quality": False, "record_selection": False, "alpha_counts_every": 0,
           "link": session.link.spec.to_dict() if session.link is not None else None,
           **(session.weights.info.to_dict() if session.weights is not None else {}),
           "serving": {"stream": stream.source, "scheduler": asdict(scheduler), "requests": requests,
                       "series": {k: np.asarray(v).tolist() for k, v in result.series.items()},
                       "preemptions": result.preemptions, "rejected": result.rejected}}
    gen = Generation([], requests["prompt_len"], steps=records)
    trace = trace_from_generation(gen, session.spec, run, session.device)
    for name in SERVING_STEP_FIELDS:
        trace.steps[name] = [e[name] for e in extra]
    return trace


def measured_result(trace: Trace) -> ServingResult:
    """A serving trace's requests and iterations, as the simulator reports its own."""
    serving = trace.serving
    if not serving:
        raise InfinisimError("not a serving trace (written by `run --requests`)", field="run.serving")
    req = serving["requests"]
    columns = {k: np.array([np.nan if v is None else v for v in values]) for k, values in req.items()}
    for name in ("id", "prompt_len", "gen_len", "preemptions"):
        columns[name] = columns[name].astype(int)
    columns["too_long"] = np.asarray(req.get("too_long", [False] * len(req["id"])), dtype=bool)
    stream = RequestStream(tuple(Request(int(i), float(a), int(p), int(g)) for i, a, p, g in zip(
        columns["id"], columns["arrival_s"], columns["prompt_len"], columns["gen_len"], strict=True)),
        serving["stream"])
    series = {k: np.asarray(v) for k, v in serving.get("series", {}).items()}
    n_servable = int((~columns["too_long"]).sum())
    return ServingResult(stream, columns, series, int(serving["preemptions"]), int(serving["rejected"]), 0,
                         False, len(stream) - n_servable)
