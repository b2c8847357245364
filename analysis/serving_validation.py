"""The serving simulator against a live server on this machine (`validate --requests`).

The measured side is a serving trace (`run --requests`): every request's arrival, first token and
finish on the wall clock. The predicted side serves the same requests (the stream as the live
server received it: arrivals, prompt and output lengths) in the serving simulator, with the
live run's scheduler, on the calibrated profile; a speculating policy fetches the share of each
layer's cache the live run fetched. Errors are relative to the measurement, per request (TTFT,
TPOT, end to end) and for the aggregates a capacity plan reads (percentiles, throughput).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from infinisim.analysis.live_serving import measured_result
from infinisim.core.files import write_bytes_atomic, write_json
from infinisim.core.policies import policy as policy_spec
from infinisim.sim.latency import SLO, latencies, summarize_serving
from infinisim.sim.server import Scheduler
from infinisim.sim.serving import ServingResult, simulate_serving
from infinisim.traces.requests import RequestStream, attribution
from infinisim.traces.trace import Trace

AGGREGATES = ("ttft_p50_s", "ttft_p90_s", "tpot_p50_s", "tpot_p90_s", "e2e_p50_s", "e2e_p90_s", "throughput_rps",
              "output_tokens_per_s")


def fetched_share(trace: Trace) -> np.ndarray:
    """Per layer, the share of its cached rows a layer fetched over the live run's decode steps (all
    sequences together); NaN for layers that fetch everything."""
    decode = trace.steps[trace.steps["phase"] == "decode"]
    layers = trace.layers[trace.layers["step"].isin(decode["step"])]
    batch = dict(zip(decode["step"], decode["batch"], strict=True))
    cached = layers["kv_len"].to_numpy() - layers["step"].map(batch).to_numpy()  # rows before this step's own
    frame = pd.DataFrame({"layer": layers["layer"], "fetched": layers["tokens_fetched"], "cached": cached})
    sums = frame.groupby("layer")[["fetched", "cached"]].sum()
    share = (sums["fetched"] / sums["cached"].clip(lower=1)).reindex(range(trace.model.n_layers)).to_numpy(copy=True)
    dense = trace.run["policy_knobs"].get("dense_layers", 0)
    share[:dense] = np.nan
    return share


def predict(trace: Trace, stream: RequestStream, profile: Any) -> tuple[Any, ServingResult]:
    """The serving simulator on the live run's requests (`stream`, as it received them), scheduler,
    model, policy and knobs: the iteration costs it used, and what it predicts."""
    from infinisim.sim.iterations import IterationCosts
    from infinisim.sim.run import profile_for

    run = trace.run
    speculated = fetched_share(trace) if policy_spec(run["policy"]).speculating else None
    costs = IterationCosts(trace.model, profile_for(trace, profile), run["policy"], run["dtype"], run["policy_knobs"],
                           speculated, weights_on_host=float(run.get("weights_on_host") or 0.0),
                           sequences_apart=True)  # the live server attends sequence by sequence
    return costs, simulate_serving(stream, costs, Scheduler(**trace.serving["scheduler"]), fast_forward=True)


def forwards(trace: Trace, costs: Any) -> dict[str, Any]:
    """Where the time goes: each forward the live server ran against the cost the simulator gives
    the same forward (a prefill of that many tokens; a decode step of that batch at its mean cache
    length), summed over prefills and per decode batch size. A ratio above 1: the model is slow."""
    steps = trace.steps
    prefill = steps[steps["phase"] == "prefill"]
    decode = steps[steps["phase"] == "decode"]
    predicted_prefill = sum(costs.prefill(int(n))[0] for n in prefill["n_new"])
    by_batch = {}
    for b, rows in decode.groupby("batch"):
        predicted = np.array([costs.decode(int(b), kv / b) for kv in rows["kv_len"]])
        by_batch[int(b)] = {"steps": len(rows), "measured_ms": float(rows["wall_s"].mean() * 1e3),
                            "predicted_ms": float(predicted.mean() * 1e3),
                            "ratio": float(rows["wall_s"].sum() / predicted.sum())}
    return {"prefills": len(prefill), "prefill_s": {"measured": float(prefill["wall_s"].sum()),
                                                    "predicted": float(predicted_prefill)},
            "prefill_ratio": float(prefill["wall_s"].sum() / max(predicted_prefill, 1e-12)),
            "decode_by_batch": by_batch}


def _relative(predicted: np.ndarray, measured: np.ndarray) -> dict[str, float | None]:
    both = np.isfinite(predicted) & np.isfinite(measured) & (measured > 0)
    if not both.any():
        return {"mape": None, "p50": None, "p90": None, "bias_pct": None}
    rel = (predicted[both] - measured[both]) / measured[both]
    return {"mape": float(np.abs(rel).mean() * 100), "p50": float(np.percentile(np.abs(rel), 50) * 100),
            "p90": float(np.percentile(np.abs(rel), 90) * 100), "bias_pct": float(np.median(rel) * 100)}


def compare_serving(trace: Trace, measured: ServingResult, predicted: ServingResult, slo: SLO) -> dict[str, Any]:
    m, p = summarize_serving(measured, slo), summarize_serving(predicted, slo)
    ml, pl = latencies(measured), latencies(predicted)
    aggregate = {k: {"measured": m[k], "predicted": p[k],
                     "error_pct": None if not m[k] or p[k] is None else (p[k] - m[k]) / m[k] * 100}
                 for k in AGGREGATES}
    return {"policy": trace.run["policy"], "model": trace.model.name, "requests": m["requests"],
            "completed": {"measured": m["completed"], "predicted": p["completed"]},
            "preemptions": {"measured": m["preemptions"], "predicted": p["preemptions"]},
            "mean_batch": {"measured": m["mean_batch"], "predicted": p["mean_batch"]},
            "aggregate": aggregate,
            "per_request": {name: _relative(pl[name], ml[name]) for name in ("ttft_s", "tpot_s", "e2e_s")},
            "latency": {side: {name: [None if not np.isfinite(v) else float(v) for v in lat[name]]
                               for name in ("ttft_s", "tpot_s")} for side, lat in (("measured", ml),
                                                                                  ("predicted", pl))}}


def validate_serving(out: str | Path, stream: RequestStream | None, scheduler: Scheduler, slo: SLO, *,
                     traces: list[Trace] | None = None, profile: str | None = None,
                     policies: list[str] = ("resident", "infinigen"), model: str = "smollm2-135m",
                     random_weights: bool = False, device: str | None = None, dtype: str = "float32",
                     quick_calibration: bool = False, knobs: dict[str, Any] | None = None, link: str | None = None,
                     weights_on_host: float = 0.0, command: str = "infinisim validate --requests",
                     log: Callable[[str], None] = lambda _: None,
                     on_iteration: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Calibrate (or load `profile`), serve `stream` live under each policy (or take serving
    `traces`), serve the same requests in the simulator, compare. Writes serving_validation.json
    and serving_validation.png (and the profile and traces it made) into `out`."""
    from infinisim.analysis.validation import machine_profile

    out = Path(out)
    chosen = machine_profile(out, profile, device, dtype, quick_calibration, 1, log)
    if not traces:
        assert stream is not None
        traces = [trace for _, trace in serve_policies(out, stream, scheduler, policies, model, random_weights,
                                                         device, dtype, knobs or {}, link, weights_on_host, command,
                                                         log, on_iteration)]
    comparisons = []
    for trace in traces:
        measured = measured_result(trace)
        costs, predicted = predict(trace, measured.stream, chosen)
        comparisons.append({**compare_serving(trace, measured, predicted, slo), "forwards": forwards(trace, costs)})
    credit = attribution(measured.stream)  # the same stream for every policy
    data = {"command": command, "stream": traces[0].serving["stream"], "attribution": credit, "slo": slo.describe(),
            "scheduler": traces[0].serving["scheduler"], "comparisons": comparisons, "profile": chosen.to_dict()}
    write_json(data, out / "serving_validation.json")
    from infinisim.analysis.figures import serving_validation_cdfs

    write_bytes_atomic(out / "serving_validation.png", serving_validation_cdfs(comparisons, "serving_validation",
                                                                              command, credit).png)
    return data


def serve_policies(out: Path, stream: RequestStream, scheduler: Scheduler, policies: list[str], model: str,
                   random_weights: bool, device: str | None, dtype: str, knobs: dict[str, Any], link: str | None,
                   weights_on_host: float, command: str, log: Callable[[str], None],
                   on_iteration: Callable[[str, int, int], None] | None = None) -> list[tuple[str, Trace]]:
    """The live server under each policy, one serving trace each, written; returns (path, trace) each."""
    from infinisim.analysis.live_serving import serve_live
    from infinisim.executor.session import Session
    from infinisim.hwprofiles.emulated import parse_link

    spec = parse_link(link) if link else None
    session = Session(model, dtype, device, random_weights, log, spec, weights_on_host)
    written = []
    for name in policies:
        log(f"[{name}] serving {len(stream)} requests live over {stream.duration_s:.0f} s ...")
        progress = None if on_iteration is None else functools.partial(on_iteration, name)
        trace = serve_live(session, name, stream, scheduler, knobs, command, progress).trace
        path = session.write(trace, out, knobs=knobs)
        log(f"  trace: {path}")
        written.append((str(path), trace))
    return written
