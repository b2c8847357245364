"""Serving what-ifs: a request stream served under each policy (`serve`), and the largest request
rate each hardware x model x policy x knobs sustains within an SLO (`capacity`, a search over the
rate, run as a sweep: local processes or Dask, cached per config).

The stream is described by a `StreamSpec` (a request trace file, scaled and windowed, or a
synthetic one), so a config that names it is hashable and its cached result can be trusted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from infinisim.core.errors import InfinisimError
from infinisim.core.policies import policy
from infinisim.sim.iterations import IterationCosts
from infinisim.sim.latency import SLO, latencies, summarize_serving
from infinisim.sim.server import Scheduler
from infinisim.sim.serving import ServingResult, simulate_serving
from infinisim.sim.workload import fetched_fraction, synthetic
from infinisim.traces.requests import RequestStream, read_requests, scaled, synthetic_stream, to_rate
from infinisim.traces.spec import named_model

SEARCH_STEPS = 12  # simulations of a rate search at most, after the bracket (each halves the gap in log rate)
SEARCH_PRECISION = 0.02  # the search stops when the bracket is this close (relative)


@dataclass(frozen=True)
class StreamSpec:
    """How the request stream is made: a trace file (scaled to `rate` or by `rate_scale`, within a
    `window`, its first `max_requests`), or `count` synthetic requests at `rate` (lengths fixed or
    drawn from `lengths_from`)."""

    requests: str | None = None
    rate: float | None = None
    rate_scale: float = 1.0
    window: tuple[float, float] | None = None
    max_requests: int | None = None
    count: int = 1000
    lengths_from: str | None = None
    prompt_len: int = 1024
    gen_len: int = 128
    arrivals: str = "poisson"
    cv: float = 1.0
    seed: int = 0
    length_scale: float = 1.0  # a trace's prompt and output lengths times this (a smaller machine's live run)

    def build(self) -> RequestStream:
        if self.requests:
            stream = scaled(_read(self.requests), self.rate_scale, self.window, length_scale=self.length_scale)
            if self.max_requests:
                stream = RequestStream(stream.requests[:self.max_requests], stream.source
                                       + f" (first {min(self.max_requests, len(stream))})")
            return to_rate(stream, self.rate) if self.rate else stream
        if self.rate is None:
            raise InfinisimError("give a request trace (--requests FILE) or a synthetic --rate", field="--rate")
        lengths = _read(self.lengths_from) if self.lengths_from else None
        return synthetic_stream(self.rate, self.count, self.seed, self.arrivals, self.cv, lengths, self.prompt_len,
                                self.gen_len)

    def key(self) -> str:
        """This spec and the contents of the files it reads."""
        files = [_digest(p) for p in (self.requests, self.lengths_from) if p]
        return hashlib.sha256(json.dumps([asdict(self), files], sort_keys=True).encode()).hexdigest()[:20]


@functools.lru_cache(maxsize=8)
def _read(path: str) -> RequestStream:
    return read_requests(path)


def _digest(path: str) -> str:
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]
    except OSError:
        return "missing"


@dataclass(frozen=True)
class ServeConfig:
    """One simulated server: what runs where, and how it schedules."""

    profile: str
    model: str
    policy: str
    knobs: tuple[tuple[str, Any], ...] = ()
    dtype: str = "float16"
    speculated_fraction: float | None = None
    scheduler: Scheduler = field(default_factory=Scheduler)
    tp: int = 1  # tensor parallelism over the profile's GPUs
    weights_on_host: float = 0.0  # share of every block's weights streamed from host memory

    def costs(self, profile: Any = None) -> IterationCosts:
        from infinisim.hwprofiles.profile import load_profile

        kv = policy(self.policy)
        share = self.speculated_fraction if kv.speculating else None
        if kv.speculating and share is None:
            raise InfinisimError(f"{self.policy} needs --speculated-fraction or --from-trace (a trace's within-alpha "
                                 "counts)", field="--speculated-fraction")
        return IterationCosts(named_model(self.model), profile or load_profile(self.profile), self.policy, self.dtype,
                              dict(self.knobs), share, self.tp, self.weights_on_host)

    def fetched_fraction(self, stream: RequestStream) -> float:
        """The share a selecting layer fetches at the stream's mean lengths (accuracy's axis)."""
        _, prompts, gens = stream.arrays()
        share = self.speculated_fraction if policy(self.policy).speculating else None
        w = synthetic(named_model(self.model), 1, int(prompts.mean()), max(2, int(gens.mean())), self.policy,
                      self.dtype, dict(self.knobs), share)
        return fetched_fraction(w)


def serve(stream: RequestStream, configs: list[ServeConfig], slo: SLO, profile: Any = None,
          progress: Callable[[int, int], None] | None = None) -> list[tuple[dict[str, Any], ServingResult]]:
    """Each config serves the stream: (its summary row, its result)."""
    out = []
    for i, config in enumerate(configs):
        result = simulate_serving(stream, config.costs(profile), config.scheduler)
        row = {"policy": config.policy, "profile": config.profile, "model": config.model, "tp": config.tp,
               "weights_on_host": config.weights_on_host, **dict(config.knobs), **summarize_serving(result, slo)}
        out.append((row, result))
        if progress:
            progress(i + 1, len(configs))
    return out


def request_table(result: ServingResult) -> dict[str, list[Any]]:
    """Per request: arrival, lengths, queueing, TTFT, TPOT, end-to-end, preemptions (for CSV/CDFs)."""
    lat = latencies(result)
    r = result.requests
    columns = {"id": r["id"], "arrival_s": r["arrival_s"], "prompt_len": r["prompt_len"], "gen_len": r["gen_len"],
               **lat, "preemptions": r["preemptions"], "too_long": r["too_long"]}
    return {k: np.asarray(v).tolist() for k, v in columns.items()}


# ------------------------------------------------------------------ the largest rate within an SLO


@dataclass(frozen=True)
class CapacityConfig:
    serve: ServeConfig
    stream: StreamSpec
    slo: SLO
    fingerprint: str = ""  # profile contents, model spec, simulator code (analysis.sweep.fingerprint)
    stream_key: str = ""  # the stream's files' contents

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True, default=str).encode()).hexdigest()[:20]


def find_capacity(config: CapacityConfig) -> dict[str, Any]:
    """The largest arrival rate (requests/s, the stream's arrivals scaled) whose served stream meets
    the SLO: bracket by doubling or halving from the stream's own rate, then bisect in log rate.
    Pure: the same config, the same row (with every rate tried and its p99s)."""
    c = config.serve
    row: dict[str, Any] = {"key": config.key(), "profile": c.profile, "model": c.model, "policy": c.policy,
                           "tp": c.tp, "weights_on_host": c.weights_on_host, **{k: v for k, v in c.knobs},
                           "slo": config.slo.describe()}
    try:
        base = config.stream.build()
        costs = c.costs()
        row["fetched_fraction"] = c.fetched_fraction(base)
    except InfinisimError as exc:
        return {**row, "fits": False, "does_not_fit": f"invalid: {exc}"}
    tried: list[dict[str, Any]] = []

    def meets(rate: float) -> bool:
        result = simulate_serving(to_rate(base, rate), costs, c.scheduler, stop_at=config.slo)
        summary = summarize_serving(result, config.slo)
        ok = summary["meets_slo"] and summary["rejected"] == 0 and not result.stopped
        tried.append({"rate": rate, "meets_slo": ok, "stopped_early": result.stopped,
                      **{k: summary[k] for k in ("ttft_p99_s", "tpot_p99_s", "throughput_rps", "goodput_rps",
                                                 "mean_batch", "preemptions", "rejected")}})
        return ok

    try:
        rate = base.rate
        if meets(rate):
            low, high = rate, None
            for _ in range(20):
                if not meets(rate * 2):
                    high = rate * 2
                    break
                rate *= 2
                low = rate
        else:
            low, high = None, rate
            for _ in range(20):
                rate /= 2
                if meets(rate):
                    low = rate
                    break
                high = rate
    except InfinisimError as exc:
        return {**row, "fits": False, "does_not_fit": str(exc), "tried": tried}
    if low is not None and high is not None:
        for _ in range(SEARCH_STEPS):
            if high / low <= 1 + SEARCH_PRECISION:
                break
            mid = math.sqrt(low * high)
            low, high = (mid, high) if meets(mid) else (low, mid)
    best = next((t for t in tried if low is not None and t["rate"] == low), None)
    return {**row, "fits": low is not None, "does_not_fit": "" if low is not None else "no rate meets the SLO",
            "max_rate": low or 0.0, **({f"at_max_{k}": v for k, v in best.items() if k != "rate"} if best else {}),
            "simulations": costs.simulations, "tried": tried}


def serving_share(weights_on_host: float | str) -> float:
    """A share of the weights on the host for serving: a number (not auto)."""
    if weights_on_host == "auto":
        raise InfinisimError("serving takes a share, not auto (what fits depends on the requests running; "
                             "`simulate --weights-on-host auto` finds the share a static batch needs)",
                             field="--weights-on-host")
    return float(weights_on_host)


def capacity_configs(sweep: Any, stream: StreamSpec, slo: SLO, scheduler: Scheduler) -> list[CapacityConfig]:
    """A sweep's hardware x model x policy x knobs (its batch and length axes are the stream's to
    set) as capacity searches; a speculating policy's share as the sweep gives it (a fraction, or a
    trace's per-alpha shares at the knob's alpha)."""
    key, out = stream.key(), {}
    for c in sweep.configs():
        share = c.speculated_fraction
        if c.speculated_by_alpha is not None:
            alpha = policy(c.policy).make_knobs(dict(c.knobs)).alpha_for(named_model(c.model).family)
            share = c.speculated_by_alpha[min(9, max(1, round(alpha))) - 1]
        serve_config = ServeConfig(c.profile, c.model, c.policy, c.knobs, c.dtype, share, scheduler, c.tp,
                                   serving_share(c.weights_on_host))
        config = CapacityConfig(serve_config, stream, slo, c.fingerprint, key)
        out.setdefault(config.key(), config)
    return list(out.values())
