"""The serving simulator's speed: the whole Azure conversation trace (19,365 requests over an hour)
served by one config, and a 108-config capacity search (plan --requests) over local processes.

Targets (issue 12): the whole trace in under 30 s per config; 100 capacity searches in under 10
minutes on this 2-core machine. Writes JSON (default benchmarks/results/serving.json).

    .venv/bin/python benchmarks/bench_serving.py [--requests ../shared/data/azure-llm-2023/conv.csv]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from infinisim.analysis.planner import make_capacity
from infinisim.analysis.serving import StreamSpec, capacity_configs
from infinisim.analysis.sweep import Sweep
from infinisim.hwprofiles.profile import load_profile
from infinisim.sim.iterations import IterationCosts
from infinisim.sim.latency import SLO, summarize_serving
from infinisim.sim.server import Scheduler
from infinisim.sim.serving import simulate_serving
from infinisim.traces.requests import attribution, read_requests
from infinisim.traces.spec import named_model

WHOLE = [("llama-3-8b", "a100-80gb-pcie4", "resident"), ("llama-3-8b", "a100-80gb-pcie4", "infinigen"),
         ("llama-3-8b", "l4", "full"), ("opt-13b", "a6000-pcie3", "h2o")]
# 6 profiles x 2 models x (resident, full, int4, h2o at 3 budgets, infinigen at 3 budgets) = 108 searches
SEARCH = Sweep(["a6000-pcie3", "a100-40gb-pcie4", "a100-80gb-pcie4", "l4", "h100-pcie5", "h100-sxm"],
               ["llama-3-8b", "opt-13b"], [1], [1], [1], ["resident", "full", "int4", "h2o", "infinigen"],
               {"budget": [0.1, 0.2, 0.3]}, speculated_fraction=0.1)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", default="../shared/data/azure-llm-2023/conv.csv")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/serving.json")
    args = p.parse_args()
    stream = read_requests(args.requests)
    result: dict = {"benchmark": "serving", "requests": len(stream), "source": stream.source,
                    "attribution": attribution(stream), "whole_trace": []}
    for model, profile, policy in WHOLE:
        costs = IterationCosts(named_model(model), load_profile(profile), policy, "float16", None, 0.1)
        t0 = time.perf_counter()
        served = simulate_serving(stream, costs, Scheduler())
        seconds = time.perf_counter() - t0
        s = summarize_serving(served, SLO())
        row = {"model": model, "profile": profile, "policy": policy, "seconds": seconds,
               "iterations": len(served.series["batch"]), "step_simulations": served.simulations,
               "completed": s["completed"], "ttft_p99_s": s["ttft_p99_s"], "tpot_p99_s": s["tpot_p99_s"],
               "throughput_rps": s["throughput_rps"]}
        result["whole_trace"].append(row)
        log(json.dumps(row))
    result["whole_trace_target_s"] = 30
    result["whole_trace_met"] = all(r["seconds"] < 30 for r in result["whole_trace"])
    configs = capacity_configs(SEARCH, StreamSpec(requests=args.requests, max_requests=1000), SLO(), Scheduler())
    out = Path("benchmarks/results/serving-capacity")
    cache = out / "capacity-cache.jsonl"
    cache.unlink(missing_ok=True)  # timed from scratch
    log(f"{len(configs)} capacity searches over {args.workers} processes")
    t0 = time.perf_counter()
    rows, _ = make_capacity(configs, out, workers=args.workers, attribution=attribution(stream))
    seconds = time.perf_counter() - t0
    result["capacity"] = {"searches": len(configs), "workers": args.workers, "seconds": seconds, "target_s": 600,
                          "met": seconds < 600, "fit": int(rows["fits"].sum()),
                          "table": rows[["profile", "model", "policy", "budget", "max_rate", "does_not_fit"]]
                          .to_dict(orient="records")}
    log(json.dumps({k: v for k, v in result["capacity"].items() if k != "table"}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=float))
    return 0 if result["whole_trace_met"] and result["capacity"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
